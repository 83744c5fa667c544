"""Scale-out and faults on the real PostgreSQL: many workers, a tracking server, crashes that lose nothing.

Workers are real `python -m emnist_exp.train` processes on a tiny synthetic set; each test gets its own
database and study. EMNIST_TEST_POSTGRES (set by .ci/run) names a database on the server to work from.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from conftest import prepared_tfds

PG_ENV = "EMNIST_TEST_POSTGRES"
DATASET = "synthetic:600"  # 540 train, 60 val, 100 test: a 1-epoch trial is seconds of training
# A dead worker is noticed within seconds. A live one must never look dead: three TensorFlow workers on
# two busy cores can leave a heartbeat thread unscheduled for several seconds, so 10 missed beats in a row.
HEARTBEAT = ["--heartbeat_interval", "2", "--grace_period", "20"]
WORKER_ARGS = ["--dataset", DATASET, "--epochs", "1", "--pruner", "none", *HEARTBEAT]
SECRET = "s3cret-Pa55"  # must never appear in any output


# ---- services: databases, a tracking server, a prepared dataset -----------------------------------


@pytest.fixture(scope="module")
def pg_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set: point it at a PostgreSQL database (.ci/run sets it) for the scale-out tests")
    return url


@pytest.fixture(scope="module")
def new_database(pg_url):
    """Make fresh databases on the test server (`emnist_ci_<random>`); drop them all at the end."""
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    from emnist_exp.storage import storage_url

    admin = sa.create_engine(storage_url(pg_url), isolation_level="AUTOCOMMIT")
    made: list[str] = []

    def make() -> str:
        name = f"emnist_ci_{uuid.uuid4().hex[:10]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return make_url(pg_url).set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(new_database, tmp_path_factory):
    """A real `mlflow server` on 127.0.0.1 with a PostgreSQL backend store and a local artifact root."""
    from sqlalchemy.engine import make_url

    root = tmp_path_factory.mktemp("server")
    # SQLAlchemy 2.1 reads bare postgresql:// as psycopg 3; the project ships psycopg2.
    backend = make_url(new_database()).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    port = free_port()
    log = open(root / "server.log", "w")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no GenAI job runners: 7 fewer processes
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--artifacts-destination",
         str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()[-3000:]}")
            time.sleep(1)
        yield uri
    finally:
        stop_group(proc)
        log.close()


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process we started in its own session, and the children it started (uvicorn)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> Path:
    return prepared_tfds(tmp_path_factory, DATASET)


class Workers:
    """Worker processes of one study, their logs, and the stores they share."""

    def __init__(self, root: Path, tfds: Path, storage: str, tracking_uri: str, study: str):
        self.root, self.tfds, self.storage, self.tracking_uri, self.study = root, tfds, storage, tracking_uri, study
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: str) -> subprocess.Popen:
        i = len(self.procs)
        env = {**os.environ, "TFDS_DATA_DIR": str(self.tfds), "MLFLOW_TRACKING_URI": self.tracking_uri,
               "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}  # 2 cores shared by 3 workers
        env.pop("MLFLOW_RUN_ID", None)
        cmd = [sys.executable, "-m", "emnist_exp.train", "--study", self.study, "--storage", self.storage,
               *WORKER_ARGS, *args]  # one command, one seed, as a user starts workers
        log = open(self.root / f"worker{i}.log", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, i: int) -> str:
        return (self.root / f"worker{i}.log").read_text()

    def logs(self) -> str:
        return "\n".join(f"--- worker {i} (exit {p.returncode})\n{self.log(i)[-2500:]}"
                         for i, p in enumerate(self.procs))

    def wait(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"workers still running after {timeout:.0f} s:\n{self.logs()}")
        return [p.returncode for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def trials(self):
        import optuna

        from emnist_exp.storage import storage_url

        if not hasattr(self, "_storage"):  # plain storage: no heartbeats, nothing failed from here
            self._storage = optuna.storages.RDBStorage(storage_url(self.storage).render_as_string(hide_password=False))
        return optuna.load_study(study_name=self.study, storage=self._storage).get_trials(deepcopy=False)

    def wait_for_running_trial(self, timeout: float = 180):
        """The first RUNNING trial whose MLflow run has started."""
        import optuna

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                for trial in self.trials():
                    if trial.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in trial.user_attrs:
                        return trial
            except KeyError:  # no worker has created the study yet
                pass
            if all(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.5)
        pytest.fail(f"no trial started:\n{self.logs()}")

    def runs(self) -> dict:
        """The study's MLflow runs by id."""
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, filter_string=f"tags.`optuna.study` = '{self.study}'", max_results=1000)
        return {r.info.run_id: r for r in runs}

    def run(self, run_id: str):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.tracking_uri).get_run(run_id)


