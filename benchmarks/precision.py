"""Mixed precision against float32: training rate, FLOP/s against the CPU's peak, and paired test accuracy.

    python benchmarks/precision.py       # the real sample, every member of the tuned space at batch 32 and 64
    python benchmarks/precision.py --smoke    # synthetic, tiny sizes: a check that it runs

Rates: each member of the `tuned` space (search.TUNED_WIDTHS) is built once per policy and trained
through the real input pipeline (`data.load_splits` -> `pipelines.training_pipeline`, augmentation
off: the tuned space trains half its members without it), the policies taking turns for
`--rounds` rounds in one process, so a busy shared machine slows both alike. Each turn is one
`fit` whose first steps (iterator, shuffle buffer, autotuning) are not timed. The cells give the
median and range over rounds; the ratio is the median of each round's bf16/float32.
The seed CNN also trains in float32 with XLA (`jit_compile=True`), the compiler Keras turns on
by itself where a GPU is visible and models.compile_model turns off.

FLOP/s: conv and dense multiply-adds counted from the layer shapes (2 FLOPs each), x3 for a
training step (forward, and backward for inputs and weights), against two peaks: the assumed
one (cores x clock x 32 FLOPs a cycle: two 256-bit FMA pipes of 8 float32 each, the widest
vectors this CPU reports, AVX2) and a measured one (a large float32 matmul).

Accuracy: fixed tuned-space recipes trained in both policies with the same seed on a capped
slice of the data (--accuracy-examples, --accuracy-epochs: bf16 is emulated on CPUs without
native bf16 and trains slowly), scored on test by the float32 model each trial logs. The
difference carries its paired standard error (the same test images for both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras  # noqa: E402

from pipeline import SAMPLE, training_rate  # noqa: E402

from emnist_exp import data, model as models, pipelines, precision, trainer  # noqa: E402
from emnist_exp.search import TUNED_WIDTHS  # noqa: E402
from emnist_exp.spec import TrialSpec  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16")
XLA = "float32 + XLA"
FLOPS_PER_CYCLE = 32  # float32, per core: 2 FMA pipes x 8 lanes (256-bit AVX2) x 2 FLOPs per FMA
# Two members of the tuned space (its searched values fixed) for the paired accuracy test.
ACCURACY_RECIPES = (
    TrialSpec(arch="cnn", width=32, schedule="onecycle", batch_size=64, learning_rate=2e-3, dropout=0.3,
              label_smoothing=0.05),
    TrialSpec(arch="vgg5", width=24, schedule="onecycle", batch_size=64, learning_rate=2e-3, dropout=0.3,
              label_smoothing=0.05),
)


class StepClock(keras.callbacks.Callback):
    """Images/s over the steps after the first `skip` of one fit."""

    def __init__(self, skip: int, batch_size: int):
        super().__init__()
        self.skip, self.batch_size, self.times = skip, batch_size, []

    def on_train_batch_end(self, batch: int, logs=None) -> None:
        self.times.append(time.perf_counter())

    def rate(self) -> float:
        timed = self.times[self.skip - 1:]
        return (len(timed) - 1) * self.batch_size / (timed[-1] - timed[0])


def training_flops(net: keras.Model) -> float:
    """FLOPs of one training image: conv and dense multiply-adds from the layer shapes, x2, x3 for a step."""
    macs = 0
    for layer in net.layers:
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            macs += h * w * c_out * kh * kw * layer.input.shape[-1]
        elif isinstance(layer, keras.layers.Dense):
            macs += layer.input.shape[-1] * layer.units
    return 3 * 2 * macs


def member_nets(spec: TrialSpec, variants: list[str], steps: int) -> dict[str, keras.Model]:
    nets = {}
    for variant in variants:
        policy = "float32" if variant == XLA else variant
        net = models.compile_model(models.build_model(spec, 47, policy), spec, steps, 1)
        if variant == XLA:
            net.compile(optimizer=net.optimizer, loss=net.loss, metrics=["accuracy"], jit_compile=True)
        nets[variant] = net
    return nets


def rates(splits: data.Splits, members: list[tuple[str, int]], batches: list[int], rounds: int, steps: int,
          skip: int) -> list[dict]:
    rows = []
    for arch, width in members:
        for batch in batches:
            spec = TrialSpec(arch=arch, width=width, batch_size=batch, schedule="onecycle")
            variants = [*POLICIES, *([XLA] if arch == "cnn" and batch == batches[-1] and rounds > 1 else [])]
            keras.backend.clear_session()
            nets = member_nets(spec, variants, steps)
            ds = pipelines.training_pipeline(splits.train.repeat(), num_classes=len(splits.classes), batch_size=batch,
                                             seed=0, shuffle_buffer=10_000)
            measured = {v: [] for v in variants}
            for r in range(rounds + 1):  # round 0 traces and warms every net, untimed
                order = variants if r % 2 else variants[::-1]
                for variant in order:
                    # bf16 emulated on CPU is several times slower: fewer steps keep its turn short
                    n = steps if variant != "mixed_bfloat16" else max(skip + 3, steps // 4)
                    clock = StepClock(skip, batch)
                    nets[variant].fit(ds, steps_per_epoch=n if r else skip + 2, epochs=1, verbose=0,
                                      callbacks=[clock])
                    if r:
                        measured[variant].append(clock.rate())
            row = {"member": f"{arch}-{width}", "batch": batch, "rates": measured,
                   "flops": training_flops(nets["float32"])}
            print(f"measured {row['member']} batch {batch}: " + ", ".join(
                f"{v} {statistics.median(x):,.0f}" for v, x in measured.items()), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def measured_peak(dtype: str, size: int = 1024, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul, the best of `repeats`: what the CPU's BLAS reaches on the easiest kernel."""
    import tensorflow as tf

    a = tf.random.normal((size, size), dtype=tf.float32)
    a = tf.cast(a, dtype)
    tf.linalg.matmul(a, a).numpy()
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        tf.linalg.matmul(a, a).numpy()
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def assumed_peak() -> tuple[float, str]:
    """GFLOP/s: cores x clock x FLOPS_PER_CYCLE, the clock as /proc/cpuinfo reports it."""
    mhz = 0.0
    try:
        mhz = max(float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("cpu MHz"))
    except (OSError, ValueError):
        pass
    cores = os.cpu_count() or 1
    return cores * mhz / 1e3 * FLOPS_PER_CYCLE, f"{cores} cores x {mhz / 1e3:.2f} GHz x {FLOPS_PER_CYCLE} FLOP/cycle"


