"""deploy/: the commands that the Kubernetes Job and the Slurm array run are ones the train CLI accepts."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from emnist_exp import config, train

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
TRAIN = ["python", "-m", "emnist_exp.train"]


def accepted(args: list[str]) -> config.Config:
    """The train CLI's own parser and config checks on `args` (argparse exits 2 on a bad flag)."""
    return config.resolve(train.parse_args(args))


def documents(name: str) -> dict[str, dict]:
    with open(DEPLOY / "kubernetes" / name) as file:
        return {doc["kind"]: doc for doc in yaml.safe_load_all(file)}


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in args; a variable the container does not define is an error."""
    def one(match: re.Match) -> str:
        assert match[1] in env, f"{value} uses $({match[1]}), which the container does not define"
        return env[match[1]]
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def test_kubernetes_job_runs_the_train_worker_in_parallel_against_postgres_and_tracking():
    job = documents("train-job.yaml")["Job"]
    assert job["spec"]["parallelism"] >= 2
    pod = job["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    (container,) = pod["containers"]
    assert container["command"] == dockerfile_entrypoint() and container["command"][-3:] == TRAIN
    env = {item["name"]: item.get("value", "0") for item in container["env"]}  # fieldRef index: 0
    args = [expand(arg, env) for arg in container["args"]]

    cfg = accepted(args)

    assert cfg.storage.startswith("postgresql://") and ":" not in cfg.storage.split("//")[1].split("@")[0]
    assert cfg.total_trials > 0  # workers stop on the study's count, not their own
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert cfg.dataset.startswith("idx:") and cfg.dataset[len("idx:"):] in mounts
    assert env["TFDS_DATA_DIR"] in mounts
    seed_source = next(item for item in container["env"] if item["name"] == "WORKER_INDEX")["valueFrom"]
    assert "job-completion-index" in seed_source["fieldRef"]["fieldPath"]  # one seed per worker
    tracking = documents("tracking.yaml")
    service = tracking["Service"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    server = tracking["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert server["command"] == ["mlflow", "server"]
    assert any(arg.startswith("--backend-store-uri=postgresql+psycopg2://") for arg in server["args"])


def test_kubernetes_job_seeds_differ_per_worker():
    job = documents("train-job.yaml")["Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    seeds = set()
    for index in range(job["spec"]["completions"]):
        env = {item["name"]: item.get("value", str(index)) for item in container["env"]}
        seeds.add(accepted([expand(arg, env) for arg in container["args"]]).seed)
    assert len(seeds) == job["spec"]["completions"]


def run_slurm_script(tmp_path, *args: str, **settings: str) -> tuple[list[str], dict[str, str]]:
    """The script itself, run by bash with a stand-in `python` on PATH that records its arguments and environment."""
    recorder = tmp_path / "bin" / "python"
    recorder.parent.mkdir(exist_ok=True)
    recorder.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "print(json.dumps([sys.argv[1:], dict(os.environ)]))\n")
    recorder.chmod(0o755)
    env = {"PATH": f"{recorder.parent}:{os.environ['PATH']}", "HOME": str(tmp_path), "SLURM_SUBMIT_HOST": "login7",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "80", **settings}

    out = subprocess.run(["bash", str(DEPLOY / "slurm-array.sh"), *args], env=env, capture_output=True, text=True,
                         timeout=60)

    assert out.returncode == 0, out.stderr
    argv, seen = json.loads(out.stdout)
    assert ["python", *argv[:2]] == TRAIN
    return argv[2:], seen


def test_slurm_array_script_defaults_run_the_train_worker(tmp_path):
    script = (DEPLOY / "slurm-array.sh").read_text()
    assert re.search(r"^#SBATCH --array=\d+-\d+", script, flags=re.M)
    assert re.search(r"^#SBATCH --requeue$", script, flags=re.M)
    assert re.search(r"^#SBATCH --signal=B:USR1@\d+$", script, flags=re.M)  # the script traps USR1
    assert re.search(r"^#SBATCH --output=\S*%A_%a\S*$", script, flags=re.M)  # one log per task
    assert re.search(r"^##SBATCH --gres=gpu:1$", script, flags=re.M)  # documented, off by default

    args, env = run_slurm_script(tmp_path)

    cfg = accepted(args)
    assert cfg.seed == 3 and cfg.dataset == f"idx:{tmp_path}/emnist/gzip"
    assert cfg.storage == "postgresql:///emnist_optuna" and cfg.total_trials == 40 and cfg.study == "bymerge-slurm"
    assert env["MLFLOW_TRACKING_URI"] == "http://login7:5000"  # the submitting host, named by Slurm
    assert env["TFDS_DATA_DIR"] == "/tmp/emnist-tfds-77"


def test_slurm_array_script_takes_its_settings_from_the_environment_and_passes_flags_on(tmp_path):
    settings = {"EMNIST_STORAGE": "postgresql://me@db.example.org/optuna", "MLFLOW_TRACKING_URI": "http://t:5001",
                "EMNIST_DATASET": "synthetic:600", "EMNIST_STUDY": "s1", "EMNIST_PRESET": "quick",
                "EMNIST_TOTAL_TRIALS": "7", "TMPDIR": str(tmp_path / "local")}

    args, env = run_slurm_script(tmp_path, "--epochs", "2", "--n_trials", "5", **settings)

    cfg = accepted(args)
    assert (cfg.storage, cfg.dataset, cfg.study, cfg.total_trials) == ("postgresql://me@db.example.org/optuna",
                                                                       "synthetic:600", "s1", 7)
    assert (cfg.epochs, cfg.n_trials, cfg.patience) == (2, 5, 2)  # flags win over the script's; patience from quick
    assert env["MLFLOW_TRACKING_URI"] == "http://t:5001" and env["TFDS_DATA_DIR"] == f"{tmp_path}/local/emnist-tfds-77"


def test_slurm_array_script_names_no_host():
    """Every URL the script runs with takes its host from the environment (or libpq's), none is written in."""
    code = [line for line in (DEPLOY / "slurm-array.sh").read_text().splitlines() if not line.startswith("#")]
    urls = re.findall(r"\w+://[^\s\"]*", "\n".join(code))
    # user@host:port, up to the path or the } that closes the script's ${VAR:=default}
    hosts = [re.match(r"\w+://((?:\$\{\w+\}|[^/}])*)", url)[1] for url in urls]
    assert urls and all(re.fullmatch(r"(\$\{\w+\}(:\d+)?)?", host) for host in hosts), urls


def dockerfile_entrypoint() -> list[str]:
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), flags=re.M)
    assert entry, "the Dockerfile has no exec-form ENTRYPOINT"
    return json.loads(entry[1])


def test_dockerfile_runs_the_train_worker_and_copies_files_that_exist():
    text = (DEPLOY / "Dockerfile").read_text()
    # an init as PID 1 (it forwards SIGTERM), then the worker in exec form
    assert dockerfile_entrypoint() == ["tini", "--", *TRAIN] and re.search(r"apt-get install .*\btini\b", text)
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        *sources, _ = shlex.split(line)
        assert sources and all((ROOT / source).exists() for source in sources), line
