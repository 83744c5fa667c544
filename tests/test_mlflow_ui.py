"""What `mlflow ui` shows after the README's commands, read back through what the UI reads: the
tracking store (MlflowClient) and the LoggedModels (mlflow.search_logged_models)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from emnist_exp import data, plots
from emnist_exp.tracking import experiments, queries, tags, views
from emnist_exp.classes import BYMERGE_CLASSES

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STUDY = "uiquick"
# A warning on the console: Python's warnings, absl/glog W and E lines, MLflow's WARNING lines.
WARNING_LINE = re.compile(r"(?i)warn|^[WE]\d{4} ")


def run(command: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def warning_lines(*outputs: subprocess.CompletedProcess) -> list[str]:
    return [line for out in outputs for line in (out.stdout + out.stderr).splitlines() if WARNING_LINE.search(line)]


# Each test here trains through `mlflow run`, starts a server or imports TensorFlow in a subprocess.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(workdir) -> dict:
    """`make demo`'s two commands, shrunk (3 trials of 2 epochs on 600 images), with no experiment named anywhere."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID")}
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    train = run([str(BIN / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
                 "-P", "preset=quick", "-P", f"study={STUDY}", "-P", "dataset=synthetic:600", "-P", "n_trials=3",
                 "-P", "epochs=2", "-P", "pruner=none", "-P", f"storage=sqlite:///{workdir / 'optuna.db'}"], env, workdir)
    ensemble = run([sys.executable, "-m", "emnist_exp.ensemble", "--study", STUDY, "--top", "3"], env, workdir)
    return {"train": train, "ensemble": ensemble}


def test_mlflow_run_puts_the_study_in_its_own_experiment_for_the_model_training_view(demo):
    client = MlflowClient()
    experiment = client.get_experiment_by_name(STUDY)
    assert experiment is not None
    assert experiment.tags[experiments.EXPERIMENT_KIND_TAG] == "custom_model_development"
    runs = [*queries.study_runs(STUDY, "study"), *queries.study_runs(STUDY, "trial"),
            *queries.study_runs(STUDY, "ensemble")]
    assert len(runs) == 1 + 3 + 1
    assert {r.info.experiment_id for r in runs} == {experiment.experiment_id}
    parent = queries.study_runs(STUDY, "study")[0]
    assert parent.info.run_name == f"study-{STUDY}"
    assert parent.data.tags[tags.WORKER_TAG].startswith(f"{socket.gethostname()} seed 0 pid ")
    assert parent.data.tags["mlflow.project.entryPoint"] == "train"  # `mlflow run`'s tags came along
    assert parent.data.params["preset"] == "quick" and parent.data.params["config.epochs"] == "2"
    # `mlflow run`'s own run in Default handed over to the parent; the ensemble's start deleted it.
    default = client.search_runs([experiments.DEFAULT_EXPERIMENT_ID], run_view_type=mlflow.entities.ViewType.ALL)
    replaced = [r for r in default if r.data.tags.get(tags.MOVED_TAG) == parent.info.run_id]
    assert len(replaced) == 1 and replaced[0].info.lifecycle_stage == "deleted"
    assert replaced[0].info.status == "FINISHED"
    assert replaced[0].info.end_time > int(replaced[0].data.tags[tags.HANDED_OVER_TAG])  # `mlflow run` ended it
    assert client.search_runs([experiments.DEFAULT_EXPERIMENT_ID], f"tags.`{tags.MOVED_TAG}` LIKE '%'") == []


def test_the_demo_trials_are_distinct_variants_named_by_what_differs_first(demo):
    trials = queries.study_runs(STUDY, "trial")
    names = sorted(t.info.run_name for t in trials)
    assert len(set(names)) == 3, names
    variants = {tuple(t.data.params[p] for p in ("arch", "augment", "batch_norm", "dropout")) for t in trials}
    assert len(variants) == 3 and len({v[0] for v in variants}) >= 2  # architectures differ too
    for trial in trials:
        params, number = trial.data.params, int(trial.data.tags[tags.TRIAL_TAG])
        assert trial.info.run_name.startswith(f"{params['arch']}-{params['width']} ")
        assert trial.info.run_name.endswith(f" #{number:03d}")
        assert trial.data.tags["mlflow.runColor"] == plots.trial_colour(number)


def test_the_printed_address_opens_a_saved_view_of_the_trials_sorted_by_validation_accuracy(demo):
    experiment = MlflowClient().get_experiment_by_name(STUDY)
    envelope = json.loads(experiment.tags[views.SHARED_VIEW_PREFIX + views.RUNS_VIEW_KEY])
    assert envelope["name"] == views.RUNS_VIEW_NAME and isinstance(envelope["createdAt"], int)
    state = json.loads(envelope["state"])  # the UI parses the state as JSON (or inflates it when it starts "deflate;")
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val_accuracy`", False)
    # Every column the view shows is filled for every trial: the names match what the trials log.
    trials = queries.study_runs(STUDY, "trial")
    shown = [re.fullmatch(r"(\w+)\.`(.+)`", c).groups() for c in state["selectedColumns"]]
    assert {k for kind, k in shown if kind == "params"} >= {"arch", "augment", "dropout", "batch_norm", "learning_rate"}
    assert {k for kind, k in shown if kind == "metrics"} == {"val_accuracy", "test_accuracy"}
    for trial in trials:
        for kind, key in shown:
            if kind in ("params", "metrics"):
                assert key in getattr(trial.data, kind), (kind, key)
    assert f"viewStateShareKey={views.RUNS_VIEW_KEY}&" in demo["ensemble"].stdout


def test_every_trial_run_has_its_three_splits_as_dataset_inputs(demo):
    splits = data.load_splits("synthetic:600")
    expected = {r.context: r for r in data.split_records(splits)}
    assert set(expected) == {"training", "validation", "test"}
    assert len({r.digest for r in expected.values()}) == 3
    for trial in queries.study_runs(STUDY, "trial"):
        inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset
                  for i in trial.inputs.dataset_inputs}
        assert set(inputs) == set(expected)
        for context, dataset in inputs.items():
            record = expected[context]
            assert dataset.name == "synthetic:600" and dataset.digest == record.digest
            assert json.loads(dataset.source) == {"uri": record.location}
            profile = json.loads(dataset.profile)
            assert profile == {"num_rows": record.count, "num_classes": 47, "slice": record.slice}
        assert int(trial.data.params["n_train"]) == expected["training"].count


def test_trial_models_are_logged_models_ranked_by_validation_accuracy(demo):
    experiment = MlflowClient().get_experiment_by_name(STUDY).experiment_id
    trials = {r.info.run_id: r for r in queries.study_runs(STUDY, "trial")}
    models = mlflow.search_logged_models(experiment_ids=[experiment], output_format="list",
                                         filter_string="name = 'model'",
                                         order_by=[{"field_name": "metrics.val_accuracy", "ascending": False}])
    trial_models = [m for m in models if m.source_run_id in trials]
    assert {m.source_run_id for m in trial_models} == set(trials)
    values = []
    for model in trial_models:
        linked = {m.key: m for m in model.metrics}
        run = trials[model.source_run_id]
        assert linked["val_accuracy"].value == pytest.approx(run.data.metrics["val_accuracy"])
        assert linked["test_accuracy"].value == pytest.approx(run.data.metrics["test_accuracy"])
        assert linked["val_accuracy"].dataset_digest == data.split_records(data.load_splits("synthetic:600"))[1].digest
        values.append(linked["val_accuracy"].value)
        info = mlflow.models.get_model_info(f"models:/{model.model_id}")
        assert info.signature is not None and info.metadata["classes"] == list(BYMERGE_CLASSES)
    assert values == sorted(values, reverse=True)


def test_a_trial_models_epoch_metrics_are_those_of_the_epoch_its_weights_come_from(demo):
    """EarlyStopping keeps the best epoch's weights; the LoggedModel shows that epoch, not the run's first."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(STUDY).experiment_id
    trials = {r.info.run_id: r for r in queries.study_runs(STUDY, "trial")}
    models = [m for m in mlflow.search_logged_models(experiment_ids=[experiment], output_format="list")
              if m.source_run_id in trials]
    assert len(models) == len(trials) == 3
    for model in models:
        run = trials[model.source_run_id]
        history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "epoch_val_accuracy"),
                                           key=lambda m: m.step)]
        assert len(history) == 2
        best = history.index(max(history))  # EarlyStopping's restore: the first best epoch
        linked = {m.key: m for m in model.metrics}
        for key in ("epoch_val_accuracy", "epoch_accuracy", "epoch_loss", "epoch_val_loss"):
            steps = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
            assert (linked[key].step, linked[key].value) == (best, steps[best]), key
        # the epoch's accuracy as Keras measured it is the model's final val_accuracy (predicted again after fit)
        assert linked["epoch_val_accuracy"].value == pytest.approx(run.data.metrics["val_accuracy"], abs=1e-6)


def test_the_ensemble_is_a_logged_model_that_loads_without_warnings_and_answers_top_k(demo):
    ensemble = queries.study_runs(STUDY, "ensemble")[0]
    models = mlflow.search_logged_models(filter_string=f"source_run_id = '{ensemble.info.run_id}'",
                                         experiment_ids=[ensemble.info.experiment_id], output_format="list")
    assert len(models) == 1
    assert {m.key for m in models[0].metrics} >= {"val_accuracy", "test_accuracy"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(f"models:/{models[0].model_id}")
        images = data.images_at(data.load_splits("synthetic:600").test, range(3))[..., 0]
        top3 = model.predict(images, params={"top_k": 3})
    assert [str(w.message) for w in caught] == []
    assert model.metadata.get_params_schema().to_dict() == [
        {"name": "top_k", "type": "long", "default": 1, "shape": None}]
    assert model.metadata.saved_input_example_info is not None
    # Inputs (1) on the model's page: a batch of images, each value as sent (the vote checks shape and pixels)
    assert model.metadata.get_input_schema().to_dict() == [{"type": "tensor",
                                                            "tensor-spec": {"dtype": "object", "shape": (-1,)}}]
    assert list(top3["image"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2] and list(top3["rank"]) == [1, 2, 3] * 3
    for _, rows in top3.groupby("image"):
        assert list(rows["probability"]) == sorted(rows["probability"], reverse=True)
    best = model.predict(images)
    assert list(best["class_index"]) == list(top3[top3["rank"] == 1]["class_index"])


def test_make_demo_commands_print_no_warning_lines(demo):
    assert warning_lines(demo["train"], demo["ensemble"]) == []
    err = demo["train"].stderr
    assert f"[{STUDY}] trial 3 of 3" in err and "dataset synthetic:600: 47 classes" in err
    assert "ensemble (soft)" in demo["ensemble"].stdout
    # MLflow 3.17's UI follows its GenAI / Model training switch: the printed address sets it, and opens the saved view.
    experiment = MlflowClient().get_experiment_by_name(STUDY).experiment_id
    address = f"/#/experiments/{experiment}/runs?viewStateShareKey={views.RUNS_VIEW_KEY}&workflowType=machine_learning"
    assert address in err and address in demo["ensemble"].stdout
    epochs = [line for line in demo["train"].stdout.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 * 2 and "Epoch 1/2" not in demo["train"].stdout  # one line per epoch


def test_a_named_experiment_is_kept(workdir):
    """MLFLOW_EXPERIMENT_NAME (what `mlflow run --experiment-name` also sets) wins over the study's name."""
    from emnist_exp import train

    os.environ["MLFLOW_EXPERIMENT_NAME"] = "mine"
    try:
        assert train.main(["--dataset", "synthetic:600", "--study", "named", "--n_trials", "1", "--epochs", "1",
                           "--pruner", "none"]) == 0
    finally:
        del os.environ["MLFLOW_EXPERIMENT_NAME"]
        mlflow.set_experiment(experiment_id=experiments.DEFAULT_EXPERIMENT_ID)
    mine = MlflowClient().get_experiment_by_name("mine")
    runs = [*queries.study_runs("named", "study"), *queries.study_runs("named", "trial")]
    assert len(runs) == 2 and {r.info.experiment_id for r in runs} == {mine.experiment_id}
    assert MlflowClient().get_experiment_by_name("named") is None
    assert mine.tags[experiments.EXPERIMENT_KIND_TAG] == "custom_model_development"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, deadline: float, server: subprocess.Popen):
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if server.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"  # bare: SQLAlchemy 2.1 picks psycopg 3


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_optuna_dashboard_reads_a_study_back_over_http(backend, tmp_path):
    pytest.importorskip("optuna_dashboard", reason="the optional extra: pip install -e '.[dashboard]'")
    name = f"dashboard-{os.getpid()}-{backend}"
    storage = f"sqlite:///{tmp_path / 'optuna.db'}" if backend == "sqlite" else POSTGRES
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    except Exception as exc:  # noqa: BLE001 (no server here: say so rather than fail)
        pytest.skip(f"no PostgreSQL at {POSTGRES}: {type(exc).__name__}")
    for value in (0.5, 0.75):
        study.enqueue_trial({"dropout": value / 2})
        study.optimize(lambda t: t.suggest_float("dropout", 0.0, 0.5) + value / 2, n_trials=1)
    port = free_port()
    log = open(tmp_path / "dashboard.log", "wb")
    server = subprocess.Popen([str(BIN / "optuna-dashboard"), storage, "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        listing = get_json(f"http://127.0.0.1:{port}/api/studies", time.monotonic() + 120, server)
        found = [s for s in listing["study_summaries"] if s["study_name"] == name]
        assert len(found) == 1
        detail = get_json(f"http://127.0.0.1:{port}/api/studies/{found[0]['study_id']}", time.monotonic() + 30,
                          server)
        assert [t["params"][0]["param_internal_value"] for t in detail["trials"]] == [0.25, 0.375]
        assert [t["values"] for t in detail["trials"]] == [[0.5], [0.75]]
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # gunicorn's master and its workers
        server.wait(timeout=30)
        log.close()
        optuna.delete_study(study_name=name, storage=storage)


@pytest.mark.parametrize("verbose", [False, True])
def test_tensorflow_load_lines_are_filtered_unless_verbose(verbose):
    """TensorFlow's C++ start-up lines (absl, before logging is set up) ignore every log level."""
    code = (f"from emnist_exp import console; console.quiet(verbose={verbose}); import tensorflow as tf; "
            "console.loaded(); import sys; print('after', file=sys.stderr)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    noise = [line for line in out.stderr.splitlines() if "absl::InitializeLog" in line or "port.cc" in line]
    assert bool(noise) == verbose, out.stderr
    assert out.stderr.rstrip().endswith("after")  # standard error flows again once TensorFlow is loaded


def test_two_studies_in_one_process_each_get_their_experiment(tmp_path):
    """mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; a second study must not take it for the user's choice."""
    script = """
import os, sys, mlflow
from emnist_exp.tracking import experiments, launcher, queries, tags
mlflow.set_tracking_uri(sys.argv[1])
for name in ("first", "second"):
    with launcher.start_entry_run(run_name="study-" + name, tags={}, experiment=name) as run:
        print(name, mlflow.get_experiment(run.info.experiment_id).name, os.environ.get("MLFLOW_EXPERIMENT_ID"))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                                                              "MLFLOW_RUN_ID")}
    out = subprocess.run([sys.executable, "-c", script, f"sqlite:///{tmp_path / 'mlflow.db'}"], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["first first None", "second second None"], out.stdout
