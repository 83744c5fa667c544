"""A preempted trial loses at most the epoch it was in: another worker resumes it from its checkpoint.

Real workers (`python -m emnist_exp.train`) and real signals, one after the other with different
seeds, on SQLite and on PostgreSQL (with a tracking server, so checkpoints go through its artifact
proxy). To stop a worker "during epoch 3" the test waits for its `epoch 2/4` line (printed once
epoch 2's checkpoint is saved), then signals it: epochs of a few seconds leave it inside epoch 3.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import prepared_tfds
from test_reliability import clean_env, finish
from test_scaleout import new_database, pg_url, tracking_server  # noqa: F401 (fixtures)

DATASET = "synthetic:1500"  # 1350 train, 150 val: 10 steps of batch 128 an epoch, seconds each on 2 busy cores
GRACE = 8  # seconds without heartbeat before a killed worker's trial is taken up
BASE = ["--dataset", DATASET, "--epochs", "4", "--patience", "4", "--pruner", "none", "--space", "full",
        "--n_trials", "1", "--heartbeat_interval", "2", "--grace_period", str(GRACE)]
FIRST, SECOND = "6", "1"  # worker seeds. Seed 6's first trial in the full space: cnn-16, no augmentation, one-cycle
EPOCH_METRICS = ("epoch_loss", "epoch_accuracy", "epoch_val_loss", "epoch_val_accuracy", "epoch_seconds")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    return prepared_tfds(tmp_path_factory, DATASET)


class Study:
    """One study's stores and the workers run on it, one after the other."""

    def __init__(self, root: Path, tfds: Path, storage: str, tracking_uri: str):
        self.root, self.storage, self.tracking_uri = root, storage, tracking_uri
        self.name = f"preempt-{uuid.uuid4().hex[:6]}"
        self.env = clean_env(tfds, MLFLOW_TRACKING_URI=tracking_uri)
        self.count = 0

    def start(self, seed: str, *args: str) -> tuple[subprocess.Popen, Path]:
        log = self.root / f"worker{self.count}.log"
        self.count += 1
        cmd = [sys.executable, "-m", "emnist_exp.train", *BASE, "--study", self.name, "--storage", self.storage,
               "--seed", seed, *args]
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, cwd=self.root, env=self.env, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        return proc, log

    def run(self, seed: str, *args: str) -> str:
        proc, log = self.start(seed, *args)
        assert finish(proc, log) == 0, log.read_text()[-3000:]
        return log.read_text()

    def stop_in_epoch_3(self, how: int) -> str:
        """A worker that gets signal `how` once its epoch 2 is saved; returns its console."""
        proc, log = self.start(FIRST)
        deadline = time.monotonic() + 900
        while not re.search(r"^epoch 2/4", log.read_text(), re.M):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.kill(proc.pid, how)
        assert finish(proc, log, timeout=120) == (143 if how == signal.SIGTERM else -how), log.read_text()[-3000:]
        return log.read_text()

    def trials(self):
        import optuna

        from emnist_exp.storage import storage_url

        url = storage_url(self.storage).render_as_string(hide_password=False)
        return optuna.load_study(study_name=self.name, storage=url).get_trials(deepcopy=False)

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri)

    def steps(self, run_id: str, metric: str) -> list[int]:
        return sorted(m.step for m in self.client().get_metric_history(run_id, metric))

    def checkpoint_files(self, run_id: str) -> list[str]:
        return [f.path for f in self.client().list_artifacts(run_id, "checkpoint")]


