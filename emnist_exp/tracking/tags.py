"""The tags by which the project finds its runs, and how to put a value into an MLflow search filter."""

from __future__ import annotations

from emnist_exp.errors import UserError

ROLE_TAG = "emnist.role"  # study | trial | ensemble
STUDY_TAG = "optuna.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
WORKER_TAG = "worker"  # host, seed and process of the worker behind a study run
PRECISION_TAG = "precision"  # the Keras dtype policy a study's trials trained in (its `precision` resolved)
STOPPED_TAG = "emnist.stopped_by"  # on a trial run: SIGTERM, SIGINT or timeout (a preemption, retried)
RESUMED_TAG = "emnist.resumed"  # on a trial run that a retry reopened: which trial went on from which epoch
PARENT_TAG = "mlflow.parentRunId"
MOVED_TAG = "emnist.moved_to"  # on `mlflow run`'s own run in Default: the run that replaced it
HANDED_OVER_TAG = "emnist.handed_over_ms"  # ... and when (the end time it got then)


def quoted(value: str) -> str:
    """A string literal for an MLflow filter. MLflow's filter parser has no escape character, so the
    value goes in whichever quote it does not contain (config refuses study names holding both)."""
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise UserError(f"{value!r} holds both ' and \", which no MLflow search filter can match.")
