"""The run lifecycle: the study's parent run, one nested run per trial (ended as endings says), per-epoch metrics."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import keras
import mlflow
import numpy as np
from mlflow.entities import RunTag

from emnist_exp import plots
from emnist_exp.spec import TrialSpec
from emnist_exp.tracking import endings
from emnist_exp.tracking.launcher import kept_after_launcher, start_entry_run
from emnist_exp.tracking.store import prepare_local_store
from emnist_exp.tracking.tags import (PARENT_TAG, PRECISION_TAG, RESUMED_TAG, ROLE_TAG, STATE_TAG, STUDY_TAG,
                                      TRIAL_TAG, WORKER_TAG)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def study_run(config: dict[str, Any], *, storage: str, sampler: str, policy: str = "float32"
              ) -> Iterator[mlflow.ActiveRun]:
    """The parent run `study-<name>` in the study's experiment (see start_entry_run). `storage` is redacted;
    `policy` is the Keras dtype policy config["precision"] resolved to on this worker."""
    prepare_local_store()
    worker = f"{socket.gethostname()} seed {config['seed']} pid {os.getpid()}"
    tags = {ROLE_TAG: "study", STUDY_TAG: config["study"], WORKER_TAG: worker, "dataset": config["dataset"],
            "optuna.sampler": sampler, "optuna.storage": storage, "git_commit": git_commit(), PRECISION_TAG: policy}
    launched = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run`'s run, which start_entry_run may keep
    run = start_entry_run(run_name=f"study-{config['study']}", tags=tags, experiment=config["study"])
    kept = launched is not None and run.info.run_id == launched  # then `mlflow run`, our parent, ends it too
    with _study_ending(storage, run.info.run_id, launcher=os.getppid() if kept else None):
        # `mlflow run` already logged the raw -P values under their own names: resolved ones get a prefix.
        mlflow.log_params({**{f"config.{k}": v for k, v in config.items()}, "precision_policy": policy})
        mlflow.log_dict(config, "config.json")
        yield run


@contextlib.contextmanager
def _study_ending(storage: str, run_id: str, launcher: int | None) -> Iterator[None]:
    """The study run ends as endings.outcome says; a store lost mid-study is one sentence (endings.store_lost_error).

    `launcher` is the pid of the `mlflow run` CLI that created the run, if any: see kept_after_launcher.
    """
    try:
        with endings.ending():
            yield
    except BaseException as error:
        if launcher and endings.outcome(error)[0] == "KILLED":
            kept_after_launcher(run_id, "KILLED", launcher)
        lost = endings.store_lost_error(error, storage) if isinstance(error, Exception) else None
        if lost is not None:
            raise lost from None
        raise


RUN_COLOUR_TAG = "mlflow.runColor"  # the UI's colour for a run in its charts and table


def trial_run_name(number: int, spec: TrialSpec) -> str:
    """What differs first, so it shows in the UI's narrow Run Name column; the trial number last."""
    return f"{spec.short_name()} #{number:03d}"


@contextlib.contextmanager
def trial_run(study: str, number: int, spec: TrialSpec, seed: int, extra_params: dict[str, Any],
              policy: str = "float32", reopen: str | None = None) -> Iterator[mlflow.ActiveRun]:
    """A nested child run for one trial, trained in the Keras dtype `policy`. It ends as the trial did.

    `reopen`: the run of the trial this one resumes. Its learning curve goes on in that run, which
    moves under this worker's study run and takes this trial's number, so that whoever finds this
    trial lost later ends the right runs (endings.end_stale_trial_run).
    """
    tags = {ROLE_TAG: "trial", STUDY_TAG: study, TRIAL_TAG: str(number), STATE_TAG: "RUNNING", "arch": spec.arch,
            "aug": "on" if spec.augment else "off", "bn": "on" if spec.batch_norm else "off", PRECISION_TAG: policy,
            RUN_COLOUR_TAG: plots.trial_colour(number)}
    if reopen:
        tags[PARENT_TAG] = mlflow.active_run().info.run_id
        # Retagged before it is RUNNING again: end_abandoned_runs must never see it RUNNING under the lost trial.
        mlflow.MlflowClient().log_batch(reopen, tags=[RunTag(k, v) for k, v in tags.items()])
        run = mlflow.start_run(run_id=reopen, nested=True, tags=tags)
    else:
        run = mlflow.start_run(run_name=trial_run_name(number, spec), nested=True, tags=tags)
    with endings.ending(trial=True):
        if not reopen:  # a reopened run has them, from the same parameters and seed
            mlflow.log_params({**spec.params(), "seed": seed, "precision_policy": policy, **extra_params})
        yield run


def mark_resumed(number: int, resumed_from: int, epoch: int, history: dict[str, list[float]]) -> None:
    """Note on the active (reopened) run that trial `number` goes on from `epoch`, and log the epochs its
    checkpoint holds that the run lacks (a worker stopped between saving an epoch and logging it)."""
    run_id = mlflow.active_run().info.run_id
    mlflow.set_tag(RESUMED_TAG, f"trial {number} from epoch {epoch + 1} (trial {resumed_from}'s checkpoint)")
    logged = {m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch_loss")}
    for step in range(epoch):
        if step not in logged:
            metrics = {f"epoch_{k}": v[step] for k, v in history.items() if len(v) > step and np.isfinite(v[step])}
            mlflow.log_metrics(metrics, step=step)


def set_state(state: str) -> None:
    mlflow.set_tag(STATE_TAG, state)


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
