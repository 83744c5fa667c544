"""tfds builder for a local folder of official EMNIST gzip IDX files, read in place, no download."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import itertools
import struct
import zlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle

from emnist_exp.errors import UserError

# IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic number, then one
# int32 per dimension, then the uint8 data.
IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
SIDE = 28
IMAGE_NOTE = "Images are raw uint8 bytes instead of PNG: about twice as fast to stream, no decoding."
SPILL_NOTE = "Examples spill to disk while preparing (same records, in order): flat RAM at 700k."
MAX_LABEL = 10_000
BLOCK_ITEMS = 4096  # images per block streamed from a file: 3 MB
READ_SIZE = 1 << 20  # compressed bytes read at a time
INFLATE_SIZE = 8 << 20  # at most this many decompressed bytes per zlib call
KEY_SPAN = 1 << 16  # bytes of each end of an images file that the folder key reads
GZIP_MAGIC = b"\x1f\x8b"
SPILL_AT = 64 << 20  # bytes of serialized examples tfds' writer holds in RAM before it spills to disk
SPILL_BUCKETS = 64  # of tfds' 1000 shuffle buckets: ~9 MB each at 700k, 64 files open at once

# File names of the `gzip/` folder of EMNIST's gzip.zip
IDX_FILE = re.compile(
    r"emnist-(?P<name>\w+)-(?P<split>train|test)-(?P<kind>images-idx3|labels-idx1)-ubyte\.gz"
)
KINDS = {"images": ("idx3", IMAGES_MAGIC), "labels": ("idx1", LABELS_MAGIC)}  # IDX type, magic
SPLITS = ("train", "test")

HOMEPAGE = "https://www.nist.gov/itl/products-and-services/emnist-dataset"
CITATION = """@article{cohen_afshar_tapson_schaik_2017,
    title={EMNIST: Extending MNIST to handwritten letters},
    author={Cohen, Gregory and Afshar, Saeed and Tapson, Jonathan and van Schaik, Andre},
    journal={2017 International Joint Conference on Neural Networks (IJCNN)},
    year={2017},
    doi={10.1109/ijcnn.2017.7966217},
}"""


def image_feature() -> tfds.features.Tensor:
    """28x28x1 uint8 as raw bytes: reading one is a copy, where a PNG needs inflating (tf.data's bottleneck)."""
    return tfds.features.Tensor(shape=(SIDE, SIDE, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES)


@dataclasses.dataclass(eq=False, kw_only=True)
class EmnistIdxConfig(tfds.core.BuilderConfig):
    """One folder of EMNIST IDX files: `name` hashes their content, `folder` says where they are."""

    folder: str = ""
    emnist_name: str = ""  # the <name> in emnist-<name>-train-images-idx3-ubyte.gz, e.g. bymerge
    # Label index -> character(s), from emnist-<name>-mapping.txt. A label the mapping skips (0 in
    # emnist-letters) is named unused_<label>, so that label numbers stay those of the files.
    classes: tuple[str, ...] = ()


class EmnistIdx(tfds.core.GeneratorBasedBuilder):
    """EMNIST read from a local folder of official gzip IDX files, one split per file pair."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": IMAGE_NOTE, "1.2.0": SPILL_NOTE}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                f"EMNIST {self.builder_config.emnist_name}, read from the official gzip IDX files "
                f"in {self.builder_config.folder}. Images are stored TRANSPOSED, exactly as in "
                "those files (and as in tfds `emnist`): transpose rows and columns to see them "
                "upright. Labels are named by the characters of the mapping file."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": image_feature(),
                    "label": tfds.features.ClassLabel(names=list(self.builder_config.classes)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # keep the files' order, which the EMNIST authors shuffled
            homepage=HOMEPAGE,
            citation=CITATION,
            metadata=tfds.core.MetadataDict(orientation="transposed"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # the files are read where they are
        splits, _ = find_files(self.builder_config.folder)
        return {split: self._generate_examples(*pair) for split, pair in splits.items()}

    def _generate_examples(self, images_path: str, labels_path: str) -> Iterator[tuple[int, dict]]:
        labels = read_labels(labels_path)
        images = IdxStream(images_path, "images")
        # Keys in file order, spread over the first SPILL_BUCKETS of tfds' shuffle buckets (by key
        # range, see tfds.core.shuffle.get_bucket_number), so that spilled examples read back a
        # bucket at a time, still in order.
        stride = (2**shuffle.HKEY_SIZE * SPILL_BUCKETS // shuffle.BUCKETS_NUMBER) // max(images.count, 1)
        index = 0
        for block in images.blocks():  # a block at a time: RAM stays flat
            for image in block:
                yield index * stride, {"image": image[..., None], "label": int(labels[index])}
                index += 1


def idx_builder(folder: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Return an EmnistIdx builder for `folder`, prepared: validated and generated unless its key is prepared."""
    folder = os.path.abspath(os.fspath(folder))
    splits, mapping_path = find_files(folder)
    mapping = read_mapping(mapping_path)
    name = IDX_FILE.fullmatch(os.path.basename(next(iter(splits.values()))[0]))["name"]
    config = EmnistIdxConfig(
        name=f"{name}_{folder_key(splits, mapping_path)[:16]}",
        description=f"EMNIST {name} from {folder}.",
        folder=folder,
        emnist_name=name,
        classes=tuple(mapping.get(label, f"unused_{label}") for label in range(max(mapping) + 1)),
    )
    data_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
    if not _prepared(config, data_dir):
        for images_path, labels_path in splits.values():
            check_pair(images_path, labels_path, mapping_path, mapping)
    builder = EmnistIdx(config=config, data_dir=data_dir)
    with spill_early():
        builder.download_and_prepare()
    return builder


@contextlib.contextmanager
def spill_early():
    """Make tfds' writer spill a split's examples to disk after SPILL_AT bytes, not 1 GB.

    The writer holds serialized examples in RAM up to shuffle.MAX_MEM_BUFFER_SIZE (1 GB in tfds
    4.9) before it writes them to its buckets; at 700k that is 560 MB of records plus Python's
    overhead on each, which took preparing past 1.4 GB while opening needs 0.8 GB.
    """
    limit = shuffle.MAX_MEM_BUFFER_SIZE
    shuffle.MAX_MEM_BUFFER_SIZE = min(limit, SPILL_AT)
    try:
        yield
    finally:
        shuffle.MAX_MEM_BUFFER_SIZE = limit


def _prepared(config: EmnistIdxConfig, data_dir: str | None) -> bool:
    """Whether tfds holds this config prepared, asked without creating data_dir (bad input must leave none)."""
    root = os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR)
    if not os.path.isdir(root):
        return False
    return EmnistIdx(config=config, data_dir=root).is_prepared()


def folder_key(splits: dict[str, tuple[str, str]], mapping_path: str) -> str:
    """sha1 over the folder's EMNIST files: the mapping and labels whole; of each images file, its
    size and its first and last KEY_SPAN bytes.

    A gzip stream ends with the CRC-32 and length of everything it decompresses to (RFC 1952), and
    the validator accepts one stream per file, so the tail already depends on every pixel: changed
    images change the key, while a prepared 700k folder opens reading 128 KiB of its 550 MB.
    """
    digest = hashlib.sha1()
    for images_path, labels_path in sorted(splits.values()):
        for path in (labels_path, images_path):
            digest.update(os.path.basename(path).encode() + b"\0")
            with open(path, "rb") as file:
                size = os.fstat(file.fileno()).st_size
                digest.update(size.to_bytes(8, "big"))
                if path == images_path and size > 2 * KEY_SPAN:
                    digest.update(file.read(KEY_SPAN))
                    file.seek(-KEY_SPAN, os.SEEK_END)
                for block in iter(lambda: file.read(1 << 20), b""):
                    digest.update(block)
    with open(mapping_path, "rb") as file:
        digest.update(b"mapping\0" + file.read())
    return digest.hexdigest()


def find_files(folder: str) -> tuple[dict[str, tuple[str, str]], str]:
    """{split: (images path, labels path)} for each pair of files, and the mapping file's path."""
    if not os.path.exists(folder):
        raise UserError(f"EMNIST folder {folder} does not exist.")
    if not os.path.isdir(folder):
        raise UserError(f"EMNIST folder {folder} is a file, not a folder.")
    found = {}  # (name, split, kind) -> file name
    for match in filter(None, map(IDX_FILE.fullmatch, sorted(os.listdir(folder)))):
        path = os.path.join(folder, match.string)
        if not os.path.isfile(path):  # its bytes are read (folder_key, inflate) as a gzip file's
            kind = "a folder" if os.path.isdir(path) else "not a regular file"
            raise UserError(f"{path} is {kind}, not an EMNIST IDX file.")
        found[match["name"], match["split"], match["kind"].split("-")[0]] = match.string
    names = sorted({name for name, _, _ in found})
    if not names:
        example = idx_name("bymerge", "train", "images")
        raise UserError(f"{folder} holds no EMNIST IDX files (named like {example}).")
    if len(names) > 1:
        listed = ", ".join(names)
        raise UserError(
            f"{folder} holds files of several EMNIST datasets ({listed}); keep one per folder."
        )
    name = names[0]
    splits = {}
    for split in SPLITS:
        images, labels = (found.get((name, split, kind)) for kind in KINDS)
        if images and labels:
            splits[split] = (os.path.join(folder, images), os.path.join(folder, labels))
        elif images or labels:
            missing = idx_name(name, split, "labels" if images else "images")
            raise UserError(f"{folder} has {images or labels} but not {missing}.")
    mapping = f"emnist-{name}-mapping.txt"
    if not os.path.isfile(os.path.join(folder, mapping)):
        raise UserError(f"{folder} has no {mapping}, which names the classes.")
    return splits, os.path.join(folder, mapping)


def idx_name(name: str, split: str, kind: str) -> str:
    """The official file name of one IDX file, e.g. emnist-bymerge-train-labels-idx1-ubyte.gz."""
    return f"emnist-{name}-{split}-{kind}-{KINDS[kind][0]}-ubyte.gz"


def read_mapping(path: str) -> dict[int, str]:
    """{label: character(s)} from the `label code [code...]` lines of an EMNIST mapping file."""
    file = os.path.basename(path)
    names: dict[int, str] = {}
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            fields = line.split()
            well_formed = len(fields) >= 2 and all(field.isdigit() for field in fields)
            # A huge label would blow up the class list: EMNIST has at most 62 classes.
            if not well_formed or int(fields[0]) > MAX_LABEL:
                raise UserError(f"{file} line {number} is not 'label ascii-code': {line.strip()!r}.")
            label, codes = int(fields[0]), [int(field) for field in fields[1:]]
            if not all(0 < code < 0x110000 for code in codes):
                raise UserError(f"{file} line {number} has a character code out of range.")
            if label in names:
                raise UserError(f"{file} lists label {label} twice.")
            names[label] = "".join(map(chr, codes))  # emnist-letters lists two codes: 'Aa'
    if not names:
        raise UserError(f"{file} lists no classes.")
    if len(set(names.values())) < len(names):
        raise UserError(f"{file} names some character twice.")
    return names


def check_pair(images_path: str, labels_path: str, mapping_path: str, mapping: dict) -> None:
    """Raise UserError unless both files are whole, agree in count and every label is in the mapping.

    The images are streamed (header, length, gzip CRC), never held: a 700k file inflates to 550 MB.
    """
    labels = read_labels(labels_path)
    images = IdxStream(images_path, "images")
    held = sum(len(block) for block in images.blocks())
    images_file, labels_file = os.path.basename(images_path), os.path.basename(labels_path)
    if held != len(labels):
        counts = f"{held} images but {labels_file} holds {len(labels)} labels"
        raise UserError(f"{images_file} holds {counts}.")
    require_examples(images_file, held)
    unknown = [int(label) for label in np.unique(labels) if int(label) not in mapping]
    if unknown:
        mapping_file = os.path.basename(mapping_path)
        raise UserError(
            f"{labels_file} holds label {unknown[0]}, which {mapping_file} does not list."
        )


def require_examples(images_file: str, count: int) -> None:
    """tfds cannot finalize a split that yields nothing: say so before preparing."""
    if count == 0:
        raise UserError(f"{images_file} holds 0 images: every split needs at least one example.")


def read_labels(path: str) -> np.ndarray:
    """All labels of one gzip IDX1 file, checked like any IDX file (a uint8 each: 700 KB for 700k)."""
    blocks = list(IdxStream(path, "labels").blocks(1 << 20))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.uint8)


