"""Peak RSS and time on the user's path: `idx:` folders of the official files, from 10k to ~700k images.

    python benchmarks/memory.py                 # 10k, the whole sample, the sample's train x8 (678,760)
    python benchmarks/memory.py --synthetic     # ... and a second table row for synthetic:700000
    python benchmarks/memory.py --smoke --sample DIR   # two tiny folders made from DIR: checks the script runs
    python benchmarks/memory.py --precision mixed_bfloat16   # the epoch trained in another Keras dtype policy

The folders are built here, in a temporary folder, in EMNIST's official layout: 10k is the sample's
first 10,000 train images, the largest repeats the sample's whole train split (the test split is
the sample's, in all three). Each measurement is one fresh process, so ru_maxrss is its own peak:
  prepare  the first open of the folder: validate, then tfds download_and_prepare, into an empty TFDS_DATA_DIR;
  open     opening the prepared folder again (what every later worker does);
  epoch    opening it, then one epoch of the tuned CNN (augmentation on) over every training image,
           validation, and predictions of validation and test, as one trial does.
For scale: bymerge's 697,932 x 784 train pixels as int64 (pandas' default for a CSV) are 4.4 GB before
any copy; the pipeline streams uint8 blocks instead.
The validator section damages copies of the smallest folder and prints the one sentence each gets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE = "../shared/data/emnist-bymerge-sample"
HERE = os.path.dirname(os.path.abspath(__file__))

PREPARE = """
import json, resource, sys, time
from emnist_exp import data
started = time.perf_counter()
data.open_source(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - started,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

EPOCH = """
import json, resource, sys, time
from emnist_exp import data, trainer
from emnist_exp.spec import TrialSpec
splits = data.load_splits(sys.argv[1])
policy = sys.argv[2]
spec = TrialSpec(augment=True, rotation=8, shift=0.06, zoom=0.06, elastic=0.2, schedule="onecycle",
                 batch_size=128, learning_rate=2e-3, label_smoothing=0.1, dropout=0.3)
started = time.perf_counter()
result = trainer.train_spec(spec, splits, epochs=1, patience=1, seed=0, shuffle_buffer=10_000, verbose=0,
                            policy=policy)
print(json.dumps({"train": splits.counts["train"], "seconds": time.perf_counter() - started,
                  "val_accuracy": result.val_accuracy,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

RATE = f"""
import sys
sys.path.insert(0, {HERE!r})
from pipeline import training_rate
print(training_rate(int(sys.argv[1]), 128))
"""

VALIDATE = """
import json, sys
from emnist_exp.builders.idx import idx_builder
from emnist_exp.errors import UserError
sentences = []
for folder in sys.argv[1:]:
    try:
        idx_builder(folder)
        sentences.append("accepted")
    except UserError as exc:
        sentences.append(str(exc))
print(json.dumps(sentences))
"""


def child(code: str, *args: str, data_dir: str | None = None) -> str:
    env = {**os.environ, **({"TFDS_DATA_DIR": data_dir} if data_dir else {})}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"error: a measurement process failed:\n{out.stderr[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def repeated_folder(sample: str, dest: str, *, times: int = 1, first: int = 0) -> str:
    """An official-layout folder whose train split is the sample's (its `first` images, or all, `times` over).

    Streamed a block at a time (emnist_exp.builders.idx), so building the 700k folder holds no file whole.
    """
    from emnist_exp.builders.idx import IdxStream, find_files, read_labels

    splits, mapping = find_files(sample)
    os.makedirs(dest, exist_ok=True)
    shutil.copy(mapping, dest)
    for split, (images_path, labels_path) in splits.items():
        keep = first if split == "train" and first else IdxStream(images_path, "images").count
        repeat = times if split == "train" else 1
        labels = read_labels(labels_path)[:keep]
        write_idx(os.path.join(dest, os.path.basename(labels_path)), [labels] * repeat, b"\0\0\x08\x01", ())
        blocks = (block for _ in range(repeat) for block in clipped(IdxStream(images_path, "images").blocks(), keep))
        write_idx(os.path.join(dest, os.path.basename(images_path)), blocks, b"\0\0\x08\x03", (28, 28),
                  count=keep * repeat)
    return dest


def clipped(blocks, keep: int):
    """The first `keep` items of a stream of blocks."""
    for block in blocks:
        if keep <= 0:
            return
        yield block[:keep]
        keep -= len(block)


def write_idx(path: str, blocks, magic: bytes, shape: tuple, count: int | None = None) -> None:
    """Write one gzip IDX file from blocks of items; `count` goes in the header (default: all of them)."""
    import gzip

    blocks = list(blocks) if count is None else blocks
    count = sum(len(b) for b in blocks) if count is None else count
    header = magic + b"".join(n.to_bytes(4, "big") for n in (count, *shape))
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=6) as file:
        file.write(header)
        for block in blocks:
            file.write(block.tobytes())


def damaged_copies(folder: str, work: str) -> dict[str, str]:
    """Copies of `folder` with a truncated images file, a wrong count and an out-of-range label."""
    import numpy as np

    from emnist_exp.builders.idx import find_files, read_labels

    images, labels_path = find_files(folder)[0]["train"]
    labels = read_labels(labels_path)
    made = {}
    for what in ("truncated images file", "wrong count", "label out of range"):
        copy = shutil.copytree(folder, os.path.join(work, what.replace(" ", "_")))
        if what == "truncated images file":  # the gzip stream cut at half its bytes
            with open(images, "rb") as file:
                data = file.read(os.path.getsize(images) // 2)
            with open(os.path.join(copy, os.path.basename(images)), "wb") as file:
                file.write(data)
        else:  # a label too few, or the last label 47 where bymerge's are 0..46
            wrong = labels[:-1] if what == "wrong count" else np.append(labels[:-1], np.uint8(47))
            write_idx(os.path.join(copy, os.path.basename(labels_path)), [wrong], b"\0\0\x08\x01", ())
        made[what] = copy
    return made


def training_rate(steps: int) -> float:
    return float(child(RATE, str(steps)))


def measure(folders: list[tuple[str, str]], work: str, policy: str = "float32") -> list[dict]:
    """One row per folder; with --keep, a row measured before (row-*.json in the work folder) is reused."""
    results = []
    for label, folder in folders:
        tagged = "" if policy == "float32" else f"-{policy}"  # rows kept by --keep are per policy
        saved = os.path.join(work, f"row-{os.path.basename(folder)}{tagged}.json")
        if os.path.exists(saved):
            with open(saved) as file:
                results.append(json.load(file))
            continue
        data_dir = os.path.join(work, "tfds-" + os.path.basename(folder))
        spec = f"idx:{folder}"
        row = {"label": label, "prepare": json.loads(child(PREPARE, spec, data_dir=data_dir))}
        row["open"] = json.loads(child(PREPARE, spec, data_dir=data_dir))
        row["epoch"] = json.loads(child(EPOCH, spec, policy, data_dir=data_dir))
        print(f"measured {label}: {json.dumps(row)}", file=sys.stderr, flush=True)
        with open(saved, "w") as file:
            json.dump(row, file)
        results.append(row)
    return results


def print_tables(results: list[dict], rates: tuple[float, float], synthetic: dict | None, policy: str) -> None:
    base = results[0]
    print(f"peak RSS on idx: folders of the official layout, {os.cpu_count()} CPUs, the epoch in {policy}; "
          f"training rate (seed CNN, batch 128) {rates[0]:,.0f} images/s before, {rates[1]:,.0f} after")
    print(f"{'set':<22} {'train images':>12} {'prepare MB':>10} {'open MB':>8} {'epoch MB':>9} {'epoch vs first':>14}")
    for r in results:
        print(f"{r['label']:<22} {r['epoch']['train']:>12,} {r['prepare']['peak_rss_mb']:>10,.0f} "
              f"{r['open']['peak_rss_mb']:>8,.0f} {r['epoch']['peak_rss_mb']:>9,.0f} "
              f"{r['epoch']['peak_rss_mb'] / base['epoch']['peak_rss_mb']:>13.2f}x")
    if synthetic:
        print(f"{'synthetic:700000':<22} {synthetic['train']:>12,} {'':>10} {'':>8} "
              f"{synthetic['peak_rss_mb']:>9,.0f} {synthetic['peak_rss_mb'] / base['epoch']['peak_rss_mb']:>13.2f}x")
    print()
    print("growth from the first set (ideal: time x images for epoch and prepare; 1.0x for open)")
    print(f"{'set':<22} {'images x':>8} {'epoch s':>8} {'x':>6} {'prepare s':>9} {'x':>6} {'open s':>7} {'x':>6}")
    for r in results:
        size = r["epoch"]["train"] / base["epoch"]["train"]
        cells = [f"{size:>8.1f}"]
        for key, width in (("epoch", 8), ("prepare", 9), ("open", 7)):
            cells.append(f"{r[key]['seconds']:>{width}.1f} {r[key]['seconds'] / base[key]['seconds']:>5.1f}x")
        print(f"{r['label']:<22} " + " ".join(cells))


def print_validator(folder: str, work: str) -> None:
    print()
    print("streaming validator on damaged copies of the first set (each: one sentence, no preparation)")
    copies = damaged_copies(folder, work)
    sentences = json.loads(child(VALIDATE, *copies.values(), data_dir=os.path.join(work, "tfds-damaged")))
    for what, sentence in zip(copies, sentences):
        print(f"{what:<22} {sentence}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=SAMPLE, help=f"official-layout folder to build from (default: {SAMPLE})")
    parser.add_argument("--smoke", action="store_true", help="tiny folders: a check that the script runs")
    parser.add_argument("--synthetic", action="store_true", help="also measure synthetic:700000 (a second row)")
    parser.add_argument("--keep", help="build the folders here and keep them, with each measured row "
                        "(default: a temporary folder)")
    from emnist_exp.precision import PRECISIONS  # noqa: PLC0415

    parser.add_argument("--precision", default="float32", choices=PRECISIONS[1:],
                        help="Keras dtype policy of the epoch (default: float32)")
    parser.add_argument("--only", type=int, nargs="+", help="measure only these sets (0 = the smallest)")
    args = parser.parse_args()
    sample = os.path.abspath(args.sample)
    if args.smoke:  # (label, first images or 0 for all, times)
        sets = [("300 images", 300, 1), ("the source x3", 0, 3)]
    else:
        sets = [("10k of the sample", 10_000, 1), ("the whole sample", 0, 1), ("the sample's train x8", 0, 8)]
    if args.only:  # e.g. the largest set in one process while another measures the rest
        sets = [sets[i] for i in args.only]
    work = args.keep or tempfile.mkdtemp(prefix="emnist-memory-")
    try:
        steps = 3 if args.smoke else 60
        rate_before = training_rate(steps)
        folders = []
        for label, first, times in sets:
            started = time.perf_counter()
            dest = os.path.join(work, f"emnist-{first or 'all'}x{times}")
            if not os.path.isdir(dest):
                repeated_folder(sample, dest, times=times, first=first)
            folders.append((label, dest))
            print(f"built {dest} in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        results = measure(folders, work, args.precision)
        synthetic = None
        if args.synthetic:
            data_dir = os.path.join(work, "tfds-synthetic")
            child("from emnist_exp import data; data.open_source('synthetic:700000')", data_dir=data_dir)
            synthetic = json.loads(child(EPOCH, "synthetic:700000", args.precision, data_dir=data_dir))
        rates = (rate_before, rate_before if args.smoke else training_rate(steps))  # smoke: one process less
        print_tables(results, rates, synthetic, args.precision)
        if not args.only:
            print_validator(folders[0][1], work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
