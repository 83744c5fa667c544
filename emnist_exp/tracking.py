"""Everything that talks to MLflow: the study's parent run, one nested run per trial, artifacts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import keras
import mlflow
import numpy as np
import optuna
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from emnist_exp import plots, serving
from emnist_exp.errors import UserError
from emnist_exp.spec import TrialSpec

ROLE_TAG = "emnist.role"  # study | trial | ensemble
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
WORKER_TAG = "worker"  # host, seed and process of the worker behind a study run
MOVED_TAG = "emnist.moved_to"  # on `mlflow run`'s own run in Default: the run that replaced it
HANDED_OVER_TAG = "emnist.handed_over_ms"  # ... and when (the end time it got then)
PREDICTIONS = "predictions.npz"
MODEL_NAME = "model"
# The MLflow 3 UI opens an experiment in the view this tag names (its JS bundle reads
# `mlflow.experimentKind`); without it an experiment may open on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's "Machine learning" view
DEFAULT_EXPERIMENT_ID = "0"  # "Default": where `mlflow run` puts its run when no experiment is named


def quoted(value: str) -> str:
    """A string literal for an MLflow filter. MLflow's filter parser has no escape character, so the
    value goes in whichever quote it does not contain (config refuses study names holding both)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"{value!r} holds both ' and \", which no MLflow search filter can match.")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


MIGRATION_LEFTOVER = "_alembic_tmp_"  # alembic's copy of a table that a SQLite migration is rebuilding


def prepare_local_store(repair: bool = False) -> str:
    """Create (or, with repair, finish migrating) a SQLite tracking store under a file lock; returns its URI.

    MLflow creates a fresh store's tables on first use, and two processes starting together break
    each other's migrations; one killed mid-migration leaves alembic's table copies behind, and then
    every command fails. A server or PostgreSQL store needs nothing here.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return uri
    import fcntl  # noqa: PLC0415

    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:  # flock is apart from SQLite's own fcntl locks on the same file
        fcntl.flock(handle, fcntl.LOCK_EX)
        leftovers = _migration_leftovers(path, repair)
        if leftovers:
            raise UserError(f"{path} was left half-migrated by MLflow processes that created or upgraded it at "
                            f"once (leftover tables {', '.join(leftovers)}): run `python -m emnist_exp.stores "
                            "--repair`, which removes only those copies and finishes the upgrade, keeping every run.")
        import sqlalchemy.exc  # noqa: PLC0415

        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError) as exc:
            # e.g. a migration killed between two of its statements: no leftover copy, a schema half changed
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise UserError(f"cannot open or upgrade the MLflow store {uri} ({reason}); its schema is changed in a "
                            "way no repair here undoes, so restore it from a backup.") from None
    return uri


def _migration_leftovers(path: Path, repair: bool) -> list[str]:
    """Alembic's leftover table copies in a SQLite store; with repair, removed (or, where the
    migration had already dropped the original, renamed back to it)."""
    import sqlite3  # noqa: PLC0415

    with contextlib.closing(sqlite3.connect(path, timeout=120)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        leftovers = sorted(t for t in tables if t.startswith(MIGRATION_LEFTOVER))
        if not repair:
            return leftovers
        for table in leftovers:
            original = table.removeprefix(MIGRATION_LEFTOVER)
            if original in tables:
                db.execute(f'DROP TABLE "{table}"')  # a copy: the original still holds every row
            else:
                db.execute(f'ALTER TABLE "{table}" RENAME TO "{original}"')
        db.commit()
    return []


def study_experiment(name: str) -> str:
    """The id of the experiment called `name`, created for the model-training view if it is new."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=beside_default(client, name),
                                            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
        except MlflowException:  # another worker of the study created it a moment ago
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage == "deleted":
        raise UserError(f"MLflow experiment {name!r} is deleted: restore it with `mlflow experiments restore "
                        f"--experiment-id {found.experiment_id}`, or name another study or experiment.")
    return found.experiment_id