@pytest.fixture
def workers(request, tmp_path, tfds_dir):
    made: list[Workers] = []

    def make(storage: str, tracking_uri: str, tfds: Path | None = None) -> Workers:
        study = f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
        w = Workers(tmp_path, tfds or tfds_dir, storage, tracking_uri, study)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


def trial_runs(runs: dict) -> dict:
    return {k: r for k, r in runs.items() if r.data.tags.get("emnist.role") == "trial"}


def assert_nothing_lost(w: Workers, total: int) -> list:
    """Exactly `total` COMPLETE trials, each with its own FINISHED run; every trial one run; none RUNNING."""
    import optuna

    trials = w.trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == total, [(t.number, t.state.name) for t in trials]
    runs = w.runs()
    by_trial = trial_runs(runs)
    numbers = [r.data.tags["optuna.trial_number"] for r in by_trial.values()]
    assert len(numbers) == len(set(numbers)), f"two runs for one trial: {sorted(numbers)}"
    started = [t for t in trials if t.state != optuna.trial.TrialState.WAITING]
    # A signal can stop a trial before its run begins (a worker stopped as it takes its next trial): no run, queued again.
    unlogged = [t for t in started if "mlflow_run_id" not in t.user_attrs]
    assert all(t.state == optuna.trial.TrialState.FAIL and "stopped_by" in t.user_attrs for t in unlogged), \
        [(t.number, t.state.name, t.user_attrs) for t in unlogged]
    started = [t for t in started if t not in unlogged]
    assert {t.user_attrs["mlflow_run_id"] for t in started} == set(by_trial)  # one run per trial, one trial per run
    done = {k for k, r in by_trial.items()
            if r.info.status == "FINISHED" and r.data.tags.get("optuna.state") == "COMPLETE"}
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == done
    assert not [r.info.run_id for r in runs.values() if r.info.status == "RUNNING"], "a run was left RUNNING"
    return trials


# ---- many workers, one study ------------------------------------------------------------------------


