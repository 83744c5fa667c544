"""Reading the store back: the latest study, its finished trials, a study's runs by role."""

from __future__ import annotations

from typing import Any

import mlflow

from emnist_exp.errors import UserError
from emnist_exp.redaction import redact
from emnist_exp.tracking.experiments import experiment_id
from emnist_exp.tracking.tags import ROLE_TAG, STATE_TAG, STUDY_TAG, quoted


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
        where = redact(mlflow.get_tracking_uri())
        raise UserError(f"there is no run {run_id} in the tracking store {where}.") from None
    role, state = run.data.tags.get(ROLE_TAG), run.data.tags.get(STATE_TAG)
    if role != "trial":
        raise UserError(f"run {run_id} is not a trial run (its {ROLE_TAG} tag is {role or 'missing'}): "
                        "pass the ids of finished trial runs.")
    if state != "COMPLETE" or run.info.status != "FINISHED":
        raise UserError(f"trial run {run_id} did not complete (state {state}, status {run.info.status}).")
    return run


def study_runs(study: str, role: str) -> list[mlflow.entities.Run]:
    """Every run of a study with the given role (study, trial, ensemble), in any state, newest first."""
    where = f"tags.`{ROLE_TAG}` = {quoted(role)} and tags.`{STUDY_TAG}` = {quoted(study)}"
    return mlflow.search_runs(search_all_experiments=True, filter_string=where,
                              order_by=["attributes.start_time DESC"], output_format="list")


def ensemble_run(run_id: str) -> mlflow.entities.Run:
    """An ensemble run by id; anything else (no such run, a trial run) is a UserError."""
    try:
        run = mlflow.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        where = redact(mlflow.get_tracking_uri())
        raise UserError(f"there is no run {run_id} in the tracking store {where}.") from None
    role = run.data.tags.get(ROLE_TAG)
    if role != "ensemble":
        raise UserError(f"run {run_id} is not an ensemble run (its {ROLE_TAG} tag is {role or 'missing'}): "
                        "pass the run id that `python -m emnist_exp.ensemble` printed.")
    return run


def latest_ensemble(study: str) -> mlflow.entities.Run | None:
    """The study's most recent finished ensemble run, or None."""
    done = [r for r in study_runs(study, "ensemble") if r.info.status == "FINISHED"]
    return done[0] if done else None
