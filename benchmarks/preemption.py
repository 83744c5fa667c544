"""Preemption: the wall time a trial loses to a SIGTERM in its middle, against the same trial uninterrupted.

    python benchmarks/preemption.py                      # the real sample, 4,000 examples, 4 epochs
    python benchmarks/preemption.py --smoke              # synthetic, 2 epochs: a check that it runs

Real workers (`python -m emnist_exp.train`, the Kaggle recipe: nothing searched) on SQLite stores
in a temporary folder, one after the other. First one worker runs the trial uninterrupted. Then a
worker of a second study gets SIGTERM halfway through the trial (in the middle of epoch E/2 + 1,
half an epoch after the `epoch E/2` line), exits 143 and queues the trial again; a second worker,
started at once with another seed, resumes it from its last checkpoint. The loss is the two
workers' wall time against the uninterrupted worker's. The target is at most one epoch plus the
restart cost: the second worker's time from its start to its resume line (TensorFlow's import,
the data, the checkpoint's download), and the warm-up of its first epoch (graph tracing: the
uninterrupted worker's first epoch over its later ones). An epoch is the mean of the uninterrupted
worker's epochs after the first. Validation accuracy of both runs is shown; the test split is not
used.

The training rate of the seed CNN at batch 128 (`benchmarks/pipeline.py`'s "training" row) is
measured before and after, as the machine's speed varies and is shared.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import SAMPLE, training_rate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+) - (\d+)s", re.M)


class Worker:
    """A train worker whose console lines are timed as they appear."""

    def __init__(self, folder: Path, name: str, args: list[str], env: dict):
        self.log = folder / f"{name}.log"
        self.started = time.monotonic()
        with open(self.log, "w") as sink:
            self.proc = subprocess.Popen([sys.executable, "-m", "emnist_exp.train", *args], cwd=folder, env=env,
                                         stdout=sink, stderr=subprocess.STDOUT)
        self.seen: dict[str, float] = {}  # console line -> seconds after start when first seen

    def poll_lines(self) -> None:
        for line in self.log.read_text().splitlines():
            self.seen.setdefault(line, time.monotonic() - self.started)

    def wait_for(self, pattern: str) -> float:
        """Seconds after start at which a line matching `pattern` appeared."""
        while True:
            self.poll_lines()
            hits = [t for line, t in self.seen.items() if re.search(pattern, line)]
            if hits:
                return min(hits)
            if self.proc.poll() is not None:
                sys.exit(f"worker {self.log.name} exited {self.proc.returncode} before {pattern!r}:\n"
                         f"{self.log.read_text()[-3000:]}")
            time.sleep(0.05)

    def finish(self) -> tuple[int, float]:
        code = self.proc.wait()
        self.poll_lines()
        return code, time.monotonic() - self.started

    def epoch_seconds(self) -> list[int]:
        return [int(m[2]) for m in EPOCH_LINE.findall(self.log.read_text())]


def best_value(folder: Path, study: str) -> float:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study, storage=f"sqlite:///{folder / 'optuna.db'}").best_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SAMPLE, help=f"dataset SPEC (default: {SAMPLE})")
    parser.add_argument("--max_examples", type=int, default=4_000, help="training examples, validation included")
    parser.add_argument("--epochs", type=int, default=4, help="the trial's epochs; SIGTERM comes halfway")
    parser.add_argument("--smoke", action="store_true", help="synthetic:1500, 2 epochs: a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.dataset, args.max_examples, args.epochs = "synthetic:1500", 0, 2
    rate_before = training_rate(5 if args.smoke else 60, 128)
    with tempfile.TemporaryDirectory(prefix="emnist-preemption-") as tmp:
        rows, header = measure(Path(tmp), args)
    rate_after = training_rate(5 if args.smoke else 60, 128)
    print(header)
    print(f"training rate (seed CNN, batch 128): {rate_before:,.0f} images/s before, {rate_after:,.0f} after")
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def measure(folder: Path, args) -> tuple[list[tuple[str, str]], str]:
    """The two runs in `folder`: the table's rows, and a header naming what ran."""
    from emnist_exp import data

    env = {**os.environ, "TFDS_DATA_DIR": str(folder / "tfds"), "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
           "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    data.open_source(args.dataset, str(folder / "tfds"))  # prepared before the clocks start
    common = ["--dataset", args.dataset, "--max_examples", str(args.max_examples), "--epochs", str(args.epochs),
              "--patience", str(args.epochs), "--space", "kaggle", "--pruner", "none", "--n_trials", "1"]
    half = args.epochs // 2

    whole = Worker(folder, "uninterrupted", [*common, "--study", "whole", "--seed", "0"], env)
    code, whole_wall = whole.finish()
    assert code == 0, whole.log.read_text()[-3000:]
    # A steady epoch: the first also traces the graphs, which each new worker does once (its warm-up).
    first_epoch, *later = whole.epoch_seconds()
    epoch = sum(later) / len(later) if later else first_epoch
    warm_up = first_epoch - epoch

    first = Worker(folder, "preempted", [*common, "--study", "preempted", "--seed", "0"], env)
    first.wait_for(rf"^epoch {half}/{args.epochs} ")
    time.sleep(epoch / 2)  # halfway into the next epoch
    signalled = time.monotonic() - first.started
    first.proc.send_signal(signal.SIGTERM)
    code, first_wall = first.finish()
    assert code == 143, first.log.read_text()[-3000:]
    second = Worker(folder, "resumed", [*common, "--study", "preempted", "--seed", "1"], env)
    restart = second.wait_for(r"resumes from epoch")
    code, second_wall = second.finish()
    assert code == 0, second.log.read_text()[-3000:]
    resumed_line = next(line for line in second.seen if "resumes from epoch" in line)

    lost = first_wall + second_wall - whole_wall
    splits = data.load_splits(args.dataset, max_examples=args.max_examples, data_dir=str(folder / "tfds"))
    header = (f"dataset {args.dataset}: train {splits.counts['train']:,}, val {splits.counts['val']:,}; the Kaggle "
              f"recipe (seed CNN, batch 32), {args.epochs} epochs; SIGTERM at {signalled:.0f} s, "
              f"{len(first.epoch_seconds())} epochs done\n"
              f"second worker: {resumed_line.partition('] ')[2]}")
    rows = [
        ("uninterrupted worker, wall", f"{whole_wall:.1f} s"),
        ("preempted: first worker until exit 143, wall", f"{first_wall:.1f} s"),
        ("preempted: second worker, wall", f"{second_wall:.1f} s"),
        ("lost to the preemption", f"{lost:.1f} s"),
        ("one epoch (uninterrupted, mean of epochs 2 on)", f"{epoch:.1f} s"),
        ("restart: second worker's start to its resume line", f"{restart:.1f} s"),
        ("restart: a worker's first-epoch warm-up (graph tracing)", f"{warm_up:.1f} s"),
        ("target: one epoch + restart", f"{epoch + restart + warm_up:.1f} s"),
        ("lost / target", f"{lost / (epoch + restart + warm_up):.2f}"),
        ("val accuracy, uninterrupted", f"{best_value(folder, 'whole'):.4f}"),
        ("val accuracy, preempted and resumed", f"{best_value(folder, 'preempted'):.4f}"),
    ]
    return rows, header


if __name__ == "__main__":
    main()