@pytest.mark.slow
def test_three_workers_one_killed_complete_exactly_n_trials(new_database, tracking_server, workers, capfd):
    """Three workers share a PostgreSQL study and a tracking server; one is killed (-9) in the middle of a trial.

    The study still ends with exactly N COMPLETE trials, no trial run twice and no run logged twice;
    the killed trial is FAIL and its parameters ran again; its runs are FAILED, not RUNNING forever.
    """
    import optuna

    w = workers(new_database(), tracking_server)
    for _ in range(3):
        w.start("--n_trials", "10", "--total_trials", "3")
    victim = w.wait_for_running_trial()
    pid = int(victim.user_attrs["worker"].rpartition(":")[2])
    index = [p.pid for p in w.procs].index(pid)
    os.kill(pid, signal.SIGKILL)
    codes = w.wait(timeout=900)
    assert codes[index] == -signal.SIGKILL and codes.count(0) == 2, w.logs()

    trials = assert_nothing_lost(w, total=3)
    assert len(trials) == 4, "a worker started a trial the study did not need"  # 3 COMPLETE + the killed one
    params = [tuple(sorted(t.params.items())) for t in trials if t.number != victim.number]
    assert len(set(params)) == len(params), "two workers ran the same parameters"
    lost = next(t for t in trials if t.number == victim.number)
    assert lost.state == optuna.trial.TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == victim.number)
    assert retry.state == optuna.trial.TrialState.COMPLETE and retry.params == lost.params
    assert retry.user_attrs["worker"] != lost.user_attrs["worker"]
    run = w.run(lost.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["optuna.state"]) == ("FAILED", "FAIL")
    assert w.run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"  # the dead worker's study run
    assert f"trial {victim.number} lost its worker" in "".join(w.log(i) for i in range(3) if i != index)

    # A worker that comes late finds the study done and leaves before reading any data.
    from emnist_exp import train

    untouched = w.root / "tfds-untouched"
    assert train.main(["--study", w.study, "--storage", w.storage, "--total_trials", "3",
                       "--dataset", DATASET, "--data_dir", str(untouched)]) == 0
    assert "already has 3 complete trials: nothing to do" in capfd.readouterr().err
    assert len(w.trials()) == 4 and not untouched.exists()


@pytest.mark.slow
def test_ctrl_c_fails_the_trial_and_kills_its_runs(new_database, tracking_server, workers):
    import optuna

    w = workers(new_database(), tracking_server)
    proc = w.start("--n_trials", "3")
    trial = w.wait_for_running_trial()
    time.sleep(2)  # into training
    proc.send_signal(signal.SIGINT)
    assert w.wait(timeout=180) == [130], w.logs()
    assert "interrupted" in w.log(0)
    stopped, queued = w.trials()  # the stopped trial, and its copy queued for the next worker to resume
    assert stopped.number == trial.number and stopped.state == optuna.trial.TrialState.FAIL
    assert stopped.user_attrs["stopped_by"] == "SIGINT"
    assert queued.state == optuna.trial.TrialState.WAITING and queued.params == stopped.params
    assert queued.system_attrs["retry_history"] == [stopped.number]
    run = w.run(trial.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["optuna.state"]) == ("KILLED", "FAIL")
    assert w.run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"


@pytest.mark.slow
def test_a_worker_on_a_tracking_server_shows_only_its_own_lines(new_database, tracking_server, workers):
    """Against a server MLflow prints "View run ... at: <url>" for every run it ends, and Optuna's importance
    evaluator warns about a study of a few trials: neither reaches the console."""
    w = workers(new_database(), tracking_server)
    w.start("--n_trials", "2", "--space", "kaggle")  # two complete trials: the importance plot is drawn
    assert w.wait(timeout=1800) == [0], w.logs()
    log = w.log(0)
    assert "View run" not in log and "View experiment" not in log, log[-3000:]
    assert re.findall(r"\w*Warning: .*", log) == [], log[-3000:]
    assert "trial 2 of 2" in log and f"runs: {tracking_server}/#/experiments/" in log, log[-3000:]


@pytest.mark.slow
def test_two_local_workers_share_sqlite(tmp_path, workers):
    """The one-machine default, all new: Optuna and MLflow in SQLite files, an empty tfds folder, two workers.

    Nothing is 'locked', no store is created twice, and the dataset is prepared once.
    """
    w = workers(f"sqlite:///{tmp_path / 'optuna.db'}", f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "tfds")
    for _ in range(2):
        w.start("--n_trials", "5", "--total_trials", "2")
    assert w.wait(timeout=600) == [0, 0], w.logs()
    assert "locked" not in w.logs()
    assert sum("Downloading and preparing dataset" in w.log(i) for i in range(2)) == 1, w.logs()
    trials = assert_nothing_lost(w, total=2)
    assert len(trials) == 2 and len({t.user_attrs["worker"] for t in trials}) == 2


# ---- bad configuration: one sentence, no password, before any data is read ---------------------------