def accuracy(dataset: str, examples: int, epochs: int, seed: int) -> tuple[data.Splits, list[dict]]:
    splits = data.load_splits(dataset, max_examples=examples, seed=seed)
    rows = []
    for spec in ACCURACY_RECIPES:
        correct = {}
        for policy in POLICIES:
            started = time.perf_counter()
            result = trainer.train_spec(spec, splits, epochs=epochs, patience=epochs, seed=seed,
                                        shuffle_buffer=10_000, verbose=0, policy=policy)
            correct[policy] = result.test_probs.argmax(axis=1) == result.test_labels
            assert result.model.output.dtype == "float32" and result.test_probs.dtype == np.float32
            print(f"trained {spec.arch}-{spec.width} in {policy}: {time.perf_counter() - started:.0f} s, "
                  f"test {correct[policy].mean():.4f}", file=sys.stderr, flush=True)
        rows.append({"member": f"{spec.arch}-{spec.width}", "correct": correct})
    return splits, rows


def spread(values: list[float], fmt: str = ",.0f") -> str:
    return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


def print_rates(rows: list[dict], rounds: int, dataset: str) -> list[float]:
    print(f"training rate, images/s: {dataset} through pipelines.training_pipeline (augmentation off), "
          f"policies alternating, median [range] of {rounds} rounds")
    header = ("member", "batch", "float32", "mixed_bfloat16", "bf16 / f32", XLA)
    print(f"{header[0]:<10} {header[1]:>5}  {header[2]:>20}  {header[3]:>20}  {header[4]:>18}  {header[5]:>20}")
    ratios = []
    for row in rows:
        r = row["rates"]
        ratio = [b / f for f, b in zip(r["float32"], r["mixed_bfloat16"])]
        ratios.append(statistics.median(ratio))
        xla = spread(r[XLA]) if XLA in r else "not run"
        print(f"{row['member']:<10} {row['batch']:>5}  {spread(r['float32']):>20}  {spread(r['mixed_bfloat16']):>20}  "
              f"{spread(ratio, '.2f') + 'x':>18}  {xla:>20}")
    return ratios


def print_flops(rows: list[dict]) -> None:
    peak, how = assumed_peak()
    f32, bf16 = measured_peak("float32"), measured_peak("bfloat16")
    flags = precision.cpu_flags()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "neither AVX2 nor AVX-512"
    native = ", ".join(sorted(flags & set(precision.BF16_CPU_FLAGS))) or "no native bf16"
    print(f"peak assumed: {peak:.0f} GFLOP/s float32 ({how}, the AVX2 rate; this CPU reports {vector}, {native}); "
          f"measured 1024^2 matmul: {f32:.0f} GFLOP/s float32, {bf16:.0f} bfloat16")
    print(f"{'member':<10} {'batch':>5}  {'MFLOP/image':>11}  {'float32 GFLOP/s':>15}  {'of peak':>7}  "
          f"{'bf16 GFLOP/s':>12}  {'of peak':>7}")
    for row in rows:
        r, flops = row["rates"], row["flops"]
        achieved = {p: statistics.median(r[p]) * flops / 1e9 for p in POLICIES}
        print(f"{row['member']:<10} {row['batch']:>5}  {flops / 1e6:>11.1f}  {achieved['float32']:>15.1f}  "
              f"{achieved['float32'] / peak:>7.0%}  {achieved['mixed_bfloat16']:>12.1f}  "
              f"{achieved['mixed_bfloat16'] / peak:>7.0%}")


