"""Which voting strategy should `python -m emnist_exp.ensemble` use by default? Decided on validation.

    python benchmarks/strategies.py --study sample [--top 5] [--pool 10] [--folds 2]

Weighted and greedy fit their weights on validation, so their accuracy on that same validation set
is flattering. This script cross-fits instead: it splits validation into folds, fits on all but
one fold, scores the held-out fold, and averages. That makes the four strategies comparable
without touching test. Test accuracy (fitted on all of validation, as the CLI does) is printed for
the record only. Reads the study's logged predictions from the MLflow store (MLFLOW_TRACKING_URI). The last rows
show the headroom: the "oracle" is right wherever any top member is, which no vote can beat.
"""

from __future__ import annotations

import argparse

import numpy as np

from emnist_exp import voting
from emnist_exp.tracking import queries
from emnist_exp.members import member_predictions


def members(study: str, top: int, pool: int) -> tuple[dict, int]:
    """Logged validation and test predictions of the study's best max(top, pool) trials, and the trial count."""
    runs = queries.finished_trials(study=study)
    if not runs:
        raise SystemExit(f"error: no finished trial runs in study {study!r}.")
    preds = [member_predictions(r, reinfer=False) for r in runs[: max(top, pool)]]
    return {split: voting.stack(preds, split) for split in ("val", "test")}, len(runs)


def evaluate(strategy: str, val: tuple, test: tuple, folds: int, seed: int) -> tuple[float, float]:
    probs, labels = val
    order = np.random.default_rng(seed).permutation(len(labels))
    held_out_correct = 0
    for fold in np.array_split(order, folds):
        fit = np.setdiff1d(order, fold)
        weights = voting.weights_for(strategy, probs[:, fit], labels[fit])
        scores = voting.combine(strategy, probs[:, fold], weights)
        held_out_correct += int(np.sum(scores.argmax(axis=1) == labels[fold]))
    weights = voting.weights_for(strategy, *val)
    return held_out_correct / len(labels), voting.accuracy(voting.combine(strategy, test[0], weights), test[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", default=None, help="Optuna study (default: the most recent)")
    parser.add_argument("--top", type=int, default=5, help="members for soft, hard and weighted (default: 5)")
    parser.add_argument("--pool", type=int, default=10, help="greedy's candidates, as in the CLI (default: 10)")
    parser.add_argument("--folds", type=int, default=2, help="validation folds for cross-fitting (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="how validation is split into folds")
    args = parser.parse_args()
    study = args.study or queries.latest_study()
    pooled, n_runs = members(study, args.top, args.pool)
    top = {s: (p[: args.top], y) for s, (p, y) in pooled.items()}
    best = int(np.argmax([voting.accuracy(p, top["val"][1]) for p in top["val"][0]]))
    print(f"study {study}: {n_runs} finished trials; top {args.top} by validation, greedy from "
          f"{len(pooled['val'][0])}; {args.folds}-fold cross-fitted on {len(pooled['val'][1]):,} validation images")
    print(f"{'strategy':<22} {'val (cross-fitted)':>18} {'test':>8}")
    best_val = voting.accuracy(top["val"][0][best], top["val"][1])
    print(f"{'best member':<22} {best_val:>18.4f} {voting.accuracy(top['test'][0][best], top['test'][1]):>8.4f}")
    for strategy in voting.STRATEGIES:
        pool = pooled if strategy == "greedy" else top
        val_acc, test_acc = evaluate(strategy, pool["val"], pool["test"], args.folds, args.seed)
        print(f"{strategy:<22} {val_acc:>18.4f} {test_acc:>8.4f}")
    # The headroom any vote has: an example that every member gets wrong stays wrong.
    wrong = {s: p.argmax(axis=2) != y[None] for s, (p, y) in top.items()}
    print(f"{'oracle (any member)':<22} {1 - wrong['val'].all(0).mean():>18.4f} {1 - wrong['test'].all(0).mean():>8.4f}")
    shared = {s: w.all(0).sum() / w.any(0).sum() for s, w in wrong.items()}
    print(f"{'errors all share':<22} {shared['val']:>18.1%} {shared['test']:>8.1%}  (of examples any member gets wrong)")


if __name__ == "__main__":
    main()