def train_error(capfd, tmp_path, storage: str) -> str:
    from emnist_exp import train

    data_dir = tmp_path / "tfds-untouched"
    code = train.main(["--storage", storage, "--dataset", DATASET, "--data_dir", str(data_dir), "--study", "x"])
    out, err = capfd.readouterr()
    assert code == 2, out + err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert SECRET not in out + err
    assert not data_dir.exists(), "the dataset was touched before the storage was checked"
    return lines[0]


@pytest.mark.parametrize("storage, says", [
    (f"postgresql://postgres:{SECRET}@127.0.0.1:{{closed}}/test", "Connection refused"),
    # psycopg 3 (the default driver) and psycopg2 word it differently
    (f"postgresql://postgres:{SECRET}@no-such-host.invalid/test", "failed to resolve host|could not translate host name"),
    (f"postgresql//postgres:{SECRET}@127.0.0.1/test", "is malformed"),
    (f"postgresql://postgres:{SECRET}@127.0.0.1:port/test", "is malformed"),
    (f"postgresql://postgres:{SECRET}@x@127.0.0.1/test", "percent-encode an @"),
    (f"nosuchdb://postgres:{SECRET}@127.0.0.1/test", "unknown database or driver 'nosuchdb'"),
    (f"mysql://root:{SECRET}@127.0.0.1/test", "needs the Python module 'MySQLdb'"),
])
def test_bad_storage_urls_are_one_sentence(capfd, tmp_path, storage, says):
    line = train_error(capfd, tmp_path, storage.replace("{closed}", str(free_port())))
    assert re.search(says, line) and "***" in line


def test_unknown_database_and_role_on_the_real_server(capfd, tmp_path, pg_url):
    """The server trusts every password from 127.0.0.1 (pg_hba 'trust'), so a wrong user or database is what fails."""
    from sqlalchemy.engine import make_url

    base = make_url(pg_url).set(password=SECRET)
    line = train_error(capfd, tmp_path, base.set(database="emnist_no_such_db").render_as_string(hide_password=False))
    assert 'database "emnist_no_such_db" does not exist' in line
    line = train_error(capfd, tmp_path, base.set(username="emnist_no_such_role").render_as_string(hide_password=False))
    assert 'role "emnist_no_such_role" does not exist' in line


def test_wrong_password(capfd, tmp_path):
    """A server that asks for a password and refuses it, speaking just enough of PostgreSQL's wire protocol."""
    with refusing_postgres() as port:
        line = train_error(capfd, tmp_path, f"postgresql://emnist:{SECRET}@127.0.0.1:{port}/emnist")
    assert 'password authentication failed for user "emnist"' in line


class refusing_postgres:
    """Listen on 127.0.0.1; to every client: no SSL, 'send your password', 'password authentication failed'."""

    def __enter__(self) -> int:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()
        return self.sock.getsockname()[1]

    def __exit__(self, *exc) -> None:
        self.sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    self._refuse(conn)
                except OSError:
                    pass

    @staticmethod
    def _refuse(conn: socket.socket) -> None:
        def read(n: int) -> bytes:
            buf = b""
            while len(buf) < n:
                chunk = conn.recv(n - len(buf))
                if not chunk:
                    raise OSError("client left")
                buf += chunk
            return buf

        while True:  # SSLRequest / GSSENCRequest first, then the StartupMessage
            (length,) = struct.unpack("!i", read(4))
            body = read(length - 4)
            if struct.unpack("!i", body[:4])[0] in (80877103, 80877104):
                conn.sendall(b"N")
                continue
            break
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        kind, length = struct.unpack("!ci", read(5))
        read(length - 4)  # the password, which the client sends and we drop
        fields = b"".join(k + v.encode() + b"\0" for k, v in [
            (b"S", "FATAL"), (b"V", "FATAL"), (b"C", "28P01"),
            (b"M", 'password authentication failed for user "emnist"')]) + b"\0"
        conn.sendall(b"E" + struct.pack("!i", len(fields) + 4) + fields)