def beside_default(client: mlflow.MlflowClient, name: str) -> str | None:
    """A local artifact folder next to Default's, or None to let the store or server decide.

    A local store puts a new experiment's artifacts under the working directory, and `mlflow run`
    runs the entry point in the project folder, not where the user (and Default's artifacts) are.
    """
    try:
        location = client.get_experiment(DEFAULT_EXPERIMENT_ID).artifact_location
    except MlflowException:
        return None
    if urlparse(location).scheme not in ("", "file"):
        return None
    folder = Path(urlparse(location).path).parent / re.sub(r"[^\w.-]", "_", name)
    return folder.as_uri()


def experiment_url(experiment_id: str) -> str:
    """Where the experiment's runs are in the UI, in its model-training view.

    MLflow 3.17's UI opens experiments in the view of its GenAI / Model training switch (kept in
    the browser, GenAI at first) and reads the experiment's kind tag only without that switch;
    `workflowType` in the address sets the switch.
    """
    uri = mlflow.get_tracking_uri()
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def chosen_experiment() -> str | None:
    """The experiment the user named (MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID), or None."""
    if name := os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return study_experiment(name)
    return os.environ.get("MLFLOW_EXPERIMENT_ID") or None


def use_experiment(experiment_id: str) -> None:
    """Make the experiment active for this process's runs (nested ones too), and for nothing else.

    mlflow.set_experiment also exports MLFLOW_EXPERIMENT_ID, which chosen_experiment would then take
    for the user's own choice: a second study in this process, or a child process on another store,
    would land in this one's experiment. The variable is put back as the user had it.
    """
    before = os.environ.get("MLFLOW_EXPERIMENT_ID")
    mlflow.set_experiment(experiment_id=experiment_id)
    if before is None:
        os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    else:
        os.environ["MLFLOW_EXPERIMENT_ID"] = before


