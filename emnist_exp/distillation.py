"""A student distilled from an ensemble run: the teacher found, its soft targets computed once, fitted, logged."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np

from emnist_exp import data, members, model, precision, serving, soft_targets, trainer
from emnist_exp.config import Config
from emnist_exp.errors import UserError
from emnist_exp.spec import TrialSpec
from emnist_exp.tracking import datasets, models, queries, runs, students, tags

RATE_IMAGES = 2048  # validation images each model is timed on: a second or two on a CPU, a stable rate


@dataclass(frozen=True)
class Options:
    """What the distill command was asked for; None, 0 or "" means the teacher's best member's value."""

    study: str | None = None
    ensemble: str | None = None
    arch: str | None = None
    width: int = 0
    epochs: int = 0
    temperature: float = 4.0
    alpha: float = soft_targets.DEFAULT_ALPHA
    seed: int = 0
    precision: str = "auto"


def check(options: Options) -> None:
    """Every option checked before the store is opened or data read."""
    if options.arch and options.arch not in model.ARCHITECTURES:
        raise UserError(f"unknown architecture {options.arch!r}: use one of {', '.join(model.ARCHITECTURES)}.")
    if options.width < 0 or options.epochs < 0:
        raise UserError("--width and --epochs must be positive (or 0 for the best member's).")
    if not (math.isfinite(options.temperature) and options.temperature > 0):
        raise UserError(f"--temperature must be a positive number, got {options.temperature:g}.")
    if not (math.isfinite(options.alpha) and 0 <= options.alpha <= 1):
        raise UserError(f"--alpha must be between 0 and 1, got {options.alpha:g}.")
    if options.precision not in precision.PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(precision.PRECISIONS)}, got {options.precision!r}.")


@dataclass(frozen=True)
class TeacherRun:
    """The ensemble run, its member runs (best on validation first), their dataset, where the student goes."""

    run: object
    study: str
    members: list
    dataset: str
    experiment_id: str

    @property
    def best(self):
        return self.members[0]

    def param_count(self) -> int:
        return int(sum(m.data.metrics.get("param_count", 0) for m in self.members))


def find_teacher(study: str | None, ensemble: str | None) -> TeacherRun:
    """The ensemble run named, else the study's (the latest study's) latest one, with its members."""
    if ensemble:
        run = queries.ensemble_run(ensemble)
    else:
        study = study or queries.latest_study()
        if study is None:
            raise UserError("the tracking store has no study yet: run `python -m emnist_exp.train` first.")
        run = queries.latest_ensemble(study)
        if run is None:
            raise UserError(f"study {study!r} has no ensemble yet: run `python -m emnist_exp.ensemble --study "
                            f"{study}` first.")
    ids = [m for m in run.data.tags.get("ensemble.members", "").split(",") if m]
    trial_runs = [queries.finished_trial(m) for m in ids]
    order = sorted(range(len(ids)), key=lambda i: -run.data.metrics.get(f"member_{i}_val_accuracy", -math.inf))
    found = {r.data.params.get("dataset") for r in trial_runs}
    if len(found) != 1:
        raise UserError(f"ensemble run {run.info.run_id} has members from {len(found)} datasets; distil one "
                        "whose members share their dataset.")
    dataset = found.pop()
    experiment_id = run.info.experiment_id
    if study and ensemble:
        study_trials = queries.finished_trials(study=study)
        if not study_trials:
            raise UserError(f"study {study!r} has no finished trial runs: check --study.")
        theirs = study_trials[0].data.params.get("dataset")
        if theirs != dataset:
            raise UserError(f"ensemble run {run.info.run_id} was trained on {dataset}, but study {study!r} on "
                            f"{theirs}: pass an ensemble of this study, or leave out --study.")
        experiment_id = study_trials[0].info.experiment_id
    study = study or run.data.tags.get(tags.STUDY_TAG) or "runs"
    return TeacherRun(run=run, study=study, members=[trial_runs[i] for i in order], dataset=dataset,
                      experiment_id=experiment_id)


def student_spec(best: TrialSpec, arch: str | None, width: int) -> TrialSpec:
    """The best member's recipe, in another architecture or width when asked."""
    return dataclasses.replace(best, arch=arch or best.arch, width=width or best.width)


def rate(predict, images: np.ndarray) -> float:
    """Images/s of `predict` on `images`, after one warm-up call (tracing, loading)."""
    predict(images[:64])
    started = time.perf_counter()
    predict(images)
    return len(images) / (time.perf_counter() - started)


@dataclass(frozen=True)
class Distilled:
    """A finished student: its run, registered version, spec, and the numbers it is compared on."""

    run_id: str
    version: str
    experiment_id: str
    teacher: TeacherRun
    spec: TrialSpec
    result: trainer.TrainResult
    metrics: dict[str, float]


