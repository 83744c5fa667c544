"""Experiments: a study's own (model-training view, artifacts beside Default's), the user's choice, the UI address."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException

from emnist_exp.errors import UserError
from emnist_exp.redaction import redact
from emnist_exp.tracking.views import RUNS_VIEW_KEY

# The MLflow 3 UI opens an experiment in the view this tag names (its JS bundle reads
# `mlflow.experimentKind`); without it an experiment may open on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"  # the UI's "Machine learning" view
DEFAULT_EXPERIMENT_ID = "0"  # "Default": where `mlflow run` puts its run when no experiment is named


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
    """Where the experiment's curated runs table is in the UI (views.write_runs_view), in the model-training view.

    MLflow 3.17's UI shows the GenAI or the Model training side of its sidebar switch: the address's
    `workflowType` if it has one, else the browser's localStorage (`mlflow.workflowType_v1`, GenAI until
    the user clicks the switch). Links inside the UI (a run, the breadcrumb) carry no `workflowType`,
    and nothing a server or store holds reaches that localStorage, so only the click makes it stick.
    """
    uri = redact(mlflow.get_tracking_uri())
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}&workflowType=machine_learning"


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


def experiment_id(name_or_id: str) -> str:
    """The id of an experiment given by name (or by id); a UserError when there is none."""
    found = mlflow.get_experiment_by_name(name_or_id)
    if found is None:
        try:
            found = mlflow.get_experiment(name_or_id)
        except mlflow.exceptions.MlflowException:
            raise UserError(f"there is no experiment {name_or_id!r} in the tracking store "
                            f"{redact(mlflow.get_tracking_uri())}.") from None
    return found.experiment_id