def start_entry_run(*, run_name: str, tags: dict[str, str], experiment: str = "",
                    experiment_id: str = "") -> mlflow.ActiveRun:
    """An entry point's run: in the experiment the user named, else in `experiment` (a name) or `experiment_id`.

    `mlflow run` creates its run before this code starts and passes it as MLFLOW_RUN_ID. In an
    experiment the user named (--experiment-name/-id) that run is used as it is. In "Default",
    where `mlflow run` falls back when none is named, it is replaced: a new run in our experiment
    takes over its parameters and tags, and the original ends FINISHED, tagged with its
    replacement. `mlflow run` ends it once more when the command exits (and fails if it is
    deleted by then), so the next entry point's tidy_default deletes it.
    """
    client = mlflow.MlflowClient()
    tidy_default(client)
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    outer = client.get_run(launched) if launched else None
    if outer is not None:
        chosen = None if outer.info.experiment_id == DEFAULT_EXPERIMENT_ID else outer.info.experiment_id
    else:
        chosen = chosen_experiment()
    target = chosen or experiment_id or study_experiment(experiment)
    if EXPERIMENT_KIND_TAG not in client.get_experiment(target).tags:  # a user's experiment, or an older one
        client.set_experiment_tag(target, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    use_experiment(target)
    if outer is not None and chosen:
        return mlflow.start_run(run_id=launched, run_name=run_name, tags=tags)
    if outer is None:
        return mlflow.start_run(run_name=run_name, tags=tags)
    carried = {k: v for k, v in outer.data.tags.items() if k != "mlflow.runName"}
    run = mlflow.start_run(run_name=run_name, tags={**carried, **tags})
    mlflow.log_params(outer.data.params)
    handed_over = int(time.time() * 1000)
    client.set_tag(launched, MOVED_TAG, run.info.run_id)
    client.set_tag(launched, HANDED_OVER_TAG, str(handed_over))
    client.set_terminated(launched, "FINISHED", end_time=handed_over)
    return run


def tidy_default(client: mlflow.MlflowClient) -> list[str]:
    """Delete the runs start_entry_run replaced once their `mlflow run` has exited; returns their ids.

    `mlflow run` ends its run when its command exits, which moves the end time past the hand-over.
    """
    where = f"tags.`{MOVED_TAG}` LIKE '%' and attributes.status = 'FINISHED'"
    deleted = []
    for run in client.search_runs([DEFAULT_EXPERIMENT_ID], filter_string=where, max_results=1000):
        if (run.info.end_time or 0) > int(run.data.tags.get(HANDED_OVER_TAG, "0")):
            client.delete_run(run.info.run_id)
            deleted.append(run.info.run_id)
    return deleted


@contextlib.contextmanager
def study_run(config: dict[str, Any], *, storage: str, sampler: str) -> Iterator[mlflow.ActiveRun]:
    """The parent run `study-<name>` in the study's experiment (see start_entry_run). `storage` is redacted."""
    prepare_local_store()
    worker = f"{socket.gethostname()} seed {config['seed']} pid {os.getpid()}"
    tags = {ROLE_TAG: "study", STUDY_TAG: config["study"], WORKER_TAG: worker, "dataset": config["dataset"],
            "optuna.sampler": sampler, "optuna.storage": storage, "git_commit": git_commit()}
    launched = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run`'s run, which start_entry_run may keep
    run = start_entry_run(run_name=f"study-{config['study']}", tags=tags, experiment=config["study"])
    kept = launched is not None and run.info.run_id == launched  # then `mlflow run`, our parent, ends it too
    with _ending(run, launcher=os.getppid() if kept else None):
        # `mlflow run` already logged the raw -P values under their own names: resolved ones get a prefix.
        mlflow.log_params({f"config.{k}": v for k, v in config.items()})
        mlflow.log_dict(config, "config.json")
        yield run


@contextlib.contextmanager
def _ending(run: mlflow.ActiveRun, on_error: str = "FAILED", launcher: int | None = None) -> Iterator[None]:
    """End `run` as FINISHED, KILLED (Ctrl-C, SIGTERM) or FAILED, whatever happens inside.

    `launcher` is the pid of the `mlflow run` CLI that created the run, if any: see _kept_after_launcher.
    """
    status = on_error
    try:
        yield
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)
        if launcher and status == "KILLED":
            _kept_after_launcher(run.info.run_id, status, launcher)


# `mlflow run` sets its run's status after its child exits unless the run is already terminated, but
# its check (projects._maybe_set_run_terminated in mlflow 3.17) hands RunStatus.is_terminated a
# string, so it always overwrites: a Ctrl-C'd study would end FAILED. This waits, detached from the
# terminal's Ctrl-C, for the CLI to exit and sets the status back.
_RESTORE = """
import os, sys, time
pid, run_id, status = int(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.2)
import mlflow
mlflow.MlflowClient().set_terminated(run_id, status)
"""


def _kept_after_launcher(run_id: str, status: str, launcher: int) -> None:
    subprocess.Popen([sys.executable, "-c", _RESTORE, str(launcher), run_id, status], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def trial_run_name(number: int, spec: TrialSpec) -> str:
    return f"trial-{number:03d} {spec.short_name()}"


@contextlib.contextmanager
def trial_run(study: str, number: int, spec: TrialSpec, seed: int, extra_params: dict[str, Any]
              ) -> Iterator[mlflow.ActiveRun]:
    """A nested child run for one trial. Its end status follows how the trial ended."""
    tags = {ROLE_TAG: "trial", STUDY_TAG: study, TRIAL_TAG: str(number), STATE_TAG: "RUNNING", "arch": spec.arch,
            "aug": "on" if spec.augment else "off", "bn": "on" if spec.batch_norm else "off"}
    run = mlflow.start_run(run_name=trial_run_name(number, spec), nested=True, tags=tags)
    status = "FAILED"
    try:
        mlflow.log_params({**spec.params(), "seed": seed, **extra_params})
        yield run
        status = "FINISHED"
    except optuna.TrialPruned:
        mlflow.set_tag(STATE_TAG, "PRUNED")
        status = "FINISHED"  # pruning is the search working as meant, not a failure
        raise
    except KeyboardInterrupt:
        mlflow.set_tag(STATE_TAG, "FAIL")
        status = "KILLED"
        raise
    except BaseException:
        mlflow.set_tag(STATE_TAG, "FAIL")
        raise
    finally:
        mlflow.end_run(status)


def set_state(state: str) -> None:
    mlflow.set_tag(STATE_TAG, state)


IMAGES_SCHEMA = Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28, 1), "image"),
                        TensorSpec(np.dtype(np.int64), (-1,), "label")])


class SplitDataset(MetaDataset):
    """One split as an MLflow dataset: metadata only (the examples stay where they are), counts as its profile."""

    def __init__(self, spec: str, record, num_classes: int):
        self.record = record
        self.num_classes = num_classes
        super().__init__(LocalArtifactDatasetSource(record.location), name=spec, digest=record.digest,
                         schema=IMAGES_SCHEMA)

    @property
    def profile(self) -> dict[str, Any]:
        return {"num_rows": self.record.count, "num_classes": self.num_classes, "slice": self.record.slice}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def split_datasets(spec: str, records: list, num_classes: int) -> dict[str, SplitDataset]:
    """data.split_records as MLflow datasets, keyed by context (training, validation, test)."""
    return {r.context: SplitDataset(spec, r, num_classes) for r in records}


def log_datasets(datasets: dict[str, SplitDataset]) -> None:
    """The active run's inputs: the UI's Dataset column, with each split's context."""
    for context, dataset in datasets.items():
        mlflow.log_input(dataset, context=context)


def end_stale_trial_run(study: str, number: int, run_id: str | None = None) -> list[str]:
    """End a dead worker's trial run, and its study run if still RUNNING, as FAILED. Returns their ids.

    The run is the trial's `mlflow_run_id`, or (killed before it was recorded, or a retry still
    carrying its original's id) the RUNNING trial run tagged with this study and trial number.
    """
    client = mlflow.MlflowClient()
    runs = []
    if run_id:
        run = client.get_run(run_id)
        if run.data.tags.get(STUDY_TAG) == study and run.data.tags.get(TRIAL_TAG) == str(number):
            runs = [run]
    if not runs:
        where = (f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = {quoted(study)} and "
                 f"tags.`{TRIAL_TAG}` = '{number}' and attributes.status = 'RUNNING'")
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=where, output_format="list")
    ended = []
    for run in runs:
        parent = run.data.tags.get("mlflow.parentRunId")
        for rid in [run.info.run_id] + ([parent] if parent else []):
            if client.get_run(rid).info.status == "RUNNING":
                client.set_tag(rid, "emnist.ended_by", "heartbeat: its worker stopped")
                if rid == run.info.run_id:
                    client.set_tag(rid, STATE_TAG, "FAIL")
                client.set_terminated(rid, "FAILED")
                ended.append(rid)
    return ended


class EpochLogger(keras.callbacks.Callback):
    """Per-epoch train/validation loss and accuracy, the learning rate and the epoch's seconds as step metrics.

    They are named epoch_<keras name>; the plain names hold each trial's final values.
    """

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {f"epoch_{k}": float(v) for k, v in (logs or {}).items() if np.isfinite(float(v))}
        metrics["epoch_seconds"] = time.perf_counter() - self.started  # training and validation
        mlflow.log_metrics(metrics, step=epoch)


def _pip_requirements() -> list[str]:
    import tensorflow as tf  # noqa: PLC0415

    # Named explicitly: MLflow's own inference loads the model in a subprocess, slow on 2 cores.
    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"numpy=={np.__version__}"]


def log_keras_model(model: keras.Model, classes: tuple[str, ...], example: np.ndarray) -> str:
    """The model as an MLflow LoggedModel (raw-pixel input, signature, class list); returns its model id."""
    example = example.astype(np.float32)
    signature = infer_signature(example, model.predict(example, verbose=0))
    # No input_example: mlflow 3.17's keras log_model writes it before it creates the model folder
    # and fails (mlflow#16183). The signature alone still makes a LoggedModel.
    info = mlflow.keras.log_model(model, name=MODEL_NAME, signature=signature, pip_requirements=_pip_requirements(),
                                  metadata=serving.classes_metadata(classes))
    return info.model_id


def save_predictions(path: Path, classes: tuple[str, ...], **arrays: np.ndarray | None) -> None:
    """Probabilities as float16 with uint8 labels: ~100 bytes an image for 47 classes."""
    packed = {k: (v.astype(np.float16) if k.endswith("_probs") else v.astype(np.uint8))
              for k, v in arrays.items() if v is not None}
    np.savez_compressed(path, classes=np.array(list(classes)), **packed)


def log_trial_result(result, spec: TrialSpec, classes: tuple[str, ...], *, param_count: int,
                     model_id: str | None = None, datasets: dict[str, SplitDataset] | None = None,
                     test_images: np.ndarray | None = None, wrong_index: np.ndarray | None = None) -> None:
    """Final metrics, compact predictions and the plots of one finished trial.

    The accuracies are linked to the trial's LoggedModel and to the split they were measured on,
    so `mlflow.search_logged_models(order_by=[{"field_name": "metrics.val_accuracy"}])` ranks the models.
    """
    datasets = datasets or {}
    mlflow.log_metrics({"epochs_run": result.epochs_run, "train_seconds": result.seconds, "param_count": param_count,
                        "seconds_per_epoch": result.seconds / max(1, result.epochs_run)})
    mlflow.log_metrics({"val_accuracy": result.val_accuracy}, model_id=model_id, dataset=datasets.get("validation"))
    if result.test_accuracy is not None:
        mlflow.log_metrics({"test_accuracy": result.test_accuracy}, model_id=model_id, dataset=datasets.get("test"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PREDICTIONS
        save_predictions(path, classes, val_probs=result.val_probs, val_labels=result.val_labels,
                         test_probs=result.test_probs, test_labels=result.test_labels)
        mlflow.log_artifact(str(path))
    log_figure(plots.learning_curve(result.history), "plots/learning_curve.png")
    if result.test_probs is not None:
        predicted = result.test_probs.argmax(axis=1)
        log_figure(plots.confusion(result.test_labels, predicted, classes), "plots/confusion_matrix.png")
        if test_images is not None and wrong_index is not None:
            log_figure(plots.misclassified(test_images, result.test_labels[wrong_index],
                                           predicted[wrong_index], classes), "plots/misclassified.png")


def artifact_write_error(exc: OSError) -> UserError:
    """One sentence for an artifact store that refuses a write."""
    where = f" ({exc.filename})" if exc.filename else ""
    return UserError(f"cannot write artifacts to {mlflow.get_artifact_uri()}: {exc.strerror or exc}{where}; "
                     "check the artifact store's space and permissions, then rerun to continue the study.")


def log_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_study_summary(study: optuna.Study) -> None:
    """Best trial, a CSV of all trials, and Optuna's history and importance plots on the parent."""
    frame = study.trials_dataframe()
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    mlflow.log_text(buffer.getvalue(), "trials.csv")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    mlflow.log_metrics({"n_trials": len(study.trials), "n_complete": len(complete)})
    if not complete:
        return
    best = study.best_trial
    mlflow.log_dict({"number": best.number, "value": best.value, "params": best.params,
                     "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, "best_trial.json")
    mlflow.log_metric("best_val_accuracy", best.value)
    mlflow.set_tag("best_trial", str(best.number))
    from optuna.visualization import matplotlib as ovm  # noqa: PLC0415

    log_figure(ovm.plot_optimization_history(study).figure, "plots/optimization_history.png")
    if len(complete) >= 2:
        try:
            with warnings.catch_warnings():  # a study whose parameters barely matter has nothing to label
                warnings.filterwarnings("ignore", message="No artists with labels found")
                figure = ovm.plot_param_importances(study).figure
            log_figure(figure, "plots/param_importances.png")
        except (ValueError, RuntimeError) as exc:  # e.g. every trial had the same parameters
            print(f"note: no parameter-importance plot ({exc})")


# ---- reading the store back: studies, trial runs, their predictions -------------------------------


def latest_study() -> str | None:
    """The study of the most recently started study run, across experiments."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{ROLE_TAG}` = 'study'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    return runs[0].data.tags.get(STUDY_TAG) if runs else None


def finished_trials(*, study: str | None = None, experiment: str | None = None,
                    run_ids: list[str] | None = None) -> list[mlflow.entities.Run]:
    """COMPLETE trial runs, best validation accuracy first."""
    if run_ids:
        return sorted((finished_trial(r) for r in run_ids),
                      key=lambda r: r.data.metrics.get("val_accuracy", float("-inf")), reverse=True)
    where = [f"tags.`{ROLE_TAG}` = 'trial'", f"tags.`{STATE_TAG}` = 'COMPLETE'", "attributes.status = 'FINISHED'"]
    if study:
        where.append(f"tags.`{STUDY_TAG}` = {quoted(study)}")
    kwargs: dict[str, Any] = {"search_all_experiments": True}
    if experiment:
        kwargs = {"experiment_ids": [experiment_id(experiment)]}
    return mlflow.search_runs(filter_string=" and ".join(where), order_by=["metrics.val_accuracy DESC"],
                              output_format="list", **kwargs)


def finished_trial(run_id: str) -> mlflow.entities.Run:
    """A COMPLETE trial run by id; anything else (no such run, a study or ensemble run) is a UserError."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise UserError(f"there is no run {run_id} in the tracking store {mlflow.get_tracking_uri()}.") from None
    role, state = run.data.tags.get(ROLE_TAG), run.data.tags.get(STATE_TAG)
    if role != "trial":
        raise UserError(f"run {run_id} is not a trial run (its {ROLE_TAG} tag is {role or 'missing'}): "
                        "pass the ids of finished trial runs.")
    if state != "COMPLETE" or run.info.status != "FINISHED":
        raise UserError(f"trial run {run_id} did not complete (state {state}, status {run.info.status}).")
    return run


def experiment_id(name_or_id: str) -> str:
    """The id of an experiment given by name (or by id); a UserError when there is none."""
    found = mlflow.get_experiment_by_name(name_or_id)
    if found is None:
        try:
            found = mlflow.get_experiment(name_or_id)
        except mlflow.exceptions.MlflowException:
            raise UserError(f"there is no experiment {name_or_id!r} in the tracking store "
                            f"{mlflow.get_tracking_uri()}.") from None
    return found.experiment_id


def load_predictions(run_id: str) -> dict[str, np.ndarray] | None:
    """A trial's logged predictions (float16 probabilities, uint8 labels), or None if it has none."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS)
    except Exception:  # noqa: BLE001 (missing artifact: the caller falls back to inference)
        return None
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def download_model(run_id: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_NAME)


def load_keras_model(run_id: str) -> keras.Model:
    """A trial's Keras model itself, to build the ensemble graph from; scoring goes through serving.load_model."""
    return mlflow.keras.load_model(model_uri(run_id))


def model_uri(run_id: str) -> str:
    """The URI of a trial run's logged model, for serving.load_model."""
    return f"runs:/{run_id}/{MODEL_NAME}"


ENSEMBLE_MODEL = "emnist-ensemble"
ENSEMBLE_OUTPUTS = Schema([ColSpec("long", "image"), ColSpec("long", "rank"), ColSpec("long", "class_index"),
                           ColSpec("string", "character"), ColSpec("double", "probability")])  # serving.ranked_frame


def log_ensemble(*, experiment_id: str, study: str | None, strategy: str, members: list[str],
                 weights: np.ndarray | None, classes: tuple[str, ...], metrics: dict[str, float],
                 tables: dict[str, str], figures: dict[str, Any], register: bool = True,
                 graph: keras.Model | None = None) -> tuple[str, str | None]:
    """The ensemble run: members, weights, metrics, tables, plots, the voting pyfunc model, and
    `graph` (the vote as one Keras model) as graph/ensemble.keras and a SavedModel in graph/saved_model.

    Returns the run id and the registered version (None when not registered).
    """
    package = str(Path(__file__).resolve().parent)
    tags = {ROLE_TAG: "ensemble", "ensemble.strategy": strategy, "ensemble.members": ",".join(members)}
    if study:
        tags[STUDY_TAG] = study
    name = f"ensemble-{study or 'runs'} {strategy} x{len(members)}"
    with start_entry_run(run_name=name, tags=tags, experiment_id=experiment_id) as run:
        mlflow.log_params({"strategy": strategy, "n_members": len(members), "members": ",".join(members)})
        mlflow.log_dict({"members": members, "weights": None if weights is None else weights.tolist(),
                         "strategy": strategy}, "ensemble.json")
        for path, text in tables.items():
            mlflow.log_text(text, path)
        for path, fig in figures.items():
            log_figure(fig, path)
        if graph is not None:
            log_graph(graph, classes)
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "ensemble.json"
            spec_path.write_text(json.dumps({"strategy": strategy, "members": len(members), "classes": list(classes),
                                             "weights": None if weights is None else weights.tolist()}))
            artifacts = {"ensemble": str(spec_path)}
            artifacts.update({f"member_{i}": download_model(r) for i, r in enumerate(members)})
            # No input schema: it would pin one dtype, and the model takes uint8 and float alike.
            params = ParamSchema([ParamSpec("top_k", "long", 1)])  # REST clients ask for a top-k this way
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(package) / "ensemble_model.py"), artifacts=artifacts,
                code_paths=[package], signature=ModelSignature(inputs=None, outputs=ENSEMBLE_OUTPUTS, params=params),
                input_example=np.zeros((2, 28, 28), np.uint8),
                pip_requirements=_pip_requirements() + [f"mlflow=={mlflow.__version__}", "pandas", "scipy"],
                metadata=serving.classes_metadata(classes),
                registered_model_name=ENSEMBLE_MODEL if register else None,
            )
        # After the model, so that the ensemble's LoggedModel carries its accuracies.
        mlflow.log_metrics(metrics, model_id=info.model_id)
        version = getattr(info, "registered_model_version", None)
        return run.info.run_id, None if version is None else str(version)


