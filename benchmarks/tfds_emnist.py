"""tfds `emnist/bymerge` offline: a prepared copy built by tfds' own EMNIST builder, then its pipeline rate.

    python benchmarks/tfds_emnist.py --data-dir DIR                 # build the copy once, then measure
    python benchmarks/tfds_emnist.py --smoke                         # tfds.testing.mock_data stand-in

Building: tfds downloads EMNIST's gzip.zip (562 MB) and checks it against the sha256 it registers.
With no internet, the archive is made here in the official layout (gzip/emnist-bymerge-*.gz) from the
sample, repeated to the exact counts the tfds config hard-codes (697,932 train, 116,323 test), and
placed in tfds' download cache under the name and INFO record of the registered checksum. tfds
trusts its cache, so `download_and_prepare` then runs the real builder: extract, PNG-encode, write.
The images are the sample's, so only rates are meaningful here, not accuracy.

Measured, one after the other on all cores, with the training rate of the same period:
  tfds as_dataset      one record per map call: PNG decoded, then made upright per image
  read_split           emnist_exp.data.read_split: raw-byte blocks cached once, made upright per block
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SAMPLE = "../shared/data/emnist-bymerge-sample"
HERE = os.path.dirname(os.path.abspath(__file__))
COUNTS = {"train": 697_932, "test": 116_323}  # tfds EMNISTConfig("bymerge") reads exactly these
MOCK_EXAMPLES = 4000  # per split, in the smoke version: a few blocks


def build_archive(sample: str, path: str) -> None:
    """gzip.zip as EMNIST ships it (bymerge files only), the sample's splits repeated to tfds' counts."""
    sys.path.insert(0, HERE)
    from memory import clipped, write_idx

    from emnist_exp.builders.idx import IdxStream, find_files, read_labels

    splits, mapping = find_files(sample)
    work = path + ".parts"
    os.makedirs(work, exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:  # the .gz members are compressed already
        for split, (images_path, labels_path) in splits.items():
            held = IdxStream(images_path, "images").count
            repeat = -(-COUNTS[split] // held)
            for source, magic, shape in ((labels_path, b"\0\0\x08\x01", ()), (images_path, b"\0\0\x08\x03", (28, 28))):
                if source == labels_path:
                    blocks = clipped([read_labels(labels_path)] * repeat, COUNTS[split])
                else:
                    blocks = clipped((b for _ in range(repeat) for b in IdxStream(images_path, "images").blocks()),
                                     COUNTS[split])
                part = os.path.join(work, os.path.basename(source))
                write_idx(part, blocks, magic, shape, count=COUNTS[split])
                archive.write(part, f"gzip/{os.path.basename(source)}")
                os.remove(part)
        archive.write(mapping, f"gzip/{os.path.basename(mapping)}")
    os.rmdir(work)


def prepare_offline(sample: str, data_dir: str) -> float:
    """Prepare tfds `emnist/bymerge` in data_dir from a local archive; returns the seconds tfds took."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import checksums, resource

    builder = tfds.builder("emnist/bymerge", data_dir=data_dir)
    if builder.is_prepared():
        return 0.0
    url = builder.URL
    registered = checksums.get_all_url_infos()[url]  # size, sha256 and name tfds expects for gzip.zip
    downloads = os.path.join(data_dir, "downloads")
    os.makedirs(downloads, exist_ok=True)
    cached = os.path.join(downloads, resource.get_dl_fname(url, registered.checksum))
    if not os.path.exists(cached):
        build_archive(sample, cached + ".tmp")
        os.replace(cached + ".tmp", cached)
        from etils import epath

        resource.write_info_file(url, epath.Path(cached), "emnist", registered.filename, registered)
    started = time.perf_counter()
    builder.download_and_prepare()
    return time.perf_counter() - started


