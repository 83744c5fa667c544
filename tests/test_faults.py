"""Faults on the tracking side: a tracking server that dies, a full disk, a Ctrl-C under `mlflow run`.

Real processes throughout: `python -m emnist_exp.train` and `mlflow run` on a tiny synthetic set, a real
`mlflow server` killed and started again on the same port, a real tmpfs that fills up. After every fault,
nothing of the study stays RUNNING in MLflow or Optuna once a worker has run again past the grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import prepared_tfds
from test_reliability import clean_env, finish, mlflow_run, python_train, wait_for_training, wait_gone

DATASET = "synthetic:600"
# A small grace period, so that the worker that runs after a fault may end what the fault left RUNNING.
HEARTBEAT = ["--heartbeat_interval", "1", "--grace_period", "3"]
# MLflow retries an unreachable server for about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES 7, backoff factor 2).
FEW_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    return prepared_tfds(tmp_path_factory, DATASET)


def the_error_sentence(log: Path) -> str:
    """The worker's output holds no traceback, and one `error: ` line: returned."""
    text = log.read_text()
    assert "Traceback" not in text, text[-6000:]
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, text[-6000:]
    return lines[0]


def assert_nothing_running(tracking_uri: str, storage: str, study: str) -> None:
    """No run of any experiment is RUNNING, and no trial of the study is."""
    import mlflow
    import optuna

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(ids, filter_string="attributes.status = 'RUNNING'")
    assert not running, [(r.info.run_name, r.data.tags.get("emnist.role")) for r in running]
    trials = optuna.load_study(study_name=study, storage=storage).get_trials(deepcopy=False)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING]


# ---- a tracking server that dies mid-trial ---------------------------------------------------------------


class TrackingServer:
    """`mlflow server` on a SQLite store, which can be killed and started again on the same port."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> None:
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.root / "server.log", "a") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                 "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port",
                 str(self.port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def tracking_server(tmp_path):
    from test_bad_input import free_port

    root = tmp_path / "server"
    root.mkdir()
    server = TrackingServer(root, free_port())
    server.start()
    yield server
    server.kill()


@pytest.mark.slow  # trains in real processes
def test_a_tracking_server_that_dies_mid_trial_is_one_sentence_and_leaves_nothing_running(
        tmp_path, tfds_dir, tracking_server):
    storage, study = f"sqlite:///{tmp_path / 'optuna.db'}", "server-dies"
    env = clean_env(tfds_dir, MLFLOW_TRACKING_URI=tracking_server.uri, **FEW_RETRIES)
    log = tmp_path / "first.log"
    proc = python_train(tmp_path, env, log, "--study", study, "--n_trials", "1", "--epochs", "4",
                        "--storage", storage, *HEARTBEAT)
    wait_for_training(storage, study, proc, log)
    tracking_server.kill()
    assert finish(proc, log, timeout=300) != 0, log.read_text()[-3000:]
    line = the_error_sentence(log)
    assert f"the MLflow tracking store {tracking_server.uri}" in line and "Connection refused" in line, line

    tracking_server.start()
    time.sleep(3)  # the grace period
    log = tmp_path / "second.log"
    proc = python_train(tmp_path, env, log, "--study", study, "--n_trials", "1", "--storage", storage, *HEARTBEAT)
    assert finish(proc, log) == 0, log.read_text()[-3000:]
    assert_nothing_running(tracking_server.uri, storage, study)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_server.uri)
    first = client.search_runs([client.get_experiment_by_name(study).experiment_id],
                               filter_string="attributes.status = 'FAILED'")
    assert {r.data.tags["emnist.role"] for r in first} == {"study", "trial"}, first


# ---- a full disk under the stores --------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (as root): the stores, the artifacts and the worker's working folder live on it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(folder: Path) -> Path:
    """Write a file until the file system is full."""
    filler = folder / "filler"
    with open(filler, "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
        except OSError:
            pass
    return filler


@pytest.mark.slow  # trains in real processes
def test_a_full_disk_under_the_stores_is_one_sentence_and_leaves_nothing_running(tmp_path, tfds_dir, small_disk):
    tracking_uri, storage, study = (f"sqlite:///{small_disk / 'mlflow.db'}", f"sqlite:///{small_disk / 'optuna.db'}",
                                    "disk-full")
    env = clean_env(tfds_dir, MLFLOW_TRACKING_URI=tracking_uri)
    log = tmp_path / "first.log"
    proc = python_train(small_disk, env, log, "--study", study, "--n_trials", "1", "--epochs", "4",
                        "--storage", storage, *HEARTBEAT)
    wait_for_training(storage, study, proc, log)
    filler = fill(small_disk)
    assert finish(proc, log, timeout=300) != 0, log.read_text()[-3000:]
    line = the_error_sentence(log)
    assert "full" in line, line

    filler.unlink()  # space is back
    time.sleep(3)  # the grace period
    log = tmp_path / "second.log"
    proc = python_train(small_disk, env, log, "--study", study, "--n_trials", "1", "--storage", storage, *HEARTBEAT)
    assert finish(proc, log) == 0, log.read_text()[-3000:]
    assert_nothing_running(tracking_uri, storage, study)


# ---- Ctrl-C under `mlflow run` with no experiment named ------------------------------------------------------


@pytest.mark.slow  # trains in real processes
def test_ctrl_c_under_mlflow_run_leaves_no_run_in_default(tmp_path, tfds_dir):
    """`mlflow run` ends its own run (handed over to the study's) FAILED after a Ctrl-C: it is still tidied."""
    import mlflow

    from emnist_exp.tracking import launcher

    tracking_uri, storage, study = f"sqlite:///{tmp_path / 'mlflow.db'}", f"sqlite:///{tmp_path / 'optuna.db'}", "cc"
    env = clean_env(tfds_dir, MLFLOW_TRACKING_URI=tracking_uri)
    subprocess.run([sys.executable, "-m", "emnist_exp.stores", "--storage", storage], cwd=tmp_path, env=env,
                   check=True, capture_output=True, timeout=600)
    log = tmp_path / "cli.log"
    proc = mlflow_run(tmp_path, env, log, study=study, n_trials="2", storage=storage, pruner="none")
    trial = wait_for_training(storage, study, proc, log)
    os.killpg(proc.pid, signal.SIGINT)
    assert finish(proc, log, timeout=120) != 0
    wait_gone(int(trial.user_attrs["worker"].rpartition(":")[2]))
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    (handed,) = client.search_runs(["0"])
    assert handed.info.status != "RUNNING" and "emnist.moved_to" in handed.data.tags
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_uri)
    try:
        assert launcher.tidy_default(client) == [handed.info.run_id]  # what every entry point does first
    finally:
        mlflow.set_tracking_uri(before)
    assert client.search_runs(["0"]) == []
    assert_nothing_running(tracking_uri, storage, study)