GRAPH = "graph"


def log_graph(graph: keras.Model, classes: tuple[str, ...]) -> None:
    """The one-graph ensemble for TF Serving and TFLite: .keras, SavedModel (`serve`), class list."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / GRAPH
        folder.mkdir()
        graph.save(folder / "ensemble.keras")
        graph.export(str(folder / "saved_model"), verbose=False)
        (folder / "classes.json").write_text(json.dumps(list(classes)))
        mlflow.log_artifacts(str(folder), GRAPH)


def download_graph(run_id: str) -> Path:
    """The ensemble run's graph folder: ensemble.keras, saved_model/, classes.json."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=GRAPH))


# ---- the registry, a study's runs and reports written into them (predict, report) -----------------


def latest_version(name: str) -> str | None:
    """The highest version of a registered model, or None when it has none."""
    versions = mlflow.MlflowClient().search_model_versions(f"name = {quoted(name)}")
    return str(max(int(v.version) for v in versions)) if versions else None


def study_runs(study: str, role: str) -> list[mlflow.entities.Run]:
    """Every run of a study with the given role (study, trial, ensemble), in any state, newest first."""
    where = f"tags.`{ROLE_TAG}` = {quoted(role)} and tags.`{STUDY_TAG}` = {quoted(study)}"
    return mlflow.search_runs(search_all_experiments=True, filter_string=where,
                              order_by=["attributes.start_time DESC"], output_format="list")


def log_to_run(run_id: str, texts: dict[str, str], figures: dict[str, Any]) -> str:
    """Text files and figures as artifacts of an existing run, finished or not; returns its artifact URI."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    client = mlflow.MlflowClient()
    for path, text in texts.items():
        client.log_text(run_id, text, path)
    for path, fig in figures.items():
        client.log_figure(run_id, fig, path)
        plt.close(fig)
    return client.get_run(run_id).info.artifact_uri
