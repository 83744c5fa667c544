"""Pipeline against model: images/s that tf.data delivers (augmentation off/on) and that training takes.

    python benchmarks/pipeline.py [--dataset idx:../shared/data/emnist-bymerge-sample] [--smoke]

Each rate is measured alone, one after the other, on all cores. Memory: benchmarks/memory.py.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE = "idx:../shared/data/emnist-bymerge-sample"


def pipeline_rate(dataset: str, augment: bool, batches: int, batch_size: int, elastic: float = 0.0) -> float:
    from emnist_exp import data, model, pipelines
    from emnist_exp.spec import TrialSpec

    splits = data.load_splits(dataset)
    spec = TrialSpec(augment=augment, rotation=10, shift=0.08, zoom=0.08, elastic=elastic)
    ds = pipelines.training_pipeline(splits.train.repeat(), num_classes=47, batch_size=batch_size, seed=0,
                                     shuffle_buffer=10_000, augment=model.build_augmenter(spec, 0))
    it = iter(ds)
    for _ in range(20):  # warm-up: graph tracing, shuffle buffer fill, autotuning
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def training_rate(steps: int, batch_size: int, arch: str = "cnn", width: int = 32) -> float:
    """A member's training images/s on batches already in memory (the model alone); the seed CNN by default."""
    import numpy as np
    import tensorflow as tf

    from emnist_exp import model
    from emnist_exp.spec import TrialSpec

    spec = TrialSpec(arch=arch, width=width, batch_size=batch_size)
    net = model.compile_model(model.build_model(spec, 47), spec, steps, 1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size * 8, 28, 28, 1)).astype("float32")
    y = np.eye(47, dtype="float32")[rng.integers(0, 47, batch_size * 8)]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache().repeat()
    net.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
    start = time.perf_counter()
    net.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SAMPLE, help=f"dataset SPEC (default: {SAMPLE})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that the script runs")
    args = parser.parse_args()
    batches, steps = (5, 3) if args.smoke else (300, 60)
    batch = 128
    training = training_rate(steps, batch)
    rates = [
        ("pipeline, augmentation off", pipeline_rate(args.dataset, False, batches, batch)),
        ("pipeline, augmentation on (rotate, shift, zoom)", pipeline_rate(args.dataset, True, batches, batch)),
        ("pipeline, augmentation on + elastic 0.3", pipeline_rate(args.dataset, True, batches, batch, 0.3)),
    ]
    rows = [("training (seed CNN, batch 128)", f"{training:,.0f} images/s", "1.0x")]
    rows += [(name, f"{rate:,.0f} images/s", f"{rate / training:.1f}x") for name, rate in rates]
    width = max(len(r[0]) for r in rows)
    print(f"dataset {args.dataset}, {os.cpu_count()} CPUs")
    print(f"{'measure':<{width}}  {'value':>15}  vs training")
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>15}  {ratio}")


if __name__ == "__main__":
    main()
