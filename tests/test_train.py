"""A real study end to end through the train entry point, read back from the MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from emnist_exp import data, serving
from emnist_exp.tracking import models, queries, results, runs
from emnist_exp.spec import TrialSpec

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_runs_form_a_tree_with_params_and_per_epoch_metrics(tiny_study):
    parents = queries.study_runs("tiny", "study")
    children = queries.study_runs("tiny", "trial")
    assert len(parents) >= 1 and len(children) >= 3
    parent = min(parents, key=lambda r: r.info.start_time)
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == parent.info.run_id]
    assert len(mine) == 3
    client = MlflowClient()
    for child in mine:
        number = int(child.data.tags["optuna.trial_number"])
        assert child.info.run_name.startswith(f"{child.data.params['arch']}-{child.data.params['width']} ")
        assert child.info.run_name.endswith(f" #{number:03d}")
        assert child.data.tags["arch"] == child.data.params["arch"]
        assert child.data.tags["optuna.state"] == "COMPLETE" and child.info.status == "FINISHED"
        assert set(TrialSpec().params()) <= set(child.data.params)
        for metric in ["loss", "accuracy", "val_loss", "val_accuracy", "seconds"]:
            steps = [m.step for m in client.get_metric_history(child.info.run_id, f"epoch_{metric}")]
            assert steps == list(range(int(child.data.metrics["epochs_run"]))), metric
        for metric in ["val_accuracy", "test_accuracy", "train_seconds", "seconds_per_epoch", "param_count",
                       "epochs_run"]:
            assert metric in child.data.metrics
        assert child.data.metrics["epochs_run"] == 2
        files = {f.path for f in client.list_artifacts(child.info.run_id, "plots")}
        assert files == {"plots/learning_curve.png", "plots/confusion_matrix.png", "plots/misclassified.png"}
    assert parent.data.params["config.dataset"] == "synthetic:1500"
    assert parent.data.tags["optuna.storage"].startswith("sqlite:///")
    top = {f.path for f in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "trials.csv", "best_trial.json", "plots"} <= top
    config = mlflow.artifacts.load_dict(f"runs:/{parent.info.run_id}/config.json")
    assert config["seed"] == 7 and config["epochs"] == 2


@pytest.mark.slow
def test_optuna_trials_and_mlflow_runs_point_at_each_other(tiny_study, workdir):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir / 'optuna.db'}")
    by_id = {r.info.run_id: r for r in queries.study_runs("tiny", "trial")}
    for trial in study.trials[:3]:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert int(run.data.tags["optuna.trial_number"]) == trial.number
        assert float(run.data.metrics["val_accuracy"]) == pytest.approx(trial.value)


@pytest.mark.slow
def test_logged_model_predicts_as_in_training_and_artifacts_are_compact(tiny_study):
    run = queries.finished_trials(study="tiny")[0]
    preds = results.load_predictions(run.info.run_id)
    splits = data.load_splits("synthetic:1500")
    n_val, n_test = splits.counts["val"], splits.counts["test"]
    assert preds["val_probs"].shape == (n_val, 47) and preds["val_probs"].dtype == np.float16
    assert preds["test_probs"].shape == (n_test, 47) and preds["test_labels"].dtype == np.uint8
    assert list(preds["classes"]) == list(splits.classes)
    np.testing.assert_array_equal(preds["val_labels"], data.labels_of(splits.val))
    model = mlflow.keras.load_model(f"runs:/{run.info.run_id}/model")
    images = np.stack([x for x, _ in splits.val.as_numpy_iterator()]).astype(np.float32)
    live = model.predict(images, verbose=0)
    # float16 keeps about three significant digits; this barely trained model is close to uniform.
    np.testing.assert_allclose(live, preds["val_probs"].astype(np.float32), rtol=2e-3, atol=1e-5)
    # Its near-ties (top two within float16's rounding) may swap when stored; the others may not.
    top_two = np.sort(live, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-4
    np.testing.assert_array_equal(live.argmax(axis=1)[clear], preds["val_probs"].argmax(axis=1)[clear])
    assert serving.load_model(models.model_uri(run.info.run_id)).classes == splits.classes
    info = mlflow.models.get_model_info(models.model_uri(run.info.run_id))
    assert info.metadata["classes"] == list(splits.classes)  # a list, not the names joined into one string


@pytest.mark.slow
def test_rerunning_the_same_study_adds_trials(tiny_study, workdir):
    from emnist_exp import train

    storage = f"sqlite:///{workdir / 'optuna.db'}"
    before = len(optuna.load_study(study_name="tiny", storage=storage).trials)
    args = [a for a in tiny_study["train_args"]]
    args[args.index("--n_trials") + 1] = "1"
    assert train.main(args) == 0
    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == before + 1
    assert study.trials[-1].number == before
    assert len(queries.study_runs("tiny", "study")) >= 2  # each worker invocation is its own parent run


@pytest.mark.slow  # trains a trial of five epochs
def test_pruning_stops_a_bad_trial(workdir):
    from emnist_exp.config import Config
    from emnist_exp.objective import Objective
    from emnist_exp.study import make_pruner

    study = optuna.create_study(direction="maximize", pruner=make_pruner("median"),
                                storage=f"sqlite:///{workdir / 'optuna.db'}", study_name="pruning")
    dist = {"augment": optuna.distributions.CategoricalDistribution([True, False])}
    for value in (0.95, 0.96, 0.97):  # three finished trials that were excellent from epoch 1 on
        study.add_trial(optuna.trial.create_trial(
            params={"augment": False}, distributions=dist, value=value,
            intermediate_values={step: value for step in range(5)}))
    cfg = Config(dataset="synthetic:600", study="pruning", epochs=5, patience=5, space="kaggle")
    splits = data.load_splits(cfg.dataset)
    with runs.study_run(cfg.to_dict(), storage="sqlite", sampler="test"):
        study.optimize(Objective(cfg, splits), n_trials=1)
    trial = study.trials[-1]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert len(trial.intermediate_values) == 2  # one warm-up epoch, pruned after the second of five
    run = mlflow.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.data.tags["optuna.state"] == "PRUNED" and run.info.status == "FINISHED"
    assert trial.user_attrs["checkpoint"] is None  # a pruned trial is not resumed: its checkpoint is gone
    assert not mlflow.MlflowClient().list_artifacts(run.info.run_id, "checkpoint")


@pytest.mark.slow
def test_mlflow_run_entry_point_end_to_end(workdir):
    """`mlflow run . -e train` with -P parameters: the project's own run becomes the parent."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "run", str(ROOT), "-e", "train", "--env-manager", "local",
           "-P", "dataset=synthetic:600", "-P", "study=mlrun", "-P", "n_trials=1", "-P", "epochs=1",
           "-P", "seed=3", "-P", f"storage=sqlite:///{workdir / 'optuna.db'}"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    parent = queries.study_runs("mlrun", "study")[0]
    assert parent.data.params["dataset"] == "synthetic:600"  # logged by `mlflow run` itself
    assert parent.data.params["config.seed"] == "3" and parent.data.params["config.epochs"] == "1"
    assert parent.data.tags.get("mlflow.project.entryPoint") == "train"
    child = queries.study_runs("mlrun", "trial")[0]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "[mlrun] trial 1 of 1" in out.stderr