@pytest.fixture(params=["sqlite", "postgresql"])
def study(request, tmp_path, tfds_dir) -> Study:
    if request.param == "sqlite":
        return Study(tmp_path, tfds_dir, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return Study(tmp_path, tfds_dir, request.getfixturevalue("new_database")(),
                 request.getfixturevalue("tracking_server"))


@pytest.fixture
def sqlite_study(tmp_path, tfds_dir) -> Study:
    return Study(tmp_path, tfds_dir, f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}")


def epochs_trained(console: str) -> list[int]:
    return [int(n) for n in re.findall(r"^epoch (\d+)/4", console, re.M)]


def assert_resumed(s: Study, first: str, second: str):
    """Trial 0 stopped in epoch 3; trial 1 (its retry, on the second worker) trained epochs 3 and 4 in its
    run and completed it. Returns the two trials."""
    import optuna

    assert epochs_trained(first) == [1, 2], first[-3000:]
    lost, retry = s.trials()
    assert lost.state == optuna.trial.TrialState.FAIL
    assert retry.state == optuna.trial.TrialState.COMPLETE, second[-3000:]
    assert retry.params == lost.params and retry.system_attrs["retry_history"] == [lost.number]
    assert retry.user_attrs["seed"] == lost.user_attrs["seed"]  # the first worker's Keras seed, not the second's
    assert retry.user_attrs["worker"] != lost.user_attrs["worker"]
    (line,) = [x for x in second.splitlines() if "resumes" in x]
    assert f"trial {retry.number} resumes from epoch 3 of 4: trial {lost.number}'s checkpoint of epoch 2" in line
    assert lost.user_attrs["worker"] in line
    assert epochs_trained(second) == [3, 4], second[-3000:]  # epoch 3 again: it was cut mid-way
    assert "Traceback" not in first + second
    run_id = retry.user_attrs["mlflow_run_id"]
    assert run_id == lost.user_attrs["mlflow_run_id"]  # one run for the trial, reopened
    run = s.client().get_run(run_id)
    assert (run.info.status, run.data.tags["optuna.state"]) == ("FINISHED", "COMPLETE")
    assert run.data.tags["optuna.trial_number"] == str(retry.number)
    for metric in EPOCH_METRICS:
        assert s.steps(run_id, metric) == [0, 1, 2, 3], metric  # one value per epoch, none twice
    assert run.data.metrics["epochs_run"] == 4
    assert s.checkpoint_files(run_id) == [] and retry.user_attrs["checkpoint"] is None  # removed once complete
    trial_runs = s.client().search_runs([run.info.experiment_id], "tags.`emnist.role` = 'trial'")
    assert [r.info.run_id for r in trial_runs] == [run_id]  # no half-run beside it
    return lost, retry


@pytest.mark.slow
def test_sigterm_in_epoch_3_resumes_on_another_worker_from_epoch_3(study):
    first = study.stop_in_epoch_3(signal.SIGTERM)
    lost, waiting = study.trials()
    assert lost.user_attrs["stopped_by"] == "SIGTERM" and waiting.system_attrs["retry_reasons"] == ["SIGTERM"]
    assert lost.user_attrs["checkpoint"]["epoch"] == 2
    run = study.client().get_run(lost.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["emnist.stopped_by"]) == ("KILLED", "SIGTERM")
    assert "queued again with the same parameters" in first
    second = study.run(SECOND)
    assert_resumed(study, first, second)


@pytest.mark.slow
def test_kill_9_in_epoch_3_resumes_once_the_heartbeat_grace_has_passed(study):
    first = study.stop_in_epoch_3(signal.SIGKILL)
    time.sleep(GRACE + 2)  # the dead worker's trial is stale by the time the next worker asks for a trial
    second = study.run(SECOND)
    assert "trial 0 lost its worker (no heartbeat)" in second
    lost, retry = assert_resumed(study, first, second)
    assert "stopped_by" not in lost.user_attrs and retry.system_attrs["retry_reasons"] == ["heartbeat"]


@pytest.mark.slow
def test_a_resumed_trial_ends_as_the_same_trial_run_without_a_stop(sqlite_study, tmp_path, tfds_dir):
    """Within half a point of validation accuracy (the resumed fit repeats the uninterrupted one exactly here)."""
    whole = Study(tmp_path / "whole", tfds_dir, f"sqlite:///{tmp_path / 'whole.db'}",
                  f"sqlite:///{tmp_path / 'whole-mlflow.db'}")
    whole.root.mkdir()
    whole.run(FIRST)
    (uninterrupted,) = whole.trials()
    sqlite_study.stop_in_epoch_3(signal.SIGTERM)
    sqlite_study.run(SECOND)
    lost, resumed = sqlite_study.trials()
    assert resumed.params == uninterrupted.params and resumed.user_attrs["seed"] == uninterrupted.user_attrs["seed"]
    print(f"val_accuracy uninterrupted {uninterrupted.value:.4f}, resumed {resumed.value:.4f}")
    assert abs(resumed.value - uninterrupted.value) <= 0.005


@pytest.mark.slow
def test_a_trial_that_fails_on_nan_is_not_retried(sqlite_study):
    """A NaN loss is the trial's own failure, not a preemption: it stays FAIL and nothing is queued."""
    import optuna

    from emnist_exp.search import suggest_spec

    nan = optuna.create_study(study_name=sqlite_study.name, storage=sqlite_study.storage, direction="maximize")
    fixed = {"arch": "cnn", "cnn_width": 16, "augment": False, "dropout": 0.1, "batch_norm": False,
             "learning_rate": 1e30, "schedule": "exp", "batch_size": 128, "label_smoothing": 0.0}
    suggest_spec(optuna.trial.FixedTrial(fixed), "full")  # the parameters make a spec of the full space
    nan.enqueue_trial(fixed, skip_if_exists=False)  # a learning rate far outside the space: the loss overflows
    console = sqlite_study.run(FIRST)
    assert "loss became NaN" in console
    (failed,) = sqlite_study.trials()
    assert failed.state == optuna.trial.TrialState.FAIL and "stopped_by" not in failed.user_attrs
    assert "retry_history" not in failed.system_attrs
    assert sqlite_study.checkpoint_files(failed.user_attrs["mlflow_run_id"]) == []


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_checkpoint_is_one_sentence_and_the_trial_starts_again(sqlite_study, damage):
    import optuna
    from mlflow.utils.file_utils import local_file_uri_to_path

    first = sqlite_study.stop_in_epoch_3(signal.SIGTERM)
    (lost, _) = sqlite_study.trials()
    pointer = lost.user_attrs["checkpoint"]
    run = sqlite_study.client().get_run(pointer["run_id"])
    stored = Path(local_file_uri_to_path(run.info.artifact_uri)) / pointer["path"]  # the store's own copy
    raw = stored.read_bytes()
    stored.write_bytes(raw[: len(raw) // 3] if damage == "truncate" else b"\0" * len(raw))
    second = sqlite_study.run(SECOND)
    (line,) = [x for x in second.splitlines() if "unusable" in x]
    assert line.endswith("the trial starts again from epoch 1") and "trial 1:" in line and pointer["path"] in line
    assert "Traceback" not in second
    assert epochs_trained(second) == [1, 2, 3, 4]
    lost, retry = sqlite_study.trials()
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost.params
    assert retry.user_attrs["mlflow_run_id"] != pointer["run_id"]  # a new run: the old one holds epochs 1-2
    for metric in EPOCH_METRICS:
        assert sqlite_study.steps(retry.user_attrs["mlflow_run_id"], metric) == [0, 1, 2, 3]
    assert sqlite_study.checkpoint_files(pointer["run_id"]) == []  # the damaged file is removed too
    assert epochs_trained(first) == [1, 2]


@pytest.mark.slow
def test_the_workers_time_limit_queues_its_trial_for_the_next_worker(sqlite_study):
    """--timeout 1: the limit comes in the first epoch; the worker stops the trial there, exits 0, and the
    next worker runs it."""
    import optuna

    first = sqlite_study.run(FIRST, "--timeout", "1")
    assert "stopped mid-epoch at the time limit" in first and "Traceback" not in first
    stopped, waiting = sqlite_study.trials()
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["stopped_by"] == "timeout"
    assert waiting.state == optuna.trial.TrialState.WAITING and waiting.params == stopped.params
    run = sqlite_study.client().get_run(stopped.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["emnist.stopped_by"]) == ("KILLED", "timeout")
    sqlite_study.run(SECOND)
    assert sqlite_study.trials()[1].state == optuna.trial.TrialState.COMPLETE


def test_the_time_limit_stops_at_an_epochs_end_when_the_next_epoch_would_not_fit():
    from emnist_exp import signals
    from emnist_exp.objective import StopAtDeadline

    now = time.monotonic()
    fits = StopAtDeadline(deadline=now + 100)
    fits.on_epoch_begin(0)
    fits.began = now - 40  # a 40 s epoch, 100 s left: another fits
    fits.on_epoch_end(0)
    fits.on_epoch_begin(1)
    fits.on_train_batch_end(0)
    late = StopAtDeadline(deadline=now + 30)
    late.on_epoch_begin(0)
    late.began = now - 40  # a 40 s epoch, 30 s left: stop here, at the end of epoch 1
    late.on_epoch_end(0)
    with pytest.raises(signals.TimeLimit, match="at the end of epoch 1"):
        late.on_epoch_begin(1)
    past = StopAtDeadline(deadline=now - 1)
    with pytest.raises(signals.TimeLimit, match="mid-epoch"):
        past.on_train_batch_end(3)


def test_a_queued_retry_is_taken_before_the_first_points_and_holds_its_place(tmp_path):
    """The study's first points wait in the queue from its start; a stopped trial's copy goes before them,
    and with total_trials the copy counts as taken, so the study cannot fill up while it waits."""
    import optuna

    from emnist_exp import storage as storages
    from emnist_exp.config import Config
    from emnist_exp.search import FIRST_POINTS, suggest_spec
    from emnist_exp.study import TrialCap, make_study, requeue

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    cfg = Config(study="retries-first", storage=url, space="demo")
    assert len(FIRST_POINTS["demo"]) >= 3
    study = make_study(cfg, optuna.storages.get_storage(url))

    def frozen(trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        return study._storage.get_trial(trial._trial_id)

    stopped = study.ask()  # the first enqueued point, stopped mid-trial: FAIL, and a copy queued
    suggest_spec(stopped, cfg.space)
    requeue(study, frozen(stopped), "SIGTERM")
    study.tell(stopped, state=optuna.trial.TrialState.FAIL)
    copy = study.ask()
    assert frozen(copy).system_attrs["failed_trial"] == stopped.number and copy.params == stopped.params
    assert copy.number > stopped.number + 1  # the other first points were queued before it, and still wait
    study.tell(copy, 0.5)

    waiting = len(FIRST_POINTS["demo"]) - 1
    cap = TrialCap(2, storages.StudyLock(url, cfg.study), n_trials=5, poll_seconds=0.1)
    assert cap.has_room(study, hold=False)  # 1 of 2 COMPLETE: room for one more
    again = study.ask()
    suggest_spec(again, cfg.space)
    requeue(study, frozen(again), "SIGTERM")
    study.tell(again, state=optuna.trial.TrialState.FAIL)
    # 1 COMPLETE + a queued retry fill the cap, and there is room to take the retry, which comes first
    assert cap.has_room(study, hold=False)
    assert frozen(study.ask()).system_attrs["failed_trial"] == again.number
    assert len([t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING]) == waiting - 1
