"""The ensemble distilled into one student: accuracy and size against the teacher and its best member, and
images/s of the student against the exported ensemble graph, in the same run.

    python benchmarks/distill.py --workdir DIR        # the protocol's study (preset sample), top 5, then distil
    python benchmarks/distill.py --smoke              # synthetic:600, 2 trials, a cnn-16 student of 1 epoch
    python benchmarks/distill.py --train-args "--max_examples 12000 --n_trials 4 --epochs 2"   # a smaller study
    python benchmarks/distill.py --workdir DIR --ensemble RUN_ID --arch cnn --width 16   # another student, same teacher

It runs the user commands

    python -m emnist_exp.train --preset sample ...       (--smoke: synthetic:600, 2 trials of 1 epoch)
    python -m emnist_exp.ensemble --top 5                (--smoke: --top 2)
    python -m emnist_exp.distill --epochs N --temperature T --alpha A [--arch --width]

in fresh stores under --workdir and reads the runs back (--ensemble: only distil, from that ensemble
run in --workdir's stores). The student and the teacher's members are
selected on validation; test is only reported. Last, the ensemble run's graph/ensemble.keras and
the student run's graph/student.keras score the same test images (batch 512, after a warm-up).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import ROOT, run  # noqa: E402
from pipeline import training_rate  # noqa: E402

STUDY = "distill"


def graph_rate(path: Path, images: np.ndarray, repeats: int) -> float:
    """Images/s of a saved Keras graph on `images`, Keras predict at batch 512."""
    import keras  # noqa: PLC0415

    graph = keras.saving.load_model(path)
    graph.predict(images[:512], batch_size=512, verbose=0)  # warm-up: tracing
    started = time.perf_counter()
    for _ in range(repeats):
        graph.predict(images, batch_size=512, verbose=0)
    return repeats * len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="where the fresh stores go (default: a new temp dir)")
    parser.add_argument("--epochs", type=int, default=0, help="student epochs (default 0: the best member's)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="distillation temperature (default: distill's, 4)")
    parser.add_argument("--alpha", type=float, default=None, help="weight of the teacher's term (default: distill's, 0.5)")
    parser.add_argument("--arch", default="", help="student architecture (default: the best member's)")
    parser.add_argument("--width", type=int, default=0, help="student width (default: the best member's)")
    parser.add_argument("--ensemble", default="",
                        help="an ensemble run in --workdir's stores: distil it again, with no new study")
    parser.add_argument("--smoke", action="store_true", help="synthetic:600, 2 trials, a cnn-16 student of 1 epoch")
    parser.add_argument("--train-args", default="",
                        help="more `train` flags after the preset's, which they override: a smaller teacher study "
                             "on a slow machine, e.g. \"--max_examples 12000 --n_trials 4 --epochs 2\"")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="emnist-distill-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # MLflow puts artifacts under ./mlruns
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # the graphs' downloads would print bars
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    train = [sys.executable, "-m", "emnist_exp.train", "--study", STUDY, "--storage", f"sqlite:///{work / 'optuna.db'}"]
    if args.smoke:
        train += ["--dataset", "synthetic:600", "--n_trials", "2", "--epochs", "1", "--pruner", "none"]
        # a small seed CNN: the student that trains fastest, and the one a phone would serve
        args.epochs, args.arch, args.width = args.epochs or 1, args.arch or "cnn", args.width or 16
    else:
        train += ["--preset", "sample"]
    train += shlex.split(args.train_args)
    top = 2 if args.smoke else 5

    from emnist_exp import data  # noqa: PLC0415
    from emnist_exp.tracking import models, queries, runs, students, tags  # noqa: PLC0415

    commit = runs.git_commit()[:7]  # now: the checkout may move while this runs
    rates = [training_rate(3 if args.smoke else 60, 128)]
    log = work / "distill.log"
    if args.ensemble:
        train_s = ensemble_s = 0.0
        teacher = ["--ensemble", args.ensemble]
    else:
        train_s = run(train, env, log)
        ensemble_s = run([sys.executable, "-m", "emnist_exp.ensemble", "--study", STUDY, "--top", str(top)], env, log)
        teacher = ["--study", STUDY]
    distill = [sys.executable, "-m", "emnist_exp.distill", *teacher, "--epochs", str(args.epochs), "--arch", args.arch,
               "--width", str(args.width)]
    for flag, value in (("--temperature", args.temperature), ("--alpha", args.alpha)):
        if value is not None:  # unset: distill's own default, which is what a user gets
            distill += [flag, str(value)]
    distill_s = run(distill, env, log)
    rates.append(training_rate(3 if args.smoke else 60, 128))

    study = queries.ensemble_run(args.ensemble).data.tags[tags.STUDY_TAG] if args.ensemble else STUDY
    student = queries.study_runs(study, "distilled")[0]
    teacher = queries.ensemble_run(student.data.tags[students.TEACHER_TAG])
    m, p = student.data.metrics, student.data.params
    dataset = p["dataset"]
    images = np.stack([x for x, _ in data.load_splits(dataset).test.as_numpy_iterator()]).astype(np.float32)
    repeats = 1 if args.smoke else 3
    ensemble_rate = graph_rate(models.download_graph(teacher.info.run_id) / "ensemble.keras", images, repeats)
    student_rate = graph_rate(models.download_graph(student.info.run_id) / students.GRAPH_FILE, images, repeats)

    stand_in = " (synthetic: a stand-in, not EMNIST)" if dataset.startswith("synthetic") else ""
    print(f"\ndataset {dataset}{stand_in}{' (smoke)' if args.smoke else ''}, {os.cpu_count()} CPUs, commit {commit}, "
          f"stores in {work}")
    print("training rate (seed CNN, batch 128): " + " / ".join(f"{r:,.0f}" for r in rates)
          + " images/s (before / after the commands)")
    if args.ensemble:
        print(f"teacher: ensemble run {args.ensemble}, already in the stores")
    else:
        print("teacher study: train " + " ".join(train[train.index("--storage") + 2:]) + f", then ensemble --top {top}")
    print(f"train {train_s / 60:.1f} min, ensemble {ensemble_s:.0f} s, distill {distill_s:.0f} s "
          f"(teacher targets {m['teacher_targets_seconds']:.0f} s; student {p['arch']}-{p['width']}, "
          f"{int(m['epochs_run'])} epochs, T {float(p['temperature']):g}, alpha {float(p['alpha']):g})")
    rows = [(f"ensemble graph ({teacher.data.params['strategy']} x{teacher.data.params['n_members']})",
             m["teacher_val_accuracy"], m["teacher_test_accuracy"], m["teacher_param_count"], ensemble_rate),
            ("best member by validation", m["best_member_val_accuracy"], m["best_member_test_accuracy"],
             m["best_member_param_count"], None),
            (f"student {p['arch']}-{p['width']}", m["val_accuracy"], m["test_accuracy"], m["param_count"],
             student_rate)]
    print(f"{'model':<28}{'val_acc':>9}{'test_acc':>9}{'params':>11}{'images/s':>10}  vs ensemble graph")
    for name, val, test, params, speed in rows:
        shown = "" if speed is None else f"{speed:,.0f}"
        ratio = "" if speed is None else f"{speed / ensemble_rate:.2f}x"
        print(f"{name:<28}{val:>9.4f}{test:>9.4f}{params:>11,.0f}{shown:>10}  {ratio}")
    print(f"student - ensemble (test): {100 * (m['test_accuracy'] - m['teacher_test_accuracy']):+.2f} points; "
          f"student - best member (test): {100 * (m['test_accuracy'] - m['best_member_test_accuracy']):+.2f} points")


if __name__ == "__main__":
    main()
