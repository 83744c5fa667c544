"""Entry point: vote the best trials of a study into an ensemble (`python -m emnist_exp.ensemble --top 5`)."""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np

from emnist_exp import console
from emnist_exp.errors import UserError, cli_main
from emnist_exp.voting import STRATEGIES


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.ensemble",
        description="Take the top-k finished trial runs by VALIDATION accuracy, vote them into an ensemble "
        "from their logged predictions (no retraining), log it as an MLflow run and register the voting "
        "model as 'emnist-ensemble'.",
    )
    parser.add_argument("--top", type=int, default=5, help="members to take (default: 5)")
    parser.add_argument("--study", default=None, help="Optuna study name (default: the most recent study)")
    parser.add_argument("--experiment", default=None, help="take trial runs from this MLflow experiment")
    parser.add_argument("--runs", default=None, help="comma-separated trial run ids, instead of a study")
    parser.add_argument("--strategy", default="soft", choices=STRATEGIES,
                        help="soft: mean probability (default); hard: majority vote; weighted: weights fitted "
                        "on validation; greedy: Caruana forward selection on validation from --pool")
    parser.add_argument("--pool", type=int, default=10, help="candidates for greedy selection (default: 10)")
    parser.add_argument("--reinfer", nargs="?", type=int, const=1, default=0, metavar="0|1",
                        help="1 (or the flag alone): recompute member predictions with their models instead of "
                        "the logged ones (default: 0)")
    parser.add_argument("--register", type=int, default=1, metavar="0|1",
                        help="0: log the ensemble run but do not register a model version (default: 1)")
    parser.add_argument("--no-register", dest="register", action="store_const", const=0, help="same as --register 0")
    console.add_verbose_flag(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def select_members(args: argparse.Namespace):
    from emnist_exp import tracking  # noqa: PLC0415

    run_ids = [r.strip() for r in args.runs.split(",") if r.strip()] if args.runs else None
    study = None if run_ids or args.experiment else (args.study or tracking.latest_study())
    if args.top < 1:
        raise UserError("--top must be at least 1.")
    runs = tracking.finished_trials(study=study, experiment=args.experiment, run_ids=run_ids)
    where = f"study {study!r}" if study else (f"experiment {args.experiment!r}" if args.experiment else "the store")
    if not runs:
        raise UserError(f"no finished trial runs in {where}: run `python -m emnist_exp.train` first.")
    wanted = max(args.top, args.pool) if args.strategy == "greedy" else args.top
    if len(runs) < wanted:
        print(f"warning: {where} has {len(runs)} finished trial runs, fewer than {wanted}; using them all",
              file=sys.stderr)
    runs = runs[:wanted]
    datasets = {r.data.params.get("dataset") for r in runs}
    if len(datasets) > 1:
        raise UserError(f"members were trained on different datasets ({', '.join(sorted(map(str, datasets)))}).")
    return study, runs


def per_class_csv(labels: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> str:
    out = io.StringIO()
    out.write("class,character,support,accuracy\n")
    for i, c in enumerate(classes):
        mask = labels == i
        acc = float(np.mean(predicted[mask] == i)) if mask.any() else float("nan")
        out.write(f"{i},{c},{int(mask.sum())},{acc:.4f}\n")
    return out.getvalue()


def matrix_csv(matrix: np.ndarray, names: list[str]) -> str:
    rows = [",".join(["run"] + names)]
    rows += [",".join([n] + [f"{v:.4f}" for v in row]) for n, row in zip(names, matrix)]
    return "\n".join(rows) + "\n"


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.quiet(verbose=bool(args.verbose))
    from emnist_exp import members, plots, tracking, voting  # noqa: PLC0415

    console.quiet_libraries()

    study, runs = select_members(args)
    started = time.perf_counter()
    preds = [members.member_predictions(r, args.reinfer) for r in runs]
    classes = tuple(str(c) for c in preds[0]["classes"])
    if any(tuple(str(c) for c in p["classes"]) != classes for p in preds):
        raise UserError("members have different class lists; they cannot vote together.")
    val = voting.stack(preds, "val")
    test = voting.stack(preds, "test")
    weights = voting.weights_for(args.strategy, *val)
    keep = list(range(len(runs))) if weights is None else [i for i, w in enumerate(weights) if w > 0]
    runs, weights = [runs[i] for i in keep], None if weights is None else weights[keep]
    val = (val[0][keep], val[1])
    test = None if test is None else (test[0][keep], test[1])
    val_scores = voting.combine(args.strategy, val[0], weights)
    seconds = time.perf_counter() - started

    ids = [r.info.run_id for r in runs]
    names = [r.info.run_name or r.info.run_id[:8] for r in runs]
    metrics = {"val_accuracy": voting.accuracy(val_scores, val[1]), "assembly_seconds": seconds}
    member_val = [voting.accuracy(p, val[1]) for p in val[0]]
    member_test = [voting.accuracy(p, test[1]) for p in test[0]] if test else [float("nan")] * len(runs)
    for i, (v, t) in enumerate(zip(member_val, member_test)):
        metrics[f"member_{i}_val_accuracy"] = v
        if test:
            metrics[f"member_{i}_test_accuracy"] = t
    metrics["val_gain_over_best_member"] = metrics["val_accuracy"] - max(member_val)
    split_probs = test[0] if test else val[0]
    split_labels = test[1] if test else val[1]
    scores = voting.combine(args.strategy, split_probs, weights)
    if test:
        metrics["test_accuracy"] = voting.accuracy(scores, test[1])
        best = int(np.argmax(member_val))  # the best member is chosen on validation, reported on test
        metrics["test_gain_over_best_member"] = metrics["test_accuracy"] - member_test[best]
    dis = voting.disagreement(split_probs)
    metrics["mean_pairwise_disagreement"] = float(dis[np.triu_indices(len(runs), 1)].mean()) if len(runs) > 1 else 0.0
    predicted = scores.argmax(axis=1)
    split_name = "test" if test else "validation"
    run_id, version = tracking.log_ensemble(
        experiment_id=runs[0].info.experiment_id, study=study, strategy=args.strategy, members=ids,
        weights=weights, classes=classes, metrics=metrics,
        tables={"per_class_accuracy.csv": per_class_csv(split_labels, predicted, classes),
                "pairwise_disagreement.csv": matrix_csv(dis, ids)},
        figures={"plots/confusion_matrix.png": plots.confusion(
            split_labels, predicted, classes, title=f"ensemble ({args.strategy}) on {split_name}")},
        register=args.register,
    )
    print_table(names, weights, member_val, member_test, metrics, args.strategy)
    print(f"assembled {len(runs)} members in {seconds:.2f}s "
          f"({'re-inference' if args.reinfer else 'logged predictions'}); ensemble run {run_id}")
    if version:
        print(f"registered models:/{tracking.ENSEMBLE_MODEL}/{version}")
    print(f"runs: {tracking.experiment_url(runs[0].info.experiment_id)} (`mlflow ui` for a local store)")
    return 0


def print_table(names, weights, member_val, member_test, metrics, strategy) -> None:
    width = max(len(n) for n in names + ["ensemble"]) + 2
    print(f"{'member':<{width}} {'weight':>7} {'val_acc':>8} {'test_acc':>8}")
    for i, name in enumerate(names):
        w = "" if weights is None else f"{weights[i]:.3f}"
        print(f"{name:<{width}} {w:>7} {member_val[i]:>8.4f} {member_test[i]:>8.4f}")
    print(f"{'ensemble (' + strategy + ')':<{width}} {'':>7} {metrics['val_accuracy']:>8.4f} "
          f"{metrics.get('test_accuracy', float('nan')):>8.4f}")


if __name__ == "__main__":
    sys.exit(main())
