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


def test_slurm_array_script_runs_the_train_worker(tmp_path):
    """The script itself, run by bash with a stand-in `srun` on PATH that records what it was asked to run."""
    script = (DEPLOY / "slurm-array.sh").read_text()
    assert re.search(r"^#SBATCH --array=\d+-\d+", script, flags=re.M)
    assert re.search(r"^#SBATCH --requeue$", script, flags=re.M)
    recorder = tmp_path / "bin" / "srun"
    recorder.parent.mkdir()
    recorder.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    recorder.chmod(0o755)
    env = {"PATH": f"{recorder.parent}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_JOB_ID": "77"}

    out = subprocess.run(["bash", str(DEPLOY / "slurm-array.sh")], env=env, capture_output=True, text=True,
                         timeout=60)

    assert out.returncode == 0, out.stderr
    argv = json.loads(out.stdout)
    start = argv.index("python")
    assert all(option.startswith("--") for option in argv[:start])  # srun's own options
    assert argv[start:start + 3] == TRAIN
    cfg = accepted(argv[start + 3:])
    assert cfg.seed == 3 and cfg.dataset == f"idx:{tmp_path}/emnist/gzip"
    assert cfg.storage.startswith("postgresql://") and cfg.total_trials > 0


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