def print_accuracy(splits: data.Splits, rows: list[dict], epochs: int, seed: int) -> None:
    n = splits.counts["test"]
    print(f"test accuracy, same seed ({seed}) in both policies: {splits.counts['train']:,} train images, {epochs} "
          f"epochs, {n:,} test images (a capped slice: see --accuracy-examples); +- is the standard error")
    print(f"{'member':<10}  {'float32':>16}  {'mixed_bfloat16':>16}  {'bf16 - f32':>18}  {'within 1 paired SE':>18}")
    for row in rows:
        a, b = (row["correct"][p].astype(float) for p in POLICIES)
        se = lambda x: np.sqrt(x.mean() * (1 - x.mean()) / len(x))  # noqa: E731
        diff = b - a
        paired = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else float("nan")
        print(f"{row['member']:<10}  {a.mean():>8.4f} +- {se(a):.4f}  {b.mean():>8.4f} +- {se(b):.4f}  "
              f"{diff.mean():>+8.4f} +- {paired:.4f}  {'yes' if abs(diff.mean()) <= paired else 'no':>18}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SAMPLE, help=f"dataset SPEC (default: {SAMPLE})")
    parser.add_argument("--rounds", type=int, default=3, help="timed turns of each policy per member (default: 3)")
    parser.add_argument("--steps", type=int, default=40, help="float32 steps per turn; bf16 takes a quarter "
                        "(default: 40)")
    parser.add_argument("--accuracy-examples", type=int, default=6000, help="train examples (validation "
                        "included) and test examples for the accuracy part (default: 6000)")
    parser.add_argument("--accuracy-epochs", type=int, default=2, help="epochs of each accuracy run (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="Keras and tf.data seed (default: 0)")
    parser.add_argument("--part", choices=["all", "rates", "accuracy"], default="all",
                        help="rates (with FLOP/s), accuracy, or both (default: all)")
    parser.add_argument("--smoke", action="store_true", help="synthetic:600, the seed CNN at batch 32, one round; "
                        "accuracy on 150 examples, one epoch")
    args = parser.parse_args()
    members = [(arch, w) for arch, widths in TUNED_WIDTHS.items() for w in widths]
    batches, skip = [32, 64], 2
    if args.smoke:
        args.dataset, args.rounds, args.steps = "synthetic:600", 1, 8
        args.accuracy_examples, args.accuracy_epochs = 150, 1
        members, batches = [("cnn", 32)], [32]
    from emnist_exp.tracking.runs import git_commit  # noqa: PLC0415

    commit = git_commit()[:7]
    rate_steps = 3 if args.smoke else 60
    # The machine's training rate before, between and after; --part accuracy leaves it to benchmarks/pipeline.py.
    measure = (lambda: training_rate(rate_steps, 128)) if args.part != "accuracy" else (lambda: float("nan"))
    before = measure()
    splits = data.load_splits(args.dataset, seed=args.seed)
    rows = [] if args.part == "accuracy" else rates(splits, members, batches, args.rounds, args.steps, skip)
    between = measure()
    acc = None if args.part == "rates" else accuracy(args.dataset, args.accuracy_examples, args.accuracy_epochs,
                                                     args.seed)
    after = measure()

    flags = precision.cpu_flags()
    native = sorted(flags & set(precision.BF16_CPU_FLAGS)) or ["none"]
    print(f"dataset {args.dataset}; {os.cpu_count()} CPUs; commit {commit}; native bf16 flags: {', '.join(native)}; "
          f"keras {keras.__version__}; random arrays: only in the training-rate rows (benchmarks/pipeline.py)")
    print(f"training rate (seed CNN, batch 128, float32): {before:,.0f} / {between:,.0f} / {after:,.0f} images/s "
          "(before / between / after)")
    print()
    if rows:
        ratios = print_rates(rows, args.rounds, args.dataset)
        print()
        print_flops(rows)
    if acc:
        print()
        print_accuracy(*acc, args.accuracy_epochs, args.seed)
    print()
    if not rows:
        return
    speedup = statistics.median(ratios)
    print(f"bf16 / float32 over the members and batches: median {speedup:.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]; "
          f"pays (>= {precision.PAYS}x): {'yes' if speedup >= precision.PAYS else 'no'}")
    print(f"auto on this machine: {precision.choose(precision.gpu_capabilities(), flags)}")


if __name__ == "__main__":
    main()
