"""deploy/slurm-array.sh on a real one-node Slurm: munged, slurmdbd, slurmctld and slurmd started for these tests.

The project's script itself is sbatch'ed, as an array of 2 workers of a tiny synthetic study, against a
fresh PostgreSQL database and a real `mlflow server` (the fixtures of test_scaleout.py). slurmdbd keeps
the accounting in a fresh MariaDB database, so that `sacct` answers as on a real cluster (without it,
22.05's sacct has no job records: jobcomp/filetxt only feeds `sacct -c`, which answers an array job with
"Unknown type ArrayJobId" and its tasks' last state only).

The daemons run as root on localhost, with no cgroups (proctrack/linuxproc, task/none) and their own
munge key, socket, ports, state and spool folders. Without Slurm, MariaDB, PostgreSQL or root the
tests skip with the reason; under CI (CI set, as .ci/run does) they fail instead.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest
from test_scaleout import (PG_ENV, Workers, assert_nothing_lost, free_port, new_database,  # noqa: F401 (fixtures)
                           stop_group, tracking_server)

SCRIPT = Path(__file__).resolve().parent.parent / "deploy" / "slurm-array.sh"
MARIADB_ENV = "EMNIST_TEST_MARIADB"  # mysql://user[:password]@host:port, where slurmdbd may create a database
DAEMONS = ("munged", "slurmdbd", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "sacct", "scontrol", "sacctmgr", "sinfo", "scancel", "mysql")
CRED_EXPIRE = 10  # seconds; a requeued job waits this long before it may start again (120 by default)
# Seconds between SIGTERM and SIGKILL (Slurm's default: 30). The workers share this machine's 2 cores with
# everything else it runs; at a load of ~19 a worker's cleanup after SIGTERM has taken longer than 30 s.
KILL_WAIT = 120
# The worker's flags after the script's own: one epoch on 540 images, no pruning, heartbeats as in test_scaleout.
TRAIN_ARGS = ["--epochs", "1", "--pruner", "none", "--heartbeat_interval", "2", "--grace_period", "20"]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def unavailable(reason: str) -> None:
    """A user's machine without the pieces skips with the reason; CI, which installs them, fails."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this test must run)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def pg_url() -> str:
    """test_scaleout's databases and tracking server, on the server named here (a skip there, a failure under CI)."""
    url = os.environ.get(PG_ENV)
    if not url:
        unavailable(f"{PG_ENV} is not set: point it at a PostgreSQL database (.ci/run sets it)")
    return url


class Cluster:
    """A one-node Slurm whose every file lives in one folder; commands run with its SLURM_CONF."""

    def __init__(self, root: Path, name: str):
        self.root, self.name = root, name
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode != 0:
            pytest.fail(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr.strip()}\n{self.logs()}")
        return out.stdout

    def start(self, name: str, *cmd: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.root, start_new_session=True)
        log.close()

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-2000:]}"
                         for path in sorted((self.root / "log").glob("*")))

    def wait_until(self, what: str, ready, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [name for name, proc in self.procs.items() if proc.poll() is not None]
            if dead or time.monotonic() > deadline:
                pytest.fail(f"{what} did not happen within {timeout:.0f} s (exited: {dead})\n{self.logs()}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons, then any job process left (found by our SLURM_CONF)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--user=root", check=False)
            deadline = time.monotonic() + KILL_WAIT + 30  # for the workers to end their trials
            while self.run("squeue", "-h", check=False).strip() and time.monotonic() < deadline:
                time.sleep(1)
        for name in reversed(DAEMONS):
            if name in self.procs:
                stop_group(self.procs[name])
        marker = f"SLURM_CONF={self.conf}".encode()
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


def node_line() -> str:
    """This machine as slurmd sees it (`slurmd -C`: CPUs, sockets, cores, RealMemory), named localhost."""
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30, check=True).stdout
    (line,) = [line for line in out.splitlines() if line.startswith("NodeName=")]
    return re.sub(r"^NodeName=\S+", "NodeName=localhost NodeAddr=127.0.0.1", line)


def mariadb() -> dict:
    value = os.environ.get(MARIADB_ENV)
    if not value:
        unavailable(f"{MARIADB_ENV} is not set: point it at a MariaDB server (mysql://root@127.0.0.1:3306) for slurmdbd")
    url = urllib.parse.urlsplit(value)
    return {"host": url.hostname or "127.0.0.1", "port": url.port or 3306, "user": url.username or "root",
            "password": urllib.parse.unquote(url.password or "")}


def sql(db: dict, statement: str) -> None:
    subprocess.run(["mysql", "-h", db["host"], "-P", str(db["port"]), "-u", db["user"], "-e", statement],
                   env={**os.environ, "MYSQL_PWD": db["password"]}, check=True, capture_output=True, timeout=60)


