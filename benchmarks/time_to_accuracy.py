"""Time to accuracy: the seed recipe against the project's best single recipe, in one run on one machine.

    python benchmarks/time_to_accuracy.py            # the real sample: seed 10 epochs, best 5
    python benchmarks/time_to_accuracy.py --smoke    # synthetic, one epoch each: a check that it runs
    python benchmarks/time_to_accuracy.py --precision mixed_bfloat16   # the best recipe in bf16

The seed recipe is the Kaggle one (seed CNN, Adam 1e-3*0.95^epoch, batch 32, no augmentation);
its final validation accuracy (the best epoch's, which training keeps) is the target. The seed
recipe trains in float32, as it was published; `--precision` sets the best recipe's Keras dtype
policy (both are scored by the float32 model that leaves training). Both recipes
train through `trainer.train_spec`, one after the other, and are evaluated on validation
`--evals` times an epoch. Their clocks count training only: the evaluations are the measuring
instrument and are left out. The table gives the training seconds each recipe needs to first reach
the target, and their ratio. Validation is carved from train; test is only reported.

Training rates of the seed CNN at batch 128 (`benchmarks/pipeline.py`'s "training" row) are
measured before, between and after, because the machine's speed varies and is shared.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402

from pipeline import SAMPLE, training_rate  # noqa: E402

from emnist_exp import data, trainer  # noqa: E402
from emnist_exp.precision import PRECISIONS  # noqa: E402
from emnist_exp.spec import TrialSpec  # noqa: E402

SEED_RECIPE = TrialSpec()
# The best single recipe measured on the sample: the `sample` protocol's best trial by validation
# (VGG-5 at width 32, one-cycle over 5 epochs at batch 32, no augmentation; BENCHMARKS.md,
# "Accuracy: the protocol on the real sample"), its searched values rounded.
BEST_RECIPE = TrialSpec(arch="vgg5", width=32, schedule="onecycle", batch_size=32, learning_rate=2.7e-3,
                        label_smoothing=0.02, dropout=0.31)


class ValidationClock(keras.callbacks.Callback):
    """Validation accuracy `evals` times an epoch against training seconds (evaluations excluded)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, steps_per_epoch: int, evals: int):
        super().__init__()
        self.images, self.labels = images, labels
        self.steps_per_epoch = steps_per_epoch
        self.every = max(1, steps_per_epoch // evals)
        self.points: list[tuple[float, float, float]] = []  # (train seconds, epochs, val accuracy)
        self.paused = 0.0
        self.step = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.started - self.paused

    def on_train_begin(self, logs=None) -> None:
        self.started = time.perf_counter()

    def on_test_begin(self, logs=None) -> None:  # Keras' own end-of-epoch validation
        self.test_started = time.perf_counter()

    def on_test_end(self, logs=None) -> None:
        self.paused += time.perf_counter() - self.test_started

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self.step += 1
        if self.step % self.every or self.step % self.steps_per_epoch == 0:
            return  # the epoch's last step is measured by Keras' validation, at on_epoch_end
        now = self.seconds()
        paused = time.perf_counter()
        scores = np.concatenate([self.model(self.images[i:i + 1024], training=False).numpy()
                                 for i in range(0, len(self.images), 1024)])
        self.record(now, self.step / self.steps_per_epoch, trainer.accuracy(scores, self.labels))
        self.paused += time.perf_counter() - paused

    def record(self, seconds: float, epochs: float, accuracy: float) -> None:
        self.points.append((seconds, epochs, accuracy))
        print(f"  epoch {epochs:.2f}: {seconds:.0f} s, val {accuracy:.4f}", file=sys.stderr, flush=True)

    def on_epoch_end(self, epoch: int, logs=None) -> None:
        self.record(self.seconds(), epoch + 1.0, float((logs or {})["val_accuracy"]))

    def on_train_end(self, logs=None) -> None:
        self.total = self.seconds()


def first_reach(points: list[tuple[float, float, float]], target: float) -> tuple[float, float] | None:
    """(seconds, epochs) of the first evaluation at or above target, or None."""
    return next(((s, e) for s, e, acc in points if acc >= target), None)


def train(spec: TrialSpec, splits: data.Splits, epochs: int, evals: int, seed: int, policy: str = "float32"):
    images = np.stack([x for x, _ in splits.val.as_numpy_iterator()]).astype(np.float32)
    steps = splits.counts["train"] // min(spec.batch_size, splits.counts["train"])
    clock = ValidationClock(images, splits.val_labels, steps, evals)
    result = trainer.train_spec(spec, splits, epochs=epochs, patience=epochs, seed=seed, shuffle_buffer=10_000,
                                callbacks=[clock], verbose=0, policy=policy)
    return result, clock


def describe(spec: TrialSpec) -> str:
    return (f"{spec.arch}-{spec.width}, {spec.schedule} lr {spec.learning_rate:g}, batch {spec.batch_size}, "
            f"ls {spec.label_smoothing:g}, dropout {spec.dropout:g}, aug {'on' if spec.augment else 'off'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SAMPLE, help=f"dataset SPEC (default: {SAMPLE})")
    parser.add_argument("--seed-epochs", type=int, default=10, help="epochs of the seed recipe (default: 10)")
    parser.add_argument("--best-epochs", type=int, default=5, help="one-cycle epochs of the best recipe (default: 5)")
    parser.add_argument("--evals", type=int, default=4, help="validation evaluations per epoch (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="Keras and tf.data seed (default: 0)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS[1:],
                        help="Keras dtype policy of the best recipe; the seed recipe trains in float32 (default: float32)")
    parser.add_argument("--smoke", action="store_true", help="synthetic:600, one epoch each: a check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.dataset, args.seed_epochs, args.best_epochs, args.evals = "synthetic:600", 1, 1, 2
    commit = git_commit()  # now: the checkout may move while this runs
    rate_steps = 3 if args.smoke else 60
    splits = data.load_splits(args.dataset)
    rates = [training_rate(rate_steps, 128)]
    runs = {}
    recipes = (("seed recipe", SEED_RECIPE, args.seed_epochs, "float32"),
               ("best recipe", BEST_RECIPE, args.best_epochs, args.precision))
    for name, spec, epochs, policy in recipes:
        print(f"training the {name}: {describe(spec)}, {epochs} epochs, {policy}", file=sys.stderr, flush=True)
        runs[name] = (spec, epochs, *train(spec, splits, epochs, args.evals, args.seed, policy))
        rates.append(training_rate(rate_steps, 128))
    target = runs["seed recipe"][2].val_accuracy
    reach = {name: first_reach(clock.points, target) for name, (_, _, _, clock) in runs.items()}

    print(f"dataset {args.dataset}: {splits.counts['train']:,} train, {splits.counts['val']:,} val, "
          f"{splits.counts['test'] or 0:,} test; {os.cpu_count()} CPUs; commit {commit}")
    print("training rate (seed CNN, batch 128): " + " / ".join(f"{r:,.0f}" for r in rates)
          + " images/s (before / between / after)")
    print(f"target: the seed recipe's final val accuracy {target:.4f}")
    header = ("recipe", "params", "epochs", "s/epoch", "val", "test", "train s", "s to target", "epochs to target")
    print("  ".join(f"{h:>16}" for h in header))
    for name, (spec, epochs, result, clock) in runs.items():
        hit = reach[name]
        test = result.test_accuracy
        cells = (name, f"{result.model.count_params():,}", str(result.epochs_run),
                 f"{clock.total / max(1, result.epochs_run):.1f}", f"{result.val_accuracy:.4f}",
                 "n/a" if test is None else f"{test:.4f}", f"{clock.total:.1f}",
                 "not reached" if hit is None else f"{hit[0]:.1f}", "not reached" if hit is None else f"{hit[1]:.2f}")
        print("  ".join(f"{c:>16}" for c in cells))
    for name, spec, _, policy in recipes:
        print(f"{name}: {describe(spec)}, {policy}")
    if reach["best recipe"] is None:
        print("speed-up to target: not reached by the best recipe")
    else:
        print(f"speed-up to target: {reach['seed recipe'][0] / reach['best recipe'][0]:.2f}x")
    for name, (*_, clock) in runs.items():
        print(f"curve {name}: " + " ".join(f"{e:.2f}:{s:.0f}s:{acc:.4f}" for s, e, acc in clock.points))


def git_commit() -> str:
    from emnist_exp.tracking.runs import git_commit as commit  # noqa: PLC0415

    return commit()[:7]


if __name__ == "__main__":
    main()