def mock_prepared(data_dir: str, examples: int) -> None:
    """The metadata files of a prepared emnist/bymerge of `examples` per split: what mock_data reads (USE_FILES)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder("emnist/bymerge", data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[examples], num_bytes=0) for split in COUNTS
    ]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)


def tfds_rate(builder, batches: int, batch_size: int) -> float:
    """tfds' own read path as data.py used it: as_dataset, then upright per block, through the training pipeline."""
    from emnist_exp import data

    import tensorflow_datasets as tfds

    examples = builder.as_dataset(split="train", shuffle_files=True, as_supervised=True,
                                  read_config=tfds.ReadConfig(shuffle_seed=0))
    ds = examples.batch(data.BLOCK).map(data._upright, num_parallel_calls=data.AUTOTUNE).unbatch()
    return rate(ds, batches, batch_size)


def read_split_rate(source, batches: int, batch_size: int) -> float:
    from emnist_exp import data

    return rate(data.read_split(source, "train", shuffle_seed=0), batches, batch_size)


def rate(ds, batches: int, batch_size: int) -> float:
    """images/s through the training pipeline (shuffle, batch, float, one-hot), augmentation off."""
    from emnist_exp import pipelines

    it = iter(pipelines.training_pipeline(ds.repeat(), num_classes=47, batch_size=batch_size, seed=0,
                                          shuffle_buffer=10_000))
    for _ in range(20):  # warm-up: tracing, shuffle buffer fill, autotuning
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - start)


def measure(data_dir: str | None, batches: int, steps: int, batch_size: int = 128) -> dict:
    sys.path.insert(0, HERE)
    from pipeline import training_rate

    from emnist_exp import data

    source = data.open_source("emnist/bymerge", data_dir)
    started = time.perf_counter()
    data.read_split(source, "train[:10]")  # the raw-byte copy of train, made on first read
    cache_seconds = time.perf_counter() - started
    results = {"train": source.num_examples("train"), "cache_seconds": cache_seconds,
               "training_before": training_rate(steps, batch_size)}
    results["tfds as_dataset"] = tfds_rate(source.builder, batches, batch_size)
    results["read_split"] = read_split_rate(source, batches, batch_size)
    results["training_after"] = training_rate(steps, batch_size)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", default=SAMPLE, help=f"official-layout folder to build from (default: {SAMPLE})")
    parser.add_argument("--data-dir", default="", help="tfds data dir for the prepared copy (default: TFDS_DATA_DIR)")
    parser.add_argument("--smoke", action="store_true", help="tfds.testing.mock_data instead of a prepared copy")
    args = parser.parse_args()
    data_dir = args.data_dir or os.environ.get("TFDS_DATA_DIR")
    batches, steps = (5, 3) if args.smoke else (300, 60)
    if args.smoke:
        import tensorflow_datasets as tfds

        data_dir = args.data_dir or tempfile.mkdtemp(prefix="emnist-tfds-mock-")
        mock_prepared(data_dir, MOCK_EXAMPLES)
        with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_FILES,
                                    data_dir=data_dir):
            r = measure(data_dir, batches, steps)
        where, prepared = "tfds.testing.mock_data (random images, a stand-in)", "mock"
    else:
        seconds = prepare_offline(os.path.abspath(args.sample), data_dir)
        r = measure(data_dir, batches, steps)
        where = f"a copy prepared offline by tfds' EMNIST builder in {data_dir}"
        prepared = f"{seconds:.0f}s" if seconds else "already"
    training = (r["training_before"] + r["training_after"]) / 2
    print(f"tfds emnist/bymerge, {where}; {r['train']:,} train images, {os.cpu_count()} CPUs")
    print(f"prepared by tfds: {prepared}; raw-byte copy of train made by read_split in {r['cache_seconds']:.0f}s")
    print(f"{'measure':<42}  {'images/s':>10}  vs training")
    print(f"{'training (seed CNN, batch 128), before':<42}  {r['training_before']:>10,.0f}  "
          f"{r['training_before'] / training:.1f}x")
    print(f"{'training (seed CNN, batch 128), after':<42}  {r['training_after']:>10,.0f}  "
          f"{r['training_after'] / training:.1f}x")
    for name in ("tfds as_dataset", "read_split"):
        print(f"{'pipeline, ' + name:<42}  {r[name]:>10,.0f}  {r[name] / training:.1f}x")
    print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
