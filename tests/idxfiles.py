"""Write tiny EMNIST folders for tests: gzip IDX files laid out like EMNIST's gzip/ folder."""

from __future__ import annotations

import gzip
import os
import struct
from typing import Mapping, Sequence

import numpy as np

from emnist_exp.classes import BYMERGE_CLASSES

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


def write_idx_folder(
    folder,
    name: str = "bymerge",
    splits: Mapping[str, tuple[np.ndarray, Sequence[int]]] | None = None,
    classes: Sequence[str] = BYMERGE_CLASSES,
    first_label: int = 0,
):
    """Write emnist-<name>-<split>-{images,labels} files and the mapping; return `folder`.

    `splits` maps "train"/"test" to (upright uint8 images of shape (n, 28, 28), labels). The images
    are written transposed, as in the official files. The default is 5 train and 3 test examples.
    The mapping names labels first_label, first_label + 1, ... by `classes`; a name of several
    characters is listed as several codes, as emnist-letters lists `1 65 97` for 'Aa'.
    """
    if splits is None:
        splits = {"train": random_split(5, seed=1), "test": random_split(3, seed=2)}
    os.makedirs(folder, exist_ok=True)
    for split, (images, labels) in splits.items():
        images = np.asarray(images, dtype=np.uint8)
        write_images(os.path.join(folder, f"emnist-{name}-{split}-images-idx3-ubyte.gz"), images)
        write_labels(os.path.join(folder, f"emnist-{name}-{split}-labels-idx1-ubyte.gz"), labels)
    with open(os.path.join(folder, f"emnist-{name}-mapping.txt"), "w") as mapping:
        mapping.writelines(f"{label} {' '.join(str(ord(c)) for c in name)}\n"
                           for label, name in enumerate(classes, start=first_label))
    return folder


def write_images(path, upright: np.ndarray, count: int | None = None) -> None:
    """Write (n, rows, cols) uint8 images transposed, with `count` (default n) in the header."""
    n, rows, cols = upright.shape
    header = struct.pack(">4i", IMAGES_MAGIC, n if count is None else count, rows, cols)
    write_gzip(path, header + np.ascontiguousarray(upright.transpose(0, 2, 1)).tobytes())


def write_labels(path, labels: Sequence[int], count: int | None = None) -> None:
    """Write uint8 labels, with `count` (default their number) in the header."""
    labels = np.asarray(labels, dtype=np.uint8)
    header = struct.pack(">2i", LABELS_MAGIC, len(labels) if count is None else count)
    write_gzip(path, header + labels.tobytes())


def write_gzip(path, data: bytes) -> None:
    """Gzip `data` into `path`, with mtime 0 so equal data gives equal bytes."""
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as file:
        file.write(data)


def random_split(n: int, seed: int, n_classes: int = len(BYMERGE_CLASSES)) -> tuple:
    """`n` random upright images and labels below `n_classes`."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, n_classes, n)
