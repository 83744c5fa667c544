"""The study's curated runs table: a saved view of MLflow's runs page, which the printed address opens.

MLflow 3.17's UI keeps a saved ("shared") view as the experiment tag `mlflow.sharedViewState.<key>`
and opens it for `?viewStateShareKey=<key>` on the runs page; it also lists it under "Views". The tag
holds an envelope `{name, createdAt, updatedAt, state}` whose `state` is the JSON of the page's
search facets (sort, filter) and table settings (columns), as the UI's own "Save view" writes it.
"""

from __future__ import annotations

import json
import time

import mlflow

SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
RUNS_VIEW_KEY = "trials"
RUNS_VIEW_NAME = "Trials by validation accuracy"
# What the trials differ in (the demo space's switches, and every space's learning rate), beside the accuracies.
VIEW_PARAMS = ["arch", "width", "augment", "dropout", "batch_norm", "learning_rate"]
VIEW_METRICS = ["val_accuracy", "test_accuracy"]


def column(kind: str, key: str) -> str:
    """A runs-table column id as the UI names it: attributes.`Models`, metrics.`val_accuracy`."""
    return f"{kind}.`{key}`"


def runs_view_state() -> dict:
    """Sorted by validation accuracy, best first. A sort other than by start time also lays the
    nested trials out flat under one another (the UI nests children only when sorted by time)."""
    return {
        "searchFilter": "", "orderByKey": column("metrics", "val_accuracy"), "orderByAsc": False,
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [], "modelVersionFilter": "All Runs",
        "selectedColumns": [*(column("metrics", m) for m in VIEW_METRICS), *(column("params", p) for p in VIEW_PARAMS),
                            column("attributes", "Models")],
    }


def write_runs_view(experiment_id: str) -> None:
    """Save the curated view in the experiment unless it is there already (a user may have changed it in the UI)."""
    client = mlflow.MlflowClient()
    key = SHARED_VIEW_PREFIX + RUNS_VIEW_KEY
    if key in client.get_experiment(experiment_id).tags:
        return
    now = int(time.time() * 1000)
    envelope = {"name": RUNS_VIEW_NAME, "createdAt": now, "updatedAt": now, "state": json.dumps(runs_view_state())}
    try:
        client.set_experiment_tag(experiment_id, key, json.dumps(envelope))
    except mlflow.exceptions.MlflowException:
        # Workers starting together race to write it; on PostgreSQL the loser's insert is a unique-key
        # violation. The view another worker wrote is the same one: only a missing view is an error.
        if key not in client.get_experiment(experiment_id).tags:
            raise