def write_config(root: Path, name: str, db: dict) -> None:
    munge_socket = root / "munge" / "munge.socket"
    ctld, slurmd, dbd = free_port(), free_port(), free_port()
    (root / "slurm.conf").write_text(f"""\
ClusterName={name}
SlurmctldHost=localhost
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd}
AccountingStoragePass={munge_socket}
KillWait={KILL_WAIT}
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
{node_line()} State=UNKNOWN
PartitionName=test Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
    dbd_conf = root / "slurmdbd.conf"  # beside slurm.conf, where slurmdbd looks for it; 0600, as it insists
    dbd_conf.write_text(f"""\
AuthType=auth/munge
AuthInfo=socket={munge_socket}
DbdHost=localhost
DbdPort={dbd}
SlurmUser=root
PidFile={root}/slurmdbd.pid
LogFile={root}/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost={db['host']}
StoragePort={db['port']}
StorageUser={db['user']}
StorageLoc={name}_acct
""" + (f"StoragePass={db['password']}\n" if db["password"] else ""))
    dbd_conf.chmod(0o600)


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def conf_value(conf: Path, key: str) -> str:
    return re.search(rf"^{key}=(\S+)$", conf.read_text(), flags=re.M)[1]


@pytest.fixture(scope="module")
def cluster():
    missing = [cmd for cmd in DAEMONS + COMMANDS if not shutil.which(cmd)]
    if missing:
        unavailable(f"Slurm is not installed (no {', '.join(missing)}): "
                    "apt-get install slurmctld slurmd slurmdbd slurm-client munge mariadb-client")
    if os.geteuid() != 0:
        unavailable("the Slurm daemons of this test run as root (SlurmUser=root)")
    db = mariadb()
    # munged wants its socket's folder, and every folder above it, open to all: not a pytest tmp_path (0700).
    root = Path(tempfile.mkdtemp(prefix="emnist-slurm-"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir()
    (root / "munge").chmod(0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    name = f"emnist{uuid.uuid4().hex[:8]}"
    write_config(root, name, db)
    c = Cluster(root, name)
    try:
        m = root / "munge"
        c.start("munged", "munged", "--foreground", f"--socket={m}/munge.socket", f"--key-file={key}",
                f"--pid-file={m}/munged.pid", f"--seed-file={m}/munged.seed", f"--log-file={m}/munged.log")
        c.wait_until("munged's socket", (m / "munge.socket").exists)
        c.start("slurmdbd", "slurmdbd", "-D")
        c.wait_until("slurmdbd listening", lambda: listening(int(conf_value(c.conf, "AccountingStoragePort"))))
        c.run("sacctmgr", "-i", "add", "cluster", name)
        c.start("slurmctld", "slurmctld", "-D", "-f", str(c.conf))
        c.wait_until("slurmctld listening", lambda: listening(int(conf_value(c.conf, "SlurmctldPort"))))
        c.start("slurmd", "slurmd", "-D", "-N", "localhost", "-f", str(c.conf))
        c.wait_until("the node idle", lambda: c.run("sinfo", "-h", "-o", "%T", check=False).strip() == "idle")
        yield c
    finally:
        c.stop()
        try:
            sql(db, f"DROP DATABASE IF EXISTS `{name}_acct`")
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ---- one array job -----------------------------------------------------------------------------------


class ArrayJob:
    """An sbatch of deploy/slurm-array.sh, its tasks' logs and its study's stores."""

    def __init__(self, c: Cluster, root: Path, storage: str, tracking_uri: str, study: str):
        self.c, self.root = c, root
        self.store = Workers(root, root, storage, tracking_uri, study)  # only its store queries: no processes
        self.id = ""

    def submit(self, tasks: int, total_trials: int, *train_args: str) -> str:
        env = {**self.c.env, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               "TMPDIR": str(self.root),  # the script's TFDS_DATA_DIR default lies under it
               "EMNIST_STORAGE": self.store.storage, "MLFLOW_TRACKING_URI": self.store.tracking_uri,
               "EMNIST_STUDY": self.store.study, "EMNIST_DATASET": "synthetic:600", "EMNIST_PRESET": "quick",
               "EMNIST_TOTAL_TRIALS": str(total_trials),
               "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "", "TF_CPP_MIN_LOG_LEVEL": "2",
               "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}  # 2 cores shared by 2 workers
        env.pop("MLFLOW_RUN_ID", None)
        env.pop("TFDS_DATA_DIR", None)
        # Only the size of the array and of each task change: this node has 2 CPUs, the script asks for 4.
        cmd = ["sbatch", f"--array=0-{tasks - 1}", "--cpus-per-task=1", f"--chdir={self.root}", str(SCRIPT),
               *TRAIN_ARGS, *train_args]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        print("$ sbatch", " ".join(cmd[1:]), "\n" + out.stdout + out.stderr)
        assert out.returncode == 0, out.stderr
        self.id = re.fullmatch(r"Submitted batch job (\d+)\n", out.stdout)[1]
        return self.id

    def log(self, task: int) -> str:
        path = self.root / f"emnist-train-{self.id}_{task}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def logs(self, tasks: int) -> str:
        return "\n".join(f"--- task {i}\n{self.log(i)[-3000:]}" for i in range(tasks))

    def accounting(self) -> list[tuple[str, str, str]]:
        """sacct's records of the array's tasks, every run of each (-D: a requeued run too), oldest first."""
        out = self.c.run("sacct", "-j", self.id, "-X", "-D", "-n", "-P", "-o", "JobID,State,ExitCode")
        return [tuple(line.split("|")) for line in out.splitlines() if line]

    def wait(self, tasks: int, timeout: float = 900) -> list[tuple[str, str, str]]:
        """Wait until squeue has no task left and sacct holds each task's final state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queue = self.c.run("squeue", "-h", "-j", self.id, "-o", "%i %T %r", check=False)
            if "held" in queue:  # a launch that failed: Slurm holds the task, nothing more will happen
                pytest.fail(f"squeue: {queue}\n{self.c.logs()}\n{self.logs(tasks)}")
            if not queue.strip():
                records = self.accounting()
                last = {task: state for task, state, _ in records}
                if len(last) == tasks and set(last.values()) <= FINAL:
                    return records
            time.sleep(2)
        pytest.fail(f"job {self.id} still running after {timeout:.0f} s:\n{self.logs(tasks)}")

    def running_trial(self, timeout: float = 300):
        """The first RUNNING trial whose MLflow run has started, and the array task that runs it."""
        import optuna

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                trials = self.store.trials()
            except KeyError:  # no task has created the study yet
                trials = []
            for trial in trials:
                if trial.state == optuna.trial.TrialState.RUNNING and "mlflow_run_id" in trial.user_attrs:
                    return trial, task_of(int(trial.user_attrs["worker"].rpartition(":")[2]))
            time.sleep(0.5)
        pytest.fail(f"no trial started:\n{self.logs(2)}")


def task_of(pid: int) -> int:
    """The array task a worker process belongs to, from the environment Slurm gave it."""
    environ = dict(item.split(b"=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in item)
    return int(environ[b"SLURM_ARRAY_TASK_ID"])


def attempts(log: str) -> list[str]:
    """A task's log cut into its runs (the script opens each with a line; a requeued task appends)."""
    return re.split(r"^(?=emnist-train: task \d+ of job \d+, run \d+ on )", log, flags=re.M)[1:]


@pytest.fixture
def array_job(request, new_database, tracking_server, cluster, tmp_path):  # PostgreSQL checked first
    study = f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}"
    return ArrayJob(cluster, tmp_path, new_database(), tracking_server, study)


def assert_study_done(job: ArrayJob, total: int) -> list:
    import optuna

    trials = assert_nothing_lost(job.store, total=total)
    assert not [t.number for t in trials if t.state == optuna.trial.TrialState.RUNNING], "a trial was left RUNNING"
    return trials


# ---- the tests -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_array_of_two_workers_completes_the_study(array_job):
    job = array_job
    job.submit(2, 3)

    records = job.wait(2)

    print(job.c.run("sacct", "-j", job.id, "-o", "JobID,JobName,State,ExitCode,Elapsed"))
    assert records == [(f"{job.id}_{i}", "COMPLETED", "0:0") for i in range(2)], job.logs(2)
    assert_study_done(job, total=3)
    for i in range(2):  # each task in its own log, which names it
        (run,) = attempts(job.log(i))
        assert run.startswith(f"emnist-train: task {i} of job {job.id}, run 1 on "), run[:200]
        assert "Traceback" not in run, run[-3000:]


@pytest.mark.slow
def test_a_task_requeued_mid_trial_stops_cleanly_and_runs_again(array_job):
    """`scontrol requeue` in a trial's second epoch: the worker stops cleanly, its trial goes back to the
    study with the same parameters, the task runs again, and the study completes."""
    import optuna

    job = array_job
    job.submit(2, 3, "--epochs", "2")  # trials long enough to be caught in the middle
    trial, task = job.running_trial()
    deadline = time.monotonic() + 600
    while "epoch 1/2 " not in job.log(task):  # printed once epoch 1's checkpoint is the trial's
        if time.monotonic() > deadline:
            pytest.fail(f"task {task} did not finish an epoch:\n{job.logs(2)}")
        time.sleep(0.2)
    job.c.run("scontrol", "requeue", f"{job.id}_{task}")

    records = job.wait(2)

    print(job.c.run("sacct", "-j", job.id, "-D", "-o", "JobID,JobName,State,ExitCode,Elapsed"))
    victim = f"{job.id}_{task}"
    assert [(state, code) for t, state, code in records if t == victim] == [("REQUEUED", "0:0"), ("COMPLETED", "0:0")]
    assert [state for t, state, _ in records if t != victim] == ["COMPLETED"]
    runs = attempts(job.log(task))
    assert [run.split("\n", 1)[0].split(", ")[1] for run in runs] == ["run 1 on " + socket.gethostname(),
                                                                       "run 2 on " + socket.gethostname()], job.log(task)
    # The worker stopped on Slurm's SIGTERM: its trial FAIL, marked as a preemption, once its cleanup was done.
    assert "SIGTERM: failing the current trial and ending its runs as KILLED" in runs[0], runs[0][-3000:]
    assert "\ninterrupted\n" in runs[0], runs[0][-3000:]  # the worker's last word, once its cleanup is done
    stopped = next(t for t in job.store.trials() if t.number == trial.number)
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.user_attrs["stopped_by"] == "SIGTERM"
    # It went back to the study with the same parameters, as a queued copy of its own.
    copies = [t for t in job.store.trials() if t.system_attrs.get("failed_trial") == trial.number]
    assert len(copies) == 1 and copies[0].params == stopped.params, [(t.number, t.state.name) for t in copies]
    (copy,) = copies
    # The copy holds the stopped trial's place in the study, so it is trained, from epoch 1's checkpoint on,
    # by whichever task takes it first, in the stopped trial's own MLflow run.
    assert copy.state == optuna.trial.TrialState.COMPLETE, (copy.number, copy.state.name)
    resumed = f"trial {copy.number} resumes from epoch 2 of 2: trial {trial.number}'s checkpoint of epoch 1"
    assert resumed in job.log(0) + job.log(1), job.logs(2)
    print(next(line for line in (job.log(0) + job.log(1)).splitlines() if resumed in line))
    assert copy.user_attrs["mlflow_run_id"] == stopped.user_attrs["mlflow_run_id"]
    assert "Traceback" not in runs[1], runs[1][-3000:]
    assert_study_done(job, total=3)


@pytest.mark.slow
def test_near_the_time_limit_a_task_stops_its_worker_and_requeues_itself(array_job):
    """The script's `--signal=B:USR1@120`, sent by slurmctld's own timer: the limit is cut to 100 s from now."""
    import optuna

    job = array_job
    # One trial of many short epochs: slurmctld's timer can take 30 s to send the signal, and the trial
    # must still be training then (a study that has ended by then just exits at the signal).
    job.submit(1, 1, "--epochs", "80", "--patience", "80")
    trial, task = job.running_trial()
    run_time = re.search(r"RunTime=(\d+):(\d+):(\d+)", job.c.run("scontrol", "show", "job", f"{job.id}_{task}"))
    seconds = int(run_time[1]) * 3600 + int(run_time[2]) * 60 + int(run_time[3]) + 100
    job.c.run("scontrol", "update", f"JobId={job.id}_{task}", f"TimeLimit={seconds // 60}:{seconds % 60:02d}")
    deadline = time.monotonic() + 180  # slurmctld checks time limits every 30 s
    while job.c.run("squeue", "-h", "-j", job.id, "-o", "%T", check=False).strip() != "PENDING":
        if time.monotonic() > deadline:
            pytest.fail(f"task {task} was not requeued:\n{job.logs(1)}")
        time.sleep(1)
    job.c.run("scontrol", "update", f"JobId={job.id}_{task}", "TimeLimit=12:00:00")  # its next run has time

    records = job.wait(1)

    print(job.c.run("sacct", "-j", job.id, "-D", "-o", "JobID,JobName,State,ExitCode,Elapsed"))
    assert [state for _, state, _ in records] == ["REQUEUED", "COMPLETED"], records
    first, second = attempts(job.log(task))
    assert "the time limit is near: stopping the worker, then requeueing this task" in first, first[-3000:]
    assert "SIGTERM: failing the current trial and ending its runs as KILLED" in first, first[-3000:]
    assert "\ninterrupted\n" in first, first[-3000:]
    # The trial running when the signal came (slurmctld's timer checks every 30 s: maybe a later one than `trial`)
    (stopped,) = [t for t in job.store.trials() if "stopped_by" in t.user_attrs]
    assert stopped.state == optuna.trial.TrialState.FAIL and stopped.number >= trial.number
    (copy,) = [t for t in job.store.trials() if t.system_attrs.get("failed_trial") == stopped.number]
    assert copy.state == optuna.trial.TrialState.COMPLETE, (copy.number, copy.state.name)  # the next run took it first
    assert second.startswith(f"emnist-train: task {task} of job {job.id}, run 2 on ")
    assert "Traceback" not in second, second[-3000:]
    assert_study_done(job, total=1)
