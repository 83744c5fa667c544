"""Pipeline against model: images/s of tf.data (augmentation off/on), of training, and peak RSS.

    python benchmarks/pipeline.py [--dataset idx:../shared/data/emnist-bymerge-sample] [--smoke]

Each memory row runs in a fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE = "idx:../shared/data/emnist-bymerge-sample"


def pipeline_rate(dataset: str, augment: bool, batches: int, batch_size: int) -> float:
    from emnist_exp import data, model
    from emnist_exp.search import TrialSpec

    splits = data.load_splits(dataset)
    spec = TrialSpec(augment=augment, rotation=10, shift=0.08, zoom=0.08, elastic=0.3)
    ds = data.training_pipeline(splits.train.repeat(), num_classes=47, batch_size=batch_size, seed=0,
                                shuffle_buffer=10_000, augment=model.build_augmenter(spec, 0))
    it = iter(ds)
    for _ in range(5):  # warm-up: graph tracing, shuffle buffer fill
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def training_rate(steps: int, batch_size: int) -> float:
    """The seed CNN's training images/s on batches already in memory (the model alone)."""
    import numpy as np
    import tensorflow as tf

    from emnist_exp import model
    from emnist_exp.search import TrialSpec

    spec = TrialSpec(batch_size=batch_size)
    net = model.compile_model(model.build_model(spec, 47), spec, steps, 1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size * 8, 28, 28, 1)).astype("float32")
    y = np.eye(47, dtype="float32")[rng.integers(0, 47, batch_size * 8)]
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache().repeat()
    net.fit(ds, steps_per_epoch=3, epochs=1, verbose=0)
    start = time.perf_counter()
    net.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0)
    return steps * batch_size / (time.perf_counter() - start)


def stream_peak_rss(dataset: str, max_examples: int) -> dict:
    """In a child process: stream every training batch once (augmentation on); report peak RSS."""
    code = (
        "import json, resource, sys; from emnist_exp import data, model; from emnist_exp.search import TrialSpec\n"
        f"s = data.load_splits({dataset!r}, max_examples={max_examples})\n"
        "aug = model.build_augmenter(TrialSpec(augment=True, rotation=10, shift=0.08), 0)\n"
        "n = sum(int(x.shape[0]) for x, _ in data.training_pipeline(s.train, num_classes=47, batch_size=256,"
        " seed=0, shuffle_buffer=10000, augment=aug))\n"
        "print(json.dumps({'images': n, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=SAMPLE, help=f"dataset SPEC (default: {SAMPLE})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that the script runs")
    args = parser.parse_args()
    batches, steps, small = (5, 3, 300) if args.smoke else (200, 60, 10_000)
    batch = 128
    rows = [
        ("pipeline, augmentation off", f"{pipeline_rate(args.dataset, False, batches, batch):,.0f} images/s"),
        ("pipeline, augmentation on", f"{pipeline_rate(args.dataset, True, batches, batch):,.0f} images/s"),
        ("training (seed CNN, batch 128)", f"{training_rate(steps, batch):,.0f} images/s"),
    ]
    for cap, label in [(small, f"{small:,} images"), (0, "whole train split")]:
        result = stream_peak_rss(args.dataset, cap)
        rows.append((f"peak RSS streaming {label} ({result['images']:,} seen)", f"{result['peak_rss_mb']:,.0f} MB"))
    width = max(len(r[0]) for r in rows)
    print(f"dataset {args.dataset}, {os.cpu_count()} CPUs")
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