# The sample preset's folder comes from EMNIST_SAMPLE_DIR, with the development checkout's as the fallback.
FALLBACK = Path("..") / "shared" / "data" / "emnist-bymerge-sample"


def test_sample_preset_reads_its_folder_from_emnist_sample_dir(tmp_path, monkeypatch):
    from emnist_exp import config

    monkeypatch.setenv("EMNIST_SAMPLE_DIR", str(tmp_path))
    cfg = config.resolve({"preset": "sample"})
    assert cfg.dataset == f"idx:{tmp_path}"
    assert cfg.to_dict()["dataset"] == f"idx:{tmp_path}"  # the run logs the expanded folder, not the template


@pytest.mark.parametrize("value", [None, ""])  # unset or empty: the shell's rule for ${NAME:-fallback}
def test_sample_preset_falls_back_to_the_development_folder(value, tmp_path, monkeypatch):
    from emnist_exp import config

    (tmp_path / "shared" / "data" / "emnist-bymerge-sample").mkdir(parents=True)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    if value is None:
        monkeypatch.delenv("EMNIST_SAMPLE_DIR", raising=False)
    else:
        monkeypatch.setenv("EMNIST_SAMPLE_DIR", value)
    assert config.resolve({"preset": "sample"}).dataset == f"idx:{FALLBACK.as_posix()}"


def test_sample_preset_without_its_folder_names_the_variable(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EMNIST_SAMPLE_DIR"}
    missing = subprocess.run([sys.executable, "-m", "emnist_exp.train", "--preset", "sample"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    wrong = subprocess.run([sys.executable, "-m", "emnist_exp.train", "--preset", "sample"], cwd=tmp_path,
                           env={**env, "EMNIST_SAMPLE_DIR": str(tmp_path / "nowhere")},
                           capture_output=True, text=True, timeout=120)
    for out, where in ((missing, f"which is unset, and the fallback {FALLBACK.as_posix()} is not a folder"),
                       (wrong, f"which names {tmp_path / 'nowhere'}, not a folder")):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1, out.stderr
        assert lines[0].startswith("error: the sample preset reads its folder from EMNIST_SAMPLE_DIR, " + where)
        assert lines[0].endswith("or pass --dataset idx:<folder> (-P dataset=idx:<folder> under mlflow run).")
    assert list(tmp_path.iterdir()) == []  # refused before any store or data was touched
    # A --dataset flag replaces the preset's folder, so the missing default is no error.
    from emnist_exp import config

    assert config.resolve({"preset": "sample", "dataset": "synthetic:600"}).dataset == "synthetic:600"


def test_a_preset_variable_without_a_fallback_must_be_set(tmp_path, monkeypatch):
    from emnist_exp import config
    from emnist_exp.errors import UserError

    preset = tmp_path / "mine.toml"
    preset.write_text('dataset = "idx:${MY_EMNIST}"\n')
    monkeypatch.delenv("MY_EMNIST", raising=False)
    with pytest.raises(UserError, match=r"preset mine.toml uses \$\{MY_EMNIST\}, which is not set."):
        config.resolve({"preset": str(preset)})
    monkeypatch.setenv("MY_EMNIST", str(tmp_path))
    assert config.resolve({"preset": str(preset)}).dataset == f"idx:{tmp_path}"