class IdxStream:
    """One gzip IDX file read front to back: the header checked on opening, then items in blocks."""

    def __init__(self, path: str, kind: str):
        self.file, self.kind = os.path.basename(path), kind
        self._chunks = inflate(path)
        self._buffer = bytearray()
        magic, n_dims = KINDS[kind][1], 3 if kind == "images" else 1
        head = self._take(4 * (1 + n_dims))
        if len(head) >= 4 and struct.unpack(">I", head[:4])[0] != magic:
            found = struct.unpack(">I", head[:4])[0]
            raise UserError(f"{self.file} is not an IDX {kind} file: its magic number is {found}, not {magic}.")
        if len(head) < 4 * (1 + n_dims):
            raise UserError(f"{self.file} is truncated: it is too short to hold an IDX header.")
        dims = list(struct.unpack(f">{n_dims}I", head[4:]))
        if dims[1:] and dims[1:] != [SIDE, SIDE]:
            raise UserError(f"{self.file} holds {dims[1]}x{dims[2]} images, but EMNIST's are {SIDE}x{SIDE}.")
        self.count, self.shape = dims[0], tuple(dims[1:])
        self.item_size = SIDE * SIDE if kind == "images" else 1

    def blocks(self, items: int = BLOCK_ITEMS) -> Iterator[np.ndarray]:
        """(k, 28, 28) images as stored, or (k,) labels, k <= items; the length is checked at the end."""
        held, longer = 0, f"{self.file} is longer than its header says: {self.count} {self.kind}, then more bytes."
        while True:
            data = self._take(items * self.item_size)
            whole = len(data) // self.item_size
            if held + whole > self.count:
                raise UserError(longer)
            if whole:
                yield np.frombuffer(data, np.uint8, count=whole * self.item_size).reshape((whole, *self.shape))
            held += whole
            if len(data) < items * self.item_size:  # the stream has ended
                break
        if held < self.count:
            held_text = f"header says {self.count} {self.kind} but the file holds {held}"
            raise UserError(f"{self.file} is truncated: {held_text}.")
        if len(data) % self.item_size:
            raise UserError(longer)

    def _take(self, size: int) -> bytes:
        """The next `size` decompressed bytes, fewer only at the end of the stream."""
        while len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data