def distil(options: Options) -> Distilled:
    """Fit a student on the teacher ensemble's soft targets over train; select on validation, report test."""
    check(options)
    teacher = find_teacher(options.study, options.ensemble)
    p = teacher.best.data.params
    splits = data.load_splits(teacher.dataset, val_fraction=float(p.get("val_fraction", 0.1)),
                              max_examples=int(p.get("max_examples", 0)), data_dir=p.get("data_dir", ""))
    spec = student_spec(TrialSpec.from_run_params(p), options.arch, options.width)
    epochs = options.epochs or int(p.get("max_epochs", 1))
    policy = precision.resolve(options.precision)
    splits_logged = datasets.split_datasets(teacher.dataset, data.split_records(splits), len(splits.classes))
    teacher_id = teacher.run.info.run_id
    extra = {"dataset": teacher.dataset, "val_fraction": p.get("val_fraction", 0.1), "max_examples":
             p.get("max_examples", 0), "data_dir": p.get("data_dir", ""), "n_train": splits.counts["train"],
             "max_epochs": epochs, "temperature": options.temperature, "alpha": options.alpha, "teacher": teacher_id}
    with students.student_run(experiment_id=teacher.experiment_id, study=teacher.study, teacher=teacher_id,
                              spec=spec, seed=options.seed, policy=policy, params=extra) as run:
        datasets.log_datasets(splits_logged)
        started = time.perf_counter()
        ensemble = serving.load_model(models.model_uri(teacher_id))
        if ensemble.classes != splits.classes:
            raise UserError(f"ensemble run {teacher_id} knows other classes than {teacher.dataset} has.")
        targets = members.split_scores(ensemble, splits.train)  # batch by batch: memory stays flat
        targets_seconds = time.perf_counter() - started
        students.log_teacher_targets(targets, splits.classes)
        result = trainer.train_spec(spec, splits, epochs=epochs, patience=epochs, seed=options.seed,
                                    shuffle_buffer=Config().shuffle_buffer, policy=policy,
                                    teacher=soft_targets.Teacher(targets, options.temperature, options.alpha),
                                    callbacks=[runs.EpochLogger()])
        if result.diverged:
            raise UserError("the student's loss became NaN: try a lower --temperature or the best member's recipe.")
        metrics = compared(teacher, result, splits, ensemble) | {"teacher_targets_seconds": targets_seconds}
        wrong = images = None
        if result.test_probs is not None:
            wrong = np.flatnonzero(result.test_probs.argmax(axis=1) != result.test_labels)[:48]
            images = data.images_at(splits.test, wrong)
        _, version = students.log_student(result, spec, splits.classes, metrics=metrics, datasets=splits_logged,
                                          example=data.images_at(splits.val, range(min(4, splits.counts["val"]))),
                                          test_images=images, wrong_index=wrong)
    return Distilled(run.info.run_id, version, run.info.experiment_id, teacher, spec, result, metrics)


def compared(teacher: TeacherRun, result: trainer.TrainResult, splits: data.Splits, ensemble) -> dict[str, float]:
    """The teacher's and its best member's accuracies and size, and each model's images/s on validation."""
    tm, bm = teacher.run.data.metrics, teacher.best.data.metrics
    images = np.stack([x for x, _ in splits.val.take(RATE_IMAGES).as_numpy_iterator()]).astype(np.float32)
    out = {"teacher_val_accuracy": tm["val_accuracy"], "teacher_param_count": teacher.param_count(),
           "best_member_val_accuracy": bm["val_accuracy"], "best_member_param_count": bm.get("param_count", math.nan),
           "student_images_per_second": rate(lambda x: result.model.predict(x, batch_size=512, verbose=0), images),
           "teacher_images_per_second": rate(teacher_scores(teacher.run.info.run_id, ensemble), images)}
    for key, value in (("teacher_test_accuracy", tm.get("test_accuracy")),
                       ("best_member_test_accuracy", bm.get("test_accuracy"))):
        if value is not None:
            out[key] = value
    return out


def teacher_scores(run_id: str, ensemble: serving.ProjectModel):
    """The ensemble's exported graph, which is what would be served in the student's place; the pyfunc's
    vote for a hard vote, which has no graph."""
    import keras  # noqa: PLC0415

    try:
        graph = keras.saving.load_model(models.download_graph(run_id) / "ensemble.keras")
    except Exception:  # noqa: BLE001 (no graph/ folder in the run)
        return ensemble.class_scores
    return lambda x: graph.predict(x, batch_size=512, verbose=0)
