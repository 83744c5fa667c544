"""The accuracy protocol, end to end: a real study on the EMNIST sample, then its top-5 ensemble.

    python benchmarks/accuracy.py            # the protocol: preset=sample, then ensemble --top 5
    python benchmarks/accuracy.py --smoke    # about a minute: the quick preset cut to 2 short trials

It runs exactly the two user commands

    mlflow run . -e train -P preset=sample --env-manager local
    python -m emnist_exp.ensemble --top 5

in a fresh tracking store and Optuna database under --workdir (so an earlier study of the same
name is not continued), then reads the ensemble run back from MLflow. Members are selected and
weighted on validation (carved from train); the test split is only reported. Needs conda-less
`--env-manager local`, i.e. this environment already has the project installed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emnist_exp.config import resolve
from emnist_exp.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str], env: dict[str, str], log: Path) -> float:
    """Run one command from the work folder, its output teed to a log; return wall seconds.

    From there, because a new SQLite store puts its artifacts under ./mlruns of the process that creates it.
    """
    print("$ " + " ".join(cmd), flush=True)
    started = time.perf_counter()
    with open(log, "a") as sink:
        proc = subprocess.Popen(cmd, cwd=log.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sink.write(line)
            sink.flush()
            if line.startswith(("trial", "study", "ensemble", "member", "assembled", "registered", "error")):
                print("  " + line.rstrip(), flush=True)
        if proc.wait() != 0:
            sys.exit(f"error: `{' '.join(cmd)}` exited with {proc.returncode}; its output is in {log}.")
    return time.perf_counter() - started


def ensemble_runs(tracking_uri: str, study: str, expected: int) -> list:
    """The study's ensemble runs, newest first, as the ensemble command logged them."""
    import mlflow  # noqa: PLC0415

    from emnist_exp.tracking import queries  # noqa: PLC0415

    mlflow.set_tracking_uri(tracking_uri)
    runs = queries.study_runs(study, "ensemble")
    if len(runs) != expected:
        sys.exit(f"error: expected {expected} ensemble runs of study {study!r}, found {len(runs)}.")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None, help="training preset (default: sample; quick with --smoke)")
    parser.add_argument("--top", type=int, default=5, help="ensemble members (default: 5)")
    parser.add_argument("--workdir", default=None, help="where the fresh stores go (default: a new temp dir)")
    parser.add_argument("--smoke", action="store_true",
                        help="the quick preset on synthetic:1500, 2 trials of 1 epoch, top 2: checks the script runs")
    args = parser.parse_args()

    args.preset = args.preset or ("quick" if args.smoke else "sample")
    try:  # from the project folder, as `mlflow run` resolves it; before the long run, so a missing folder fails at once
        with contextlib.chdir(ROOT):
            study = resolve({"preset": args.preset}).study
    except UserError as exc:
        sys.exit(f"error: {exc}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="emnist-accuracy-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri,
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    train = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "train", "--env-manager", "local",
             "-P", f"preset={args.preset}", "-P", f"storage=sqlite:///{work / 'optuna.db'}"]
    top = args.top
    if args.smoke:
        train += ["-P", "dataset=synthetic:1500", "-P", "n_trials=2", "-P", "epochs=1"]
        top = 2
    log = work / "protocol.log"
    train_s = run(train, env, log)
    ensemble = [sys.executable, "-m", "emnist_exp.ensemble", "--top", str(top)]
    ens_s = run(ensemble, env, log)
    # Assembly time: the same members again, without registering: from the logged predictions, then re-inferred
    run(ensemble + ["--no-register"], env, log)
    run(ensemble + ["--no-register", "--reinfer"], env, log)
    reinferred, cached, protocol = ensemble_runs(tracking_uri, study, 3)
    m, tags = protocol.data.metrics, protocol.data.tags
    cached_s, reinfer_s = cached.data.metrics["assembly_seconds"], reinferred.data.metrics["assembly_seconds"]

    n = sum(1 for k in m if k.startswith("member_") and k.endswith("_val_accuracy"))
    val = [m[f"member_{i}_val_accuracy"] for i in range(n)]
    test = [m[f"member_{i}_test_accuracy"] for i in range(n)]
    best = max(range(n), key=val.__getitem__)
    rows = [
        ("protocol wall time (train + ensemble)", f"{(train_s + ens_s) / 60:.1f} min"),
        ("  mlflow run . -e train", f"{train_s / 60:.1f} min"),
        (f"  python -m emnist_exp.ensemble --top {top}", f"{ens_s:.0f} s"),
        (f"members (strategy {tags.get('ensemble.strategy', '?')})", f"{n}"),
        ("best member by validation: val accuracy", f"{100 * val[best]:.2f}%"),
        ("best member by validation: test accuracy", f"{100 * test[best]:.2f}%"),
        ("best member test accuracy (any member)", f"{100 * max(test):.2f}%"),
        ("ensemble val accuracy", f"{100 * m['val_accuracy']:.2f}%"),
        ("ensemble test accuracy", f"{100 * m['test_accuracy']:.2f}%"),
        ("ensemble gain over best member (test)", f"{100 * (m['test_accuracy'] - test[best]):+.2f} points"),
        ("ensemble gain over best test member", f"{100 * (m['test_accuracy'] - max(test)):+.2f} points"),
        ("assembly from logged predictions", f"{cached_s:.2f} s"),
        ("assembly with --reinfer", f"{reinfer_s:.2f} s"),
        ("cache speed-up", f"{reinfer_s / cached_s:.0f}x"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\npreset {args.preset}{' (smoke)' if args.smoke else ''}, {os.cpu_count()} CPUs, stores in {work}")
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
