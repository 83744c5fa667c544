"""One member of each architecture on one recipe, their ensemble, and the exported graph against the pyfunc.

    python benchmarks/members.py --workdir DIR                       # the real sample, 3 epochs each
    python benchmarks/members.py --smoke                             # synthetic:1500, 1 epoch: checks it runs

It queues one trial per architecture (the `tuned` space's recipe with no augmentation: one-cycle,
batch 64, lr 2e-3, label smoothing 0.05, dropout 0.3) into a fresh study, then runs the user
commands

    python -m emnist_exp.train --study members --space tuned --n_trials 3 ...
    python -m emnist_exp.ensemble --study members --top 3

in a fresh tracking store under --workdir, and reads the runs back. Members are compared at equal
epochs; selection and voting use validation, test is only reported. Last, the ensemble run's
exported graph (.keras and SavedModel) and its pyfunc score the test images: their largest
difference in class scores, and each one's images/s (the same images, batch 512, one at a time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from accuracy import run  # noqa: E402
from pipeline import SAMPLE, training_rate  # noqa: E402

WIDTH = {"cnn": 32, "resnet": 24, "vgg5": 32}  # members of about equal time per epoch (BENCHMARKS.md)
RECIPE = {"augment": False, "dropout": 0.3, "learning_rate": 2e-3, "batch_size": 64, "label_smoothing": 0.05}
STUDY = "members"


def queue_trials(cfg) -> None:
    """One trial per architecture, queued so the train command runs them before it samples."""
    from emnist_exp import study as studies  # noqa: PLC0415

    study = studies.open_study(cfg)
    for arch, width in WIDTH.items():
        study.enqueue_trial({"arch": arch, f"{arch}_width": width, **RECIPE})


def overlap(wrong: list[np.ndarray]) -> float:
    """Share of the examples any member gets wrong that every member gets wrong."""
    return float(np.logical_and.reduce(wrong).sum() / max(1, np.logical_or.reduce(wrong).sum()))


def rate(predict, images: np.ndarray, repeats: int) -> tuple[np.ndarray, float]:
    predict(images[:512])  # warm-up: tracing and loading
    started = time.perf_counter()
    for _ in range(repeats):
        scores = predict(images)
    return np.asarray(scores, dtype=np.float64), repeats * len(images) / (time.perf_counter() - started)


def graph_against_pyfunc(run_id: str, images: np.ndarray, repeats: int) -> list[tuple[str, str]]:
    import keras  # noqa: PLC0415
    import mlflow  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    from emnist_exp.tracking import models  # noqa: PLC0415

    folder = models.download_graph(run_id)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/{models.MODEL_NAME}").unwrap_python_model()
    graph = keras.saving.load_model(folder / "ensemble.keras")
    served = tf.saved_model.load(str(folder / "saved_model"))

    def serve(x):
        return np.concatenate([served.serve(tf.constant(x[i:i + 512])).numpy() for i in range(0, len(x), 512)])

    reference, pyfunc_rate = rate(pyfunc.class_scores, images, repeats)
    keras_scores, keras_rate = rate(lambda x: graph.predict(x, batch_size=512, verbose=0), images, repeats)
    saved_scores, saved_rate = rate(serve, images, repeats)
    rows = [("pyfunc class_scores (members' float16 outputs, numpy vote)", f"{pyfunc_rate:,.0f} images/s", "1.00x")]
    for name, scores, speed in (("graph, .keras (Keras predict)", keras_scores, keras_rate),
                                ("graph, SavedModel serve", saved_scores, saved_rate)):
        diff = np.abs(scores - reference).max()
        agree = np.mean(scores.argmax(axis=1) == reference.argmax(axis=1))
        rows.append((name, f"{speed:,.0f} images/s", f"{speed / pyfunc_rate:.2f}x",
                     f"max |score - pyfunc| {diff:.2e}, same class {100 * agree:.2f}%"))
    return rows


def print_rates(steps: int) -> None:
    """Training images/s (batches in memory, batch 64) of each tuned width, the seed CNN at 128 around them."""
    from emnist_exp.search import TUNED_WIDTHS  # noqa: PLC0415

    before = training_rate(steps, 128)
    rates = {(arch, w): training_rate(steps, 64, arch, w) for arch, widths in TUNED_WIDTHS.items() for w in widths}
    after = training_rate(steps, 128)
    print(f"training rate (seed CNN, batch 128): {before:,.0f} / {after:,.0f} images/s (before / after)")
    base = rates[("cnn", 32)]
    print(f"{'member':<12}{'images/s':>10}  cost per epoch vs cnn-32")
    for (arch, w), value in rates.items():
        print(f"{arch + '-' + str(w):<12}{value:>10,.0f}  {base / value:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SAMPLE, help=f"dataset SPEC (default: {SAMPLE})")
    parser.add_argument("--epochs", type=int, default=3, help="one-cycle epochs of each member (default: 3)")
    parser.add_argument("--workdir", default=None, help="where the fresh stores go (default: a new temp dir)")
    parser.add_argument("--smoke", action="store_true", help="synthetic:1500, 1 epoch: checks the script runs")
    parser.add_argument("--rates", action="store_true",
                        help="only each architecture's training images/s at each width of the tuned space, batch 64")
    args = parser.parse_args()
    if args.rates:
        return print_rates(3 if args.smoke else 40)
    if args.smoke:
        args.dataset, args.epochs = "synthetic:1500", 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="emnist-members-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # MLflow puts artifacts under ./mlruns
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    storage = f"sqlite:///{work / 'optuna.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parent.parent),
                                                      os.environ.get("PYTHONPATH", "")]))

    from emnist_exp import data  # noqa: PLC0415
    from emnist_exp.tracking import queries, results, runs, tags  # noqa: PLC0415
    import mlflow  # noqa: PLC0415
    from emnist_exp.config import resolve  # noqa: PLC0415

    commit = runs.git_commit()[:7]  # now: the checkout may move while this runs
    flags = {"dataset": args.dataset, "study": STUDY, "space": "tuned", "n_trials": str(len(WIDTH)),
             "epochs": str(args.epochs), "patience": str(args.epochs), "pruner": "none", "storage": storage}
    queue_trials(resolve(flags))
    rate_steps = 3 if args.smoke else 60
    rates = [training_rate(rate_steps, 128)]
    log = work / "members.log"
    train_s = run([sys.executable, "-m", "emnist_exp.train", *(x for k, v in flags.items() for x in (f"--{k}", v))],
                  env, log)
    rates.append(training_rate(rate_steps, 128))
    ensemble_s = run([sys.executable, "-m", "emnist_exp.ensemble", "--study", STUDY, "--top", str(len(WIDTH)),
                      "--no-register"], env, log)

    client = mlflow.MlflowClient()
    trials = sorted(queries.finished_trials(study=STUDY), key=lambda r: int(r.data.tags[tags.TRIAL_TAG]))
    preds = [results.load_predictions(r.info.run_id) for r in trials]
    ens = queries.study_runs(STUDY, "ensemble")[0]
    test_labels = preds[0]["test_labels"]
    wrong = [p["test_probs"].argmax(axis=1) != test_labels for p in preds]

    print(f"\ndataset {args.dataset}{' (smoke)' if args.smoke else ''}, {os.cpu_count()} CPUs, commit "
          f"{commit}, stores in {work}")
    print("training rate (seed CNN, batch 128): " + " / ".join(f"{r:,.0f}" for r in rates)
          + " images/s (before / after training)")
    print(f"train command {train_s / 60:.1f} min for {len(trials)} members of {args.epochs} epochs; "
          f"ensemble command {ensemble_s:.0f} s")
    print(f"{'member':<14}{'params':>10}{'s/epoch':>9}{'val':>8}{'test':>8}  val by epoch")
    for r, p in zip(trials, preds):
        m, name = r.data.metrics, f"{r.data.params['arch']}-{r.data.params['width']}"
        curve = [h.value for h in sorted(client.get_metric_history(r.info.run_id, "epoch_val_accuracy"),
                                         key=lambda h: h.step)]
        print(f"{name:<14}{int(m['param_count']):>10,}{m['seconds_per_epoch']:>9.1f}{m['val_accuracy']:>8.4f}"
              f"{m['test_accuracy']:>8.4f}  " + " ".join(f"{v:.4f}" for v in curve))
    em = ens.data.metrics
    print(f"{'soft ensemble':<14}{'':>10}{'':>9}{em['val_accuracy']:>8.4f}{em['test_accuracy']:>8.4f}  "
          f"test gain over the best member by val {100 * em['test_gain_over_best_member']:+.2f} points")
    oracle = 1 - np.mean(np.logical_and.reduce(wrong))
    print(f"errors all members share (of test images any gets wrong) {100 * overlap(wrong):.1f}%; "
          f"oracle (right where any member is) test {oracle:.4f}")
    for i in range(len(trials)):
        for j in range(i + 1, len(trials)):
            a, b = (f"{trials[k].data.params['arch']}" for k in (i, j))
            print(f"errors shared {a} + {b}: {100 * overlap([wrong[i], wrong[j]]):.1f}%")

    images = np.stack([x for x, _ in data.load_splits(args.dataset).test.as_numpy_iterator()]).astype(np.float32)
    rows = graph_against_pyfunc(ens.info.run_id, images, repeats=1 if args.smoke else 2)
    print(f"\nexported graph against the pyfunc, {len(images):,} test images:")
    for row in rows:
        print("  ".join([f"{row[0]:<60}", *row[1:]]))


if __name__ == "__main__":
    main()
