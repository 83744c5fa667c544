"""Dataset specs to tf.data pipelines: uint8 records from the tfds cache, made upright, streamed."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import re
import socket
import tempfile
from dataclasses import dataclass

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from emnist_exp.classes import EMNIST_CLASSES
from emnist_exp.errors import UserError

AUTOTUNE = tf.data.AUTOTUNE
SYNTHETIC_SIZE = 12_000  # `synthetic` alone: train examples; test is a sixth of that
TRANSPOSED_BUILDERS = {"emnist", "emnist_idx"}  # stored as in EMNIST's files: transpose to get upright
BLOCK = 1024  # examples parsed and turned upright per op (see read_split)
RAW_BUILDERS = {"emnist_idx", "emnist_synthetic"}  # ours: ordered, raw-byte images (see _record_blocks)
EMNIST_HOST = "biometrics.nist.gov"  # where tfds downloads EMNIST's gzip.zip from


@dataclass(frozen=True)
class Source:
    """A prepared tfds builder and what is needed to read it the right way up."""

    spec: str
    builder: tfds.core.DatasetBuilder
    classes: tuple[str, ...]
    transposed: bool

    def num_examples(self, split: str) -> int:
        splits = self.builder.info.splits
        if split not in splits:
            have = ", ".join(sorted(splits.keys())) or "none"
            raise UserError(f"dataset {self.spec} has no {split!r} split (it has: {have}).")
        return splits[split].num_examples

    def check_split(self, split: str) -> None:
        """A split expression checked whole: its syntax, and every split it names (test[:10]+train[:5])."""
        check_split_spec(split)
        for name in SPLIT_NAME.findall(split):
            self.num_examples(name.strip())


SPLIT_NAME = re.compile(r"(?:^|\+)\s*([^\[+]+)")  # the names of `name[slice]+name[slice]`, as tfds parses them


@dataclass(frozen=True)
class Splits:
    """Train, validation (carved from train) and test, unbatched (image uint8 28x28x1 upright, label)."""

    source: Source
    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset | None
    counts: dict[str, int]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.source.classes

    @functools.cached_property
    def val_labels(self) -> np.ndarray:
        """Validation labels in order, read once for all trials."""
        return labels_of(self.val)

    @functools.cached_property
    def test_labels(self) -> np.ndarray | None:
        return None if self.test is None else labels_of(self.test)


def _tfds_builder(spec: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    """emnist/<config> through tfds; offline, a clear sentence on how to get the data instead."""
    try:
        builder = tfds.builder(spec, data_dir=data_dir)
    except Exception as exc:  # tfds raises several types for unknown names and configs
        raise UserError(unknown_tfds(spec, exc)) from None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    advice = ("prepare it on a machine with internet access and set TFDS_DATA_DIR to that folder, "
              "or pass idx:<folder> with the official EMNIST gzip files.")
    # tfds retries a dead download for minutes; one quick connection attempt tells us first.
    if not builder.is_prepared() and not _reachable(EMNIST_HOST):
        raise UserError(f"{spec} is not prepared in {where} and {EMNIST_HOST} is unreachable; {advice}")
    try:
        builder.download_and_prepare()
    except Exception as exc:  # noqa: BLE001 (network, checksum and disk errors alike)
        raise UserError(f"{spec} is not prepared in {where} and could not be downloaded "
                        f"({type(exc).__name__}); {advice}") from None
    return builder


def unknown_tfds(spec: str, exc: Exception) -> str:
    """One sentence for a tfds name tfds refused: the configs the dataset has, or tfds' own first line.

    For an unknown config tfds 4.9 lists "BuilderConfigs whose name closely match" on later lines,
    and the first line ends on that colon.
    """
    name, _, config = spec.partition("/")
    try:
        configs = sorted(tfds.builder_cls(name).builder_configs)
    except Exception:  # noqa: BLE001 (no such dataset, or one without configs)
        configs = []
    if configs and config.partition(":")[0] not in configs:
        return f"unknown tfds dataset {spec!r}: {name} has the configs {', '.join(configs)}, e.g. {name}/{configs[0]}."
    first = str(exc).strip().splitlines()[0].rstrip(" :.") if str(exc).strip() else type(exc).__name__
    return f"unknown tfds dataset {spec!r}: {first}."


def _reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def preparation_lock(data_dir: str | None):
    """One preparer per tfds folder on this machine: local workers starting together would each prepare.

    The lock file lives in the temporary folder (the tfds folder may not exist yet, and bad input
    must leave none) and is removed by its holder. A waiter that then wins the lock on the removed
    file opens the path afresh: the lock that counts is always the one on the file at the path.
    """
    import fcntl  # noqa: PLC0415

    folder = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    key = hashlib.sha1(os.path.realpath(os.path.expanduser(folder)).encode()).hexdigest()[:16]
    path = os.path.join(tempfile.gettempdir(), f"emnist_exp-prepare-{key}.lock")
    while True:
        handle = open(path, "a")
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()  # the holder removed this file while we waited on it
    try:
        yield
    finally:
        os.unlink(path)  # before the lock is freed, so that no one can take a lock on a file about to go
        handle.close()


def open_source(spec: str, data_dir: str | None = None) -> Source:
    """Resolve a dataset SPEC (`emnist/bymerge`, `idx:<folder>`, `synthetic[:N]`) to a prepared builder."""
    data_dir = data_dir or None
    with preparation_lock(data_dir):
        builder = _prepared_builder(spec, data_dir)
    classes = label_names(builder)
    return Source(spec, builder, classes, builder.name in TRANSPOSED_BUILDERS)


def _prepared_builder(spec: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
    if spec.startswith("idx:"):
        from emnist_exp.builders.idx import idx_builder  # noqa: PLC0415

        builder = idx_builder(spec[len("idx:") :], data_dir=data_dir)
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        from emnist_exp.builders.synthetic import synthetic_builder  # noqa: PLC0415

        size = spec.partition(":")[2] or str(SYNTHETIC_SIZE)
        if not size.isdigit() or int(size) < 47:
            raise UserError(f"synthetic size must be a whole number of at least 47, got {size!r}.")
        builder = synthetic_builder(size=int(size), data_dir=data_dir)
    elif spec.split("/")[0] == "emnist":
        builder = _tfds_builder(spec, data_dir)
    else:
        raise UserError(f"unknown dataset {spec!r}: use emnist/bymerge, idx:<folder> or synthetic[:N].")
    return builder


def label_names(builder: tfds.core.DatasetBuilder) -> tuple[str, ...]:
    """Characters per label. tfds `emnist` names its labels '0'..'46'; its configs map them like the files."""
    names = tuple(builder.info.features["label"].names)
    if builder.name == "emnist":
        return EMNIST_CLASSES.get(builder.builder_config.name, names)
    return names


def check_split_spec(split: str) -> None:
    """A clear error for a split tfds cannot parse, such as test[abc]."""
    try:
        tfds.core.ReadInstruction.from_spec(split)
    except ValueError:
        raise UserError(f"split {split!r} is not a tfds split: use a name such as test, or a slice such as "
                        "test[:1000] or test[50%:].") from None


def read_split(source: Source, split: str, *, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """Stream one tfds split (slicing allowed) as upright (uint8 image, int64 label) pairs.

    Work happens on blocks of BLOCK examples, then unbatch (order and examples kept): a per-example
    map costs tens of microseconds of CPU per call, which capped the whole pipeline at ~25k images/s.
    """
    builder = source.builder
    if builder.name in RAW_BUILDERS:
        blocks = _record_blocks(builder, split)
    elif builder.name == "emnist":
        blocks = _decoded_blocks(builder, split)
    else:
        # Ordered builders (disable_shuffling) must be read in order; the shuffle buffer still mixes them.
        shuffle = shuffle_seed is not None and not builder.info.disable_shuffling
        read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed) if shuffle else None
        examples = builder.as_dataset(split=split, shuffle_files=shuffle, read_config=read_config, as_supervised=True)
        blocks = examples.batch(BLOCK)
    if source.transposed:
        blocks = blocks.map(_upright, num_parallel_calls=AUTOTUNE)
    return blocks.unbatch()


def _record_blocks(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """A split of one of our builders as blocks, parsed by tfds' own features from its prepared records.

    `as_dataset` parses one record per map call: ~60 us of CPU an image, 27k images/s on two cores.
    Our builders are ordered (disable_shuffling) and hold raw bytes, so the records of the split
    (tfds' file instructions, slices included) are parsed a block at a time instead: ~90k images/s.
    """
    features = builder.info.features
    spec = {key: tf.io.FixedLenFeature(info.shape, info.tf_dtype)
            for key, info in features.get_serialized_info().items()}
    image_key, label_key = builder.info.supervised_keys
    shards = [tf.data.TFRecordDataset(part.filename).skip(part.skip).take(part.take)
              for part in builder.info.splits[split].file_instructions]
    empty = tf.data.TFRecordDataset(tf.constant([], tf.string))  # an empty slice has no file instructions
    records = functools.reduce(tf.data.Dataset.concatenate, shards, empty)

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = features.decode_batch_example(tf.io.parse_example(serialized, spec))
        return example[image_key], example[label_key]

    return records.batch(BLOCK).map(parse, num_parallel_calls=AUTOTUNE)


def _decoded_blocks(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """A split of tfds `emnist` as blocks of decoded uint8 images, read from a raw-byte copy made once.

    tfds stores `emnist` as one PNG per record, which `as_dataset` decodes one record per map call
    (~25-33k images/s on two cores). Each whole split is decoded once into blocks of BLOCK images
    (tf.data.Dataset.save, next to tfds' records), and every read after that is a copy per block.
    Slices keep tfds' meaning and order; tfds shuffled the records when it prepared them.
    """
    parts, splits = [], builder.info.splits
    for part in tfds.core.ReadInstruction.from_spec(split).to_absolute(splits):  # None: an open end
        start, stop = part.from_ or 0, splits[part.splitname].num_examples if part.to is None else part.to
        first = start // BLOCK
        saved = _raw_copy(builder, part.splitname).skip(first).take(-(-stop // BLOCK) - first)

        def trim(index, block, start=start, stop=stop):  # the slice's share of block `index`
            offset = index * BLOCK
            low, high = tf.maximum(start - offset, 0), tf.minimum(stop - offset, BLOCK)
            return block[0][low:high], block[1][low:high]

        parts.append(saved.enumerate(first).map(trim))
    empty = tf.data.Dataset.from_tensors((tf.zeros([0, 28, 28, 1], tf.uint8), tf.zeros([0], tf.int64))).take(0)
    return functools.reduce(tf.data.Dataset.concatenate, parts, empty)


def _raw_copy(builder: tfds.core.DatasetBuilder, split: str) -> tf.data.Dataset:
    """The whole split as saved blocks (image, label), written on first use under the prepared folder.

    A prepared folder that is read-only (shared, prepared elsewhere) gets no copy: its blocks are
    then decoded on every read, at tfds' own rate.
    """
    root = os.path.join(os.fspath(builder.data_dir), f"raw-blocks-{BLOCK}")
    path = os.path.join(root, split)
    if os.path.isdir(path):
        return tf.data.Dataset.load(path)
    examples = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True)
    blocks = examples.batch(BLOCK, num_parallel_calls=AUTOTUNE, deterministic=True)
    partial = f"{path}.partial-{os.getpid()}-{socket.gethostname()}"  # workers that race each write their own
    try:
        os.makedirs(root, exist_ok=True)
        blocks.save(partial, shard_func=lambda *_: tf.constant(0, tf.int64))  # one shard keeps the order
    except (OSError, tf.errors.OpError) as exc:
        if tf.io.gfile.exists(partial):
            tf.io.gfile.rmtree(partial)
        logging.getLogger(__name__).warning("cannot keep decoded blocks in %s (%s): decoding on every read",
                                            root, str(exc).splitlines()[0])
        return blocks
    try:
        os.rename(partial, path)
    except OSError:  # another worker's copy is already in place: the same records, keep it
        tf.io.gfile.rmtree(partial)
    return tf.data.Dataset.load(path)


def _upright(images: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """A block of EMNIST-file images (N, 28, 28, 1), stored transposed, made upright."""
    return tf.transpose(images, [0, 2, 1, 3]), labels


def carve(total: int, val_fraction: float, cap: int = 0) -> tuple[int, int]:
    """(train, val) counts: the cap first, then validation from the end of what is left."""
    n = min(total, cap) if cap else total
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise UserError(f"{n} training examples are too few to carve a validation split from.")
    return n - n_val, n_val


def load_splits(spec: str, *, val_fraction: float = 0.1, max_examples: int = 0, data_dir: str = "",
                seed: int = 0) -> Splits:
    """Train/val/test for a study. Validation comes from train, deterministically; test is untouched."""
    source = open_source(spec, data_dir)
    n_train, n_val = carve(source.num_examples("train"), val_fraction, max_examples)
    has_test = "test" in source.builder.info.splits
    n_test = source.num_examples("test") if has_test else 0
    if max_examples and has_test:
        n_test = min(n_test, max_examples)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    slices = split_slices(counts)

    def read(split: str, **options) -> tf.data.Dataset:
        # Records read from files have no known length; told it, Keras ends each epoch on its last
        # step instead of running into the end of the data and warning about it.
        ds = read_split(source, slices[split], **options)
        return ds.apply(tf.data.experimental.assert_cardinality(counts[split]))

    return Splits(source=source, train=read("train", shuffle_seed=seed), val=read("val"),
                  test=read("test") if has_test else None, counts=counts)


def split_slices(counts: dict[str, int]) -> dict[str, str]:
    """The tfds slices behind the counts of load_splits: validation is the end of the capped train."""
    n_train, n_val = counts["train"], counts["val"]
    return {"train": f"train[:{n_train}]", "val": f"train[{n_train}:{n_train + n_val}]",
            "test": f"test[:{counts['test']}]"}


@dataclass(frozen=True)
class SplitRecord:
    """What one split of a study is, for the record: enough to tell two runs' data apart."""

    context: str  # training | validation | test
    slice: str  # the tfds slice, e.g. train[:76361]
    count: int
    digest: str
    location: str  # the folder the examples are read from


SPLIT_CONTEXTS = {"train": "training", "val": "validation", "test": "test"}


def split_records(splits: Splits) -> list[SplitRecord]:
    """Train, validation and test (when there is one) as SplitRecords.

    The digest hashes the prepared builder's name, config and version with the slice: an idx
    config is named by a hash of its files' bytes, a synthetic one by its size, and a tfds release
    by its version, so equal digests mean the same examples in the same order.
    """
    builder = splits.source.builder
    config = builder.builder_config.name if builder.builder_config else ""
    identity = f"{builder.name}/{config}:{builder.version}"
    spec = splits.source.spec
    location = os.path.abspath(spec[len("idx:") :]) if spec.startswith("idx:") else str(builder.data_dir)
    records = []
    for split, piece in split_slices(splits.counts).items():
        if split == "test" and splits.test is None:
            continue
        digest = hashlib.sha1(f"{identity}|{piece}".encode()).hexdigest()[:16]
        records.append(SplitRecord(SPLIT_CONTEXTS[split], piece, splits.counts[split], digest, location))
    return records


def labels_of(ds: tf.data.Dataset) -> np.ndarray:
    """All labels of an unbatched split, in order (a uint8 vector, small even for 700k)."""
    batches = [y for _, y in ds.map(lambda x, y: (0, y)).batch(8192).as_numpy_iterator()]
    return np.concatenate(batches).astype(np.uint8) if batches else np.zeros(0, np.uint8)


def images_at(ds: tf.data.Dataset, indices) -> np.ndarray:
    """The images at the given positions of an unbatched split (reads up to the largest index)."""
    wanted = sorted(int(i) for i in indices)
    if not wanted:
        return np.zeros((0, 28, 28, 1), np.uint8)
    keep, found = set(wanted), {}
    for i, (image, _) in enumerate(ds.take(wanted[-1] + 1).as_numpy_iterator()):
        if i in keep:
            found[i] = image
    return np.stack([found[i] for i in indices])
