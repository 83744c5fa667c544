"""An ensemble from finished trial runs: members chosen on validation, their vote scored, logged as a run."""

from __future__ import annotations

import io
import sys
import time
from dataclasses import dataclass

import numpy as np

from emnist_exp import members, model, plots, voting
from emnist_exp.errors import UserError
from emnist_exp.tracking import models, queries


@dataclass(frozen=True)
class Assembled:
    """What an ensemble run holds: its members (best on validation first), weights, metrics, where it went."""

    study: str | None
    strategy: str
    run_ids: list[str]
    names: list[str]
    weights: np.ndarray | None
    member_val: list[float]
    member_test: list[float]
    metrics: dict[str, float]
    seconds: float
    experiment_id: str
    run_id: str
    version: str | None


def select_members(*, top: int, strategy: str, pool: int, study: str | None = None, experiment: str | None = None,
                   run_ids: list[str] | None = None) -> tuple[str | None, list]:
    """The study (latest if none is named) and its best finished trial runs by validation accuracy."""
    study = None if run_ids or experiment else (study or queries.latest_study())
    if top < 1:
        raise UserError("--top must be at least 1.")
    runs = queries.finished_trials(study=study, experiment=experiment, run_ids=run_ids)
    where = f"study {study!r}" if study else (f"experiment {experiment!r}" if experiment else "the store")
    if not runs:
        raise UserError(f"no finished trial runs in {where}: run `python -m emnist_exp.train` first.")
    wanted = max(top, pool) if strategy == "greedy" else top
    if len(runs) < wanted:
        print(f"warning: {where} has {len(runs)} finished trial runs, fewer than {wanted}; using them all",
              file=sys.stderr)
    runs = runs[:wanted]
    datasets = {r.data.params.get("dataset") for r in runs}
    if len(datasets) > 1:
        raise UserError(f"members were trained on different datasets ({', '.join(sorted(map(str, datasets)))}).")
    return study, runs


def assemble(runs: list, *, study: str | None, strategy: str, reinfer: bool = False,
             register: bool = True) -> Assembled:
    """Vote `runs` by `strategy` from their predictions, score it on validation and test, log and register it."""
    started = time.perf_counter()
    preds = [members.member_predictions(r, reinfer) for r in runs]
    classes = tuple(str(c) for c in preds[0]["classes"])
    if any(tuple(str(c) for c in p["classes"]) != classes for p in preds):
        raise UserError("members have different class lists; they cannot vote together.")
    val = voting.stack(preds, "val")
    test = voting.stack(preds, "test")
    weights = voting.weights_for(strategy, *val)
    keep = list(range(len(runs))) if weights is None else [i for i, w in enumerate(weights) if w > 0]
    runs, weights = [runs[i] for i in keep], None if weights is None else weights[keep]
    val = (val[0][keep], val[1])
    test = None if test is None else (test[0][keep], test[1])
    val_scores = voting.combine(strategy, val[0], weights)
    seconds = time.perf_counter() - started

    ids = [r.info.run_id for r in runs]
    metrics = {"val_accuracy": voting.accuracy(val_scores, val[1]), "assembly_seconds": seconds}
    member_val = [voting.accuracy(p, val[1]) for p in val[0]]
    member_test = [voting.accuracy(p, test[1]) for p in test[0]] if test else [float("nan")] * len(runs)
    for i, (v, t) in enumerate(zip(member_val, member_test)):
        metrics[f"member_{i}_val_accuracy"] = v
        if test:
            metrics[f"member_{i}_test_accuracy"] = t
    metrics["val_gain_over_best_member"] = metrics["val_accuracy"] - max(member_val)
    split_probs, split_labels = test if test else val
    scores = voting.combine(strategy, split_probs, weights)
    if test:
        metrics["test_accuracy"] = voting.accuracy(scores, test[1])
        best = int(np.argmax(member_val))  # the best member is chosen on validation, reported on test
        metrics["test_gain_over_best_member"] = metrics["test_accuracy"] - member_test[best]
    dis = voting.disagreement(split_probs)
    metrics["mean_pairwise_disagreement"] = float(dis[np.triu_indices(len(runs), 1)].mean()) if len(runs) > 1 else 0.0
    predicted = scores.argmax(axis=1)
    split_name = "test" if test else "validation"
    experiment_id = runs[0].info.experiment_id
    run_id, version = models.log_ensemble(
        experiment_id=experiment_id, study=study, strategy=strategy, members=ids,
        weights=weights, classes=classes, metrics=metrics,
        tables={"per_class_accuracy.csv": per_class_csv(split_labels, predicted, classes),
                "pairwise_disagreement.csv": matrix_csv(dis, ids)},
        figures={"plots/confusion_matrix.png": plots.confusion(
            split_labels, predicted, classes, title=f"ensemble ({strategy}) on {split_name}")},
        register=register, graph=None if strategy == "hard" else graph(ids, weights),
    )
    return Assembled(study=study, strategy=strategy, run_ids=ids,
                     names=[r.info.run_name or r.info.run_id[:8] for r in runs], weights=weights,
                     member_val=member_val, member_test=member_test, metrics=metrics, seconds=seconds,
                     experiment_id=experiment_id, run_id=run_id, version=version)


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


def graph(run_ids: list[str], weights: np.ndarray):
    """The members' Keras models and their soft vote as one model (a hard vote has no such graph)."""
    return model.ensemble_graph([models.load_keras_model(r) for r in run_ids], weights)