def inflate(path: str) -> Iterator[bytes]:
    """The decompressed bytes of a one-stream gzip file, a few MB at a time; any damage is a UserError.

    zlib checks the stream's CRC-32 and length trailer (wbits=31: gzip wrapper) as it reaches the end.
    """
    file = os.path.basename(path)
    try:
        raw = open(path, "rb")
    except OSError as exc:
        raise UserError(f"{file} cannot be read: {exc.strerror or exc}.") from None
    with raw:
        stream = zlib.decompressobj(wbits=31)
        first = raw.read(READ_SIZE)
        if first[:2] != GZIP_MAGIC:
            raise UserError(f"{file} is corrupt: it is not a gzip file.")
        for chunk in itertools.chain([first], iter(lambda: raw.read(READ_SIZE), b"")):
            while chunk and not stream.eof:
                try:
                    out = stream.decompress(chunk, INFLATE_SIZE)  # bounded, so a gzip bomb cannot fill RAM
                except zlib.error as exc:
                    raise UserError(f"{file} is corrupt: its gzip data is damaged ({exc}).") from None
                chunk = stream.unconsumed_tail
                yield out
            if stream.eof and (chunk or stream.unused_data or raw.read(1)):
                raise UserError(f"{file} has bytes after its gzip stream; EMNIST's files hold one stream each.")
    if not stream.eof:
        raise UserError(f"{file} is truncated: its gzip stream ends early.")
