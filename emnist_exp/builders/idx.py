"""tfds builder for a local folder of official EMNIST gzip IDX files, read in place, no download."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import re
import struct
import zlib
from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

from emnist_exp.errors import UserError

# IDX format (http://yann.lecun.com/exdb/mnist/): a big-endian int32 magic number, then one
# int32 per dimension, then the uint8 data.
IMAGES_MAGIC = 2051  # unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # unsigned bytes, 1 dimension
SIDE = 28
IMAGE_NOTE = "Images are raw uint8 bytes instead of PNG: about twice as fast to stream, no decoding."
MAX_LABEL = 10_000

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

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": IMAGE_NOTE}

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
        images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
        for index, (image, label) in enumerate(zip(images, labels)):
            yield index, {"image": image[..., None], "label": int(label)}


def idx_builder(folder: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Validate `folder`, return an EmnistIdx builder for it, already prepared (download_and_prepare done)."""
    folder = os.path.abspath(os.fspath(folder))
    splits, mapping_path = find_files(folder)
    mapping = read_mapping(mapping_path)
    for images_path, labels_path in splits.values():
        check_pair(images_path, labels_path, mapping_path, mapping)
    name = IDX_FILE.fullmatch(os.path.basename(next(iter(splits.values()))[0]))["name"]
    config = EmnistIdxConfig(
        name=f"{name}_{folder_fingerprint(folder)[:16]}",
        description=f"EMNIST {name} from {folder}.",
        folder=folder,
        emnist_name=name,
        classes=tuple(mapping.get(label, f"unused_{label}") for label in range(max(mapping) + 1)),
    )
    builder = EmnistIdx(config=config, data_dir=data_dir or os.environ.get("TFDS_DATA_DIR"))
    builder.download_and_prepare()
    return builder


def folder_fingerprint(folder: str) -> str:
    """sha1 over the names and bytes of the folder's EMNIST files: equal content, equal hash."""
    splits, mapping_path = find_files(os.fspath(folder))
    digest = hashlib.sha1()
    for path in sorted([mapping_path, *(path for pair in splits.values() for path in pair)]):
        digest.update(os.path.basename(path).encode() + b"\0")
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def find_files(folder: str) -> tuple[dict[str, tuple[str, str]], str]:
    """{split: (images path, labels path)} for each pair of files, and the mapping file's path."""
    if not os.path.exists(folder):
        raise UserError(f"EMNIST folder {folder} does not exist.")
    if not os.path.isdir(folder):
        raise UserError(f"EMNIST folder {folder} is a file, not a folder.")
    found = {}  # (name, split, kind) -> file name
    for match in filter(None, map(IDX_FILE.fullmatch, sorted(os.listdir(folder)))):
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
    """Raise UserError unless the two files agree in count and every label is in the mapping."""
    images, labels = read_idx(images_path, "images"), read_idx(labels_path, "labels")
    images_file, labels_file = os.path.basename(images_path), os.path.basename(labels_path)
    if len(images) != len(labels):
        counts = f"{len(images)} images but {labels_file} holds {len(labels)} labels"
        raise UserError(f"{images_file} holds {counts}.")
    require_examples(images_file, len(images))
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


def read_idx(path: str, kind: str) -> np.ndarray:
    """The array in one gzip IDX file: (n, 28, 28) images as stored (transposed), or (n,) labels."""
    file, data = os.path.basename(path), gunzip(path)
    magic = KINDS[kind][1]
    n_dims = 3 if kind == "images" else 1
    header_size = 4 * (1 + n_dims)
    if len(data) < 4:
        raise UserError(f"{file} is truncated: it is too short to hold an IDX header.")
    found = struct.unpack(">I", data[:4])[0]
    if found != magic:
        raise UserError(f"{file} is not an IDX {kind} file: its magic number is {found}, not {magic}.")
    if len(data) < header_size:
        raise UserError(f"{file} is truncated: it is too short to hold an IDX header.")
    dims = list(struct.unpack(f">{n_dims}I", data[4:header_size]))
    if dims[1:] and dims[1:] != [SIDE, SIDE]:
        raise UserError(f"{file} holds {dims[1]}x{dims[2]} images, but EMNIST's are {SIDE}x{SIDE}.")
    item_size = SIDE * SIDE if kind == "images" else 1
    held, extra = divmod(len(data) - header_size, item_size)
    count = dims[0]
    if held < count:
        raise UserError(f"{file} is truncated: header says {count} {kind} but the file holds {held}.")
    if held > count or extra:
        raise UserError(f"{file} is longer than its header says: {count} {kind}, then more bytes.")
    return np.frombuffer(data, np.uint8, offset=header_size).reshape(dims)


def gunzip(path: str) -> bytes:
    """The decompressed content of a gzip file; a damaged or non-gzip file is a UserError."""
    file = os.path.basename(path)
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except gzip.BadGzipFile:
        raise UserError(f"{file} is corrupt: it is not a gzip file.") from None
    except EOFError:
        raise UserError(f"{file} is truncated: its gzip stream ends early.") from None
    except zlib.error as exc:
        raise UserError(f"{file} is corrupt: its gzip data is damaged ({exc}).") from None
    except OSError as exc:
        raise UserError(f"{file} cannot be read: {exc.strerror or exc}.") from None
