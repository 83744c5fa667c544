"""Entry point: vote the best trials of a study into an ensemble (`python -m emnist_exp.ensemble --top 5`)."""

from __future__ import annotations

import argparse
import sys

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


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.quiet(verbose=bool(args.verbose))
    from emnist_exp import assembly  # noqa: PLC0415
    from emnist_exp.tracking import experiments, models  # noqa: PLC0415

    console.quiet_libraries()
    run_ids = None if args.runs is None else [r.strip() for r in args.runs.split(",") if r.strip()]
    if run_ids == []:  # not "no choice": the latest study would be ensembled instead
        raise UserError(f"--runs {args.runs!r} names no run ids: pass trial run ids separated by commas.")
    study, runs = assembly.select_members(top=args.top, strategy=args.strategy, pool=args.pool, study=args.study,
                                          experiment=args.experiment, run_ids=run_ids)
    done = assembly.assemble(runs, study=study, strategy=args.strategy, reinfer=bool(args.reinfer),
                             register=bool(args.register))
    print_table(done.names, done.weights, done.member_val, done.member_test, done.metrics, done.strategy)
    print(f"assembled {len(done.run_ids)} members in {done.seconds:.2f}s "
          f"({'re-inference' if args.reinfer else 'logged predictions'}); ensemble run {done.run_id}")
    if done.version:
        print(f"registered models:/{models.ENSEMBLE_MODEL}/{done.version}")
    print(f"runs: {experiments.experiment_url(done.experiment_id)} (`mlflow ui` for a local store)")
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
