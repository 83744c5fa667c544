"""The saved runs view that the printed address opens, written into a real (temporary) tracking store."""

from __future__ import annotations

import json

import mlflow

from emnist_exp.tracking import experiments, views


def test_the_study_experiment_holds_the_view_that_its_printed_address_names(workdir):
    experiment = experiments.study_experiment("viewcheck")
    views.write_runs_view(experiment)
    tags = mlflow.MlflowClient().get_experiment(experiment).tags
    envelope = json.loads(tags[f"mlflow.sharedViewState.{views.RUNS_VIEW_KEY}"])
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"}  # what the UI's saved-view reader requires
    state = json.loads(envelope["state"])
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_accuracy`", False)
    assert "params.`augment`" in state["selectedColumns"] and "metrics.`test_accuracy`" in state["selectedColumns"]
    address = experiments.experiment_url(experiment)
    assert address.endswith(f"/#/experiments/{experiment}/runs?viewStateShareKey={views.RUNS_VIEW_KEY}"
                            "&workflowType=machine_learning")


def test_a_view_the_user_changed_in_the_ui_is_kept(workdir):
    experiment = experiments.study_experiment("viewkept")
    client = mlflow.MlflowClient()
    key = f"mlflow.sharedViewState.{views.RUNS_VIEW_KEY}"
    client.set_experiment_tag(experiment, key, '{"name": "mine", "createdAt": 1, "state": "{}"}')
    views.write_runs_view(experiment)
    assert json.loads(client.get_experiment(experiment).tags[key])["name"] == "mine"
