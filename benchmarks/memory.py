"""Peak RSS while training, from 10k images to a 700k synthetic set: the RAM ceiling stays flat.

    python benchmarks/memory.py                # 10k and all 85k of the real sample, 700k synthetic
    python benchmarks/memory.py --smoke        # tiny synthetic sets: checks that the script runs

Each row is one fresh process that trains the tuned CNN (augmentation on) for one epoch over every
training image of its set, validates, and predicts validation and test, as a trial does. The set
is prepared (tfds download_and_prepare) in an earlier process, so only training is measured.
For scale: bymerge's 697,932 x 784 train pixels as int64 (pandas' default for a CSV) are 4.4 GB before
any copy; the pipeline streams uint8 blocks instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE = "idx:../shared/data/emnist-bymerge-sample"

CHILD = """
import json, resource, sys, time
from emnist_exp import data, trainer
from emnist_exp.spec import TrialSpec
dataset, cap = sys.argv[1], int(sys.argv[2])
splits = data.load_splits(dataset, max_examples=cap)
spec = TrialSpec(augment=True, rotation=8, shift=0.06, zoom=0.06, elastic=0.2, schedule="onecycle",
                 batch_size=128, learning_rate=2e-3, label_smoothing=0.1, dropout=0.3)
started = time.perf_counter()
result = trainer.train_spec(spec, splits, epochs=1, patience=1, seed=0, shuffle_buffer=10_000, verbose=0)
print(json.dumps({"train": splits.counts["train"], "val": splits.counts["val"], "test": splits.counts["test"],
                  "seconds": time.perf_counter() - started, "val_accuracy": result.val_accuracy,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: a measurement process failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=SAMPLE, help=f"the real sample's SPEC (default: {SAMPLE})")
    parser.add_argument("--smoke", action="store_true", help="tiny synthetic sets: a check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        rows = [("synthetic:600", 300, "300 images"), ("synthetic:600", 0, "synthetic:600"),
                ("synthetic:1200", 0, "synthetic:1200")]
    else:
        rows = [(args.sample, 10_000, "10k of the sample"), (args.sample, 0, "the whole sample"),
                ("synthetic:700000", 0, "700k synthetic")]
    for dataset in dict.fromkeys(d for d, _, _ in rows):  # prepare first, outside the measurement
        started = time.perf_counter()
        child(f"from emnist_exp import data; data.load_splits({dataset!r})")
        print(f"prepared {dataset} in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    results = []
    for dataset, cap, label in rows:
        r = json.loads(child(CHILD, dataset, str(cap)))
        results.append((label, r))
        print(f"measured {label}: {r['peak_rss_mb']:,.0f} MB", file=sys.stderr)
    base = results[0][1]["peak_rss_mb"]
    print(f"peak RSS training one epoch (tuned CNN, augmentation on, batch 128), {os.cpu_count()} CPUs")
    header = f"{'set':<20} {'train images':>12} {'epoch+eval s':>12} {'peak RSS MB':>11} {'vs first':>8}"
    print(header)
    for label, r in results:
        print(f"{label:<20} {r['train']:>12,} {r['seconds']:>12.0f} {r['peak_rss_mb']:>11,.0f} "
              f"{r['peak_rss_mb'] / base - 1:>+8.1%}")


if __name__ == "__main__":
    main()
