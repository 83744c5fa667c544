"""Tests of the tfds builders: tiny IDX folders written here, the synthetic set, the real sample."""

from __future__ import annotations

import gzip
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from idxfiles import random_split, write_idx_folder, write_images, write_labels
from tensorflow_datasets.core import shuffle

from emnist_exp.builders import idx
from emnist_exp.builders.idx import BLOCK_ITEMS, EmnistIdx, idx_builder
from emnist_exp.builders.synthetic import synthetic_builder
from emnist_exp.classes import BYMERGE_CLASSES
from emnist_exp.errors import UserError

TRAIN_IMAGES = "emnist-bymerge-train-images-idx3-ubyte.gz"
TRAIN_LABELS = "emnist-bymerge-train-labels-idx1-ubyte.gz"


def read_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """All (n, 28, 28) images and (n,) labels of one split, in stored order."""
    dataset = builder.as_dataset(split=split, as_supervised=True, batch_size=-1)
    images, labels = tfds.as_numpy(dataset)
    return images[..., 0], labels


# IDX folders


def test_idx_reads_train_and_test_as_stored(tmp_path):
    train, test = random_split(5, seed=1), random_split(3, seed=2)
    folder = write_idx_folder(tmp_path / "emnist", splits={"train": train, "test": test})

    builder = idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))

    counts = {name: split.num_examples for name, split in builder.info.splits.items()}
    assert counts == {"train": 5, "test": 3}
    for split, (upright, labels) in {"train": train, "test": test}.items():
        images, read_labels = read_split(builder, split)
        np.testing.assert_array_equal(images, upright.transpose(0, 2, 1))  # as stored in the file
        np.testing.assert_array_equal(read_labels, labels)
    assert builder.info.features["label"].names == list(BYMERGE_CLASSES)
    assert builder.info.metadata["orientation"] == "transposed"
    assert "TRANSPOSED" in builder.info.description


@pytest.mark.parametrize("only", ["train", "test"])
def test_idx_accepts_a_folder_with_one_split(tmp_path, only):
    upright, labels = random_split(4, seed=3)
    folder = write_idx_folder(tmp_path / "emnist", splits={only: (upright, labels)})

    builder = idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))

    assert list(builder.info.splits) == [only]
    assert builder.info.splits[only].num_examples == 4
    np.testing.assert_array_equal(read_split(builder, only)[0], upright.transpose(0, 2, 1))


def test_idx_counts_come_from_the_headers(tmp_path):
    splits = {"train": random_split(123, seed=4), "test": random_split(45, seed=5)}
    folder = write_idx_folder(tmp_path / "emnist", splits=splits)
    builder = idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))
    assert builder.info.splits["train"].num_examples == 123
    assert builder.info.splits["test"].num_examples == 45


def test_idx_class_names_come_from_the_mapping_of_any_emnist_name(tmp_path):
    classes = tuple("0123456789ABC")
    splits = {"test": random_split(6, seed=6, n_classes=len(classes))}
    folder = write_idx_folder(tmp_path / "emnist", name="balanced", splits=splits, classes=classes)

    builder = idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))

    assert builder.info.features["label"].names == list(classes)
    assert builder.builder_config.name.startswith("balanced_")


def test_idx_folders_with_the_same_names_but_other_content_do_not_share_a_cache(tmp_path):
    first, second = random_split(6, seed=7), random_split(6, seed=8)
    folder_a = write_idx_folder(tmp_path / "a", splits={"train": first})
    folder_b = write_idx_folder(tmp_path / "b", splits={"train": second})
    data_dir = str(tmp_path / "tfds")

    builder_a = idx_builder(str(folder_a), data_dir)
    builder_b = idx_builder(str(folder_b), data_dir)

    assert builder_a.builder_config.name != builder_b.builder_config.name
    np.testing.assert_array_equal(read_split(builder_a, "train")[0], first[0].transpose(0, 2, 1))
    np.testing.assert_array_equal(read_split(builder_b, "train")[0], second[0].transpose(0, 2, 1))
    copy = shutil.copytree(folder_a, tmp_path / "copy of a")
    assert idx_builder(str(copy), data_dir).builder_config.name == builder_a.builder_config.name


def test_idx_second_call_reuses_the_prepared_data(tmp_path, monkeypatch):
    upright, labels = random_split(5, seed=9)
    folder = str(write_idx_folder(tmp_path / "emnist", splits={"train": (upright, labels)}))
    first = idx_builder(folder, data_dir=str(tmp_path / "tfds"))

    def regenerate(*args, **kwargs):
        raise AssertionError("the cached data should have been reused")

    monkeypatch.setattr(EmnistIdx, "_generate_examples", regenerate)
    second = idx_builder(folder, data_dir=str(tmp_path / "tfds"))

    assert second.data_dir == first.data_dir
    np.testing.assert_array_equal(read_split(second, "train")[1], labels)


def test_idx_uses_tfds_data_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "from env"))
    folder = write_idx_folder(tmp_path / "emnist")
    builder = idx_builder(str(folder))
    assert builder.data_dir.startswith(str(tmp_path / "from env"))


def make_missing(folder):
    return folder / "nowhere"


def make_file(folder):
    (folder / "a file").write_text("not a folder")
    return folder / "a file"


def make_unrelated(folder):
    (folder / "README.md").write_text("no EMNIST files here")
    return folder


def make_two_names(folder):
    write_idx_folder(folder, name="bymerge")
    return write_idx_folder(folder, name="balanced")


def make_lone_images(folder):
    write_idx_folder(folder)
    os.remove(folder / TRAIN_LABELS)
    return folder


def make_no_mapping(folder):
    write_idx_folder(folder)
    os.remove(folder / "emnist-bymerge-mapping.txt")
    return folder


def make_bad_mapping(folder):
    write_idx_folder(folder)
    (folder / "emnist-bymerge-mapping.txt").write_text("0 48\n1 forty-nine\n")
    return folder


def make_wrong_magic(folder):
    write_idx_folder(folder)
    write_labels(folder / TRAIN_IMAGES, [1, 2, 3, 4, 5])  # a labels file under an images name
    return folder


def make_truncated(folder):
    write_idx_folder(folder)
    write_images(folder / TRAIN_IMAGES, random_split(37, seed=0)[0], count=100)
    write_labels(folder / TRAIN_LABELS, [0] * 100)
    return folder


def make_cut_gzip(folder):
    write_idx_folder(folder)
    data = (folder / TRAIN_IMAGES).read_bytes()
    (folder / TRAIN_IMAGES).write_bytes(data[: len(data) // 2])
    return folder


def make_not_gzip(folder):
    write_idx_folder(folder)
    (folder / TRAIN_IMAGES).write_bytes(b"these bytes are not gzip at all")
    return folder


def make_bad_crc(folder):
    write_idx_folder(folder)
    data = bytearray((folder / TRAIN_IMAGES).read_bytes())
    data[-8] ^= 0xFF  # the gzip trailer's CRC-32 of the decompressed bytes
    (folder / TRAIN_IMAGES).write_bytes(bytes(data))
    return folder


def make_two_gzip_streams(folder):
    write_idx_folder(folder)
    data = (folder / TRAIN_IMAGES).read_bytes()
    (folder / TRAIN_IMAGES).write_bytes(data + data)
    return folder


def make_more_images_than_the_header(folder):
    write_idx_folder(folder)
    write_images(folder / TRAIN_IMAGES, random_split(6, seed=0)[0], count=5)
    return folder


def make_count_mismatch(folder):
    write_idx_folder(folder)
    write_labels(folder / TRAIN_LABELS, [1, 2, 3, 4])  # the images file holds 5
    return folder


def make_unknown_label(folder):
    write_idx_folder(folder)
    write_labels(folder / TRAIN_LABELS, [1, 2, 3, 4, 47])  # the mapping lists 0..46
    return folder


@pytest.mark.parametrize(
    "make, message",
    [
        (make_missing, r"^EMNIST folder .*nowhere does not exist\.$"),
        (make_file, r"^EMNIST folder .*a file is a file, not a folder\.$"),
        (make_unrelated, r"holds no EMNIST IDX files"),
        (make_two_names, r"several EMNIST datasets \(balanced, bymerge\); keep one per folder\.$"),
        (make_lone_images, rf"has {TRAIN_IMAGES} but not {TRAIN_LABELS}\.$"),
        (make_no_mapping, r"has no emnist-bymerge-mapping\.txt, which names the classes\.$"),
        (make_bad_mapping, r"^emnist-bymerge-mapping\.txt line 2 is not 'label ascii-code': '1 forty-nine'\.$"),
        (make_wrong_magic, rf"^{TRAIN_IMAGES} is not an IDX images file: its magic number is 2049, not 2051\.$"),
        (make_truncated, rf"^{TRAIN_IMAGES} is truncated: header says 100 images but the file holds 37\.$"),
        (make_cut_gzip, rf"^{TRAIN_IMAGES} is truncated: its gzip stream ends early\.$"),
        (make_not_gzip, rf"^{TRAIN_IMAGES} is corrupt: it is not a gzip file\.$"),
        (make_bad_crc, rf"^{TRAIN_IMAGES} is corrupt: its gzip data is damaged \(.*incorrect data check\)\.$"),
        (make_two_gzip_streams,
         rf"^{TRAIN_IMAGES} has bytes after its gzip stream; EMNIST's files hold one stream each\.$"),
        (make_more_images_than_the_header,
         rf"^{TRAIN_IMAGES} is longer than its header says: 5 images, then more bytes\.$"),
        (make_count_mismatch, rf"^{TRAIN_IMAGES} holds 5 images but {TRAIN_LABELS} holds 4 labels\.$"),
        (make_unknown_label, rf"^{TRAIN_LABELS} holds label 47, which emnist-bymerge-mapping\.txt does not list\.$"),
    ],
)
def test_idx_bad_input_is_one_clear_sentence_before_any_preparation(tmp_path, make, message):
    (tmp_path / "emnist").mkdir()
    folder = make(tmp_path / "emnist")

    with pytest.raises(UserError, match=message) as raised:
        idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))

    sentence = str(raised.value)
    assert sentence.endswith(".") and "\n" not in sentence
    assert not (tmp_path / "tfds").exists()


def test_idx_streams_files_of_many_blocks(tmp_path):
    upright, labels = random_split(2 * BLOCK_ITEMS + 7, seed=10)  # two whole blocks and a part
    folder = write_idx_folder(tmp_path / "emnist", splits={"train": (upright, labels)})

    builder = idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))

    images, read_labels = read_split(builder, "train")
    np.testing.assert_array_equal(images, upright.transpose(0, 2, 1))
    np.testing.assert_array_equal(read_labels, labels)


def test_idx_preparation_spilled_to_disk_keeps_the_files_order(tmp_path, monkeypatch):
    monkeypatch.setattr(idx, "SPILL_AT", 20_000)  # bytes: tfds' writer spills after ~25 of 600 examples
    upright, labels = random_split(600, seed=13)
    folder = write_idx_folder(tmp_path / "emnist", splits={"train": (upright, labels)})

    builder = idx_builder(str(folder), data_dir=str(tmp_path / "tfds"))

    images, read_labels = read_split(builder, "train")
    np.testing.assert_array_equal(images, upright.transpose(0, 2, 1))
    np.testing.assert_array_equal(read_labels, labels)
    assert shuffle.MAX_MEM_BUFFER_SIZE == 1000 << 20  # tfds' own limit again once prepared


def test_idx_prepared_folder_opens_without_inflating_a_file(tmp_path, monkeypatch):
    folder = str(write_idx_folder(tmp_path / "emnist", splits={"train": random_split(50, seed=11)}))
    first = idx_builder(folder, data_dir=str(tmp_path / "tfds"))

    def inflate(path):
        raise AssertionError(f"{path} was decompressed, but its folder is prepared")

    monkeypatch.setattr(idx, "inflate", inflate)
    again = idx_builder(folder, data_dir=str(tmp_path / "tfds"))

    assert again.builder_config.name == first.builder_config.name


def test_idx_key_changes_when_one_image_inside_changes(tmp_path):
    upright, labels = random_split(3 * BLOCK_ITEMS, seed=12)  # images files far longer than the key reads
    folder = write_idx_folder(tmp_path / "emnist", splits={"train": (upright, labels)})
    data_dir = str(tmp_path / "tfds")
    before = idx_builder(str(folder), data_dir)
    changed = upright.copy()
    changed[len(changed) // 2, 10, 10] ^= 1  # one pixel of the middle image
    write_images(folder / TRAIN_IMAGES, changed)

    after = idx_builder(str(folder), data_dir)

    assert after.builder_config.name != before.builder_config.name
    np.testing.assert_array_equal(read_split(after, "train")[0], changed.transpose(0, 2, 1))


@pytest.mark.slow
def test_idx_reads_the_real_sample(tmp_path):
    folder = os.environ.get("EMNIST_SAMPLE_DIR")
    if not folder:
        pytest.skip("EMNIST_SAMPLE_DIR not set: point it at emnist-bymerge-sample to run this (~20 s).")

    builder = idx_builder(folder, data_dir=str(tmp_path / "tfds"))

    assert builder.info.splits["train"].num_examples == 84_845
    assert builder.info.splits["test"].num_examples == 15_000
    names = builder.info.features["label"].names
    assert "".join(names) == "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"
    with gzip.open(os.path.join(folder, "emnist-bymerge-test-images-idx3-ubyte.gz")) as raw:
        first = np.frombuffer(raw.read(16 + 10 * 28 * 28), np.uint8, offset=16).reshape(10, 28, 28)
    stored = tfds.as_numpy(builder.as_dataset(split="test").take(10))
    np.testing.assert_array_equal(np.stack([example["image"][..., 0] for example in stored]), first)


# Synthetic set


def test_synthetic_same_seed_gives_the_same_bytes(tmp_path):
    def shards(builder):
        return [path.read_bytes() for path in sorted(builder.data_path.glob("*.tfrecord*"))]

    first = synthetic_builder(94, data_dir=str(tmp_path / "one"), seed=3)
    again = synthetic_builder(94, data_dir=str(tmp_path / "two"), seed=3)
    other = synthetic_builder(94, data_dir=str(tmp_path / "one"), seed=4)

    assert first.builder_config.name == "n94_s3"
    assert shards(first) and shards(first) == shards(again)
    assert not np.array_equal(read_split(first, "train")[0], read_split(other, "train")[0])


def test_synthetic_has_47_classes_white_on_black(tmp_path):
    builder = synthetic_builder(470, data_dir=str(tmp_path / "tfds"))
    images, labels = read_split(builder, "train")

    assert builder.info.splits["test"].num_examples == 470 // 6
    assert builder.info.features["label"].names == list(BYMERGE_CLASSES)
    assert np.bincount(labels, minlength=47).tolist() == [10] * 47
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], 1)
    assert (border == 0).mean() > 0.95  # black background, glyph inside the frame
    assert (images.max(axis=(1, 2)) >= 200).all()  # every glyph has bright ink
    assert 0.05 < (images > 128).mean() < 0.35  # strokes, neither blank nor filled boxes
    assert builder.info.metadata["orientation"] == "upright"


def test_synthetic_glyphs_are_upright(tmp_path):
    # An upright L has its corner at the bottom left: the bottom and left quarters of its ink box
    # hold more ink than the top and right ones (measured: about 1.8x and 2x). Transposed or
    # flipped upside down, the ratios fall to about 0.5.
    builder = synthetic_builder(940, data_dir=str(tmp_path / "tfds"))
    images, labels = read_split(builder, "train")
    quarters = {"top": [], "bottom": [], "left": [], "right": []}
    for image in images[labels == BYMERGE_CLASSES.index("L")].astype(float):
        rows, cols = np.nonzero(image > 50)
        box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        height, width = box.shape
        quarters["top"].append(box[: height // 4].sum())
        quarters["bottom"].append(box[-(height // 4) :].sum())
        quarters["left"].append(box[:, : width // 4].sum())
        quarters["right"].append(box[:, -(width // 4) :].sum())

    assert len(quarters["top"]) == 20
    assert np.mean(quarters["bottom"]) > 1.2 * np.mean(quarters["top"])
    assert np.mean(quarters["left"]) > 1.2 * np.mean(quarters["right"])


@pytest.mark.slow
def test_synthetic_is_learnable(tmp_path):
    import keras  # here, so that collecting the other tests does not pay for it
    builder = synthetic_builder(3000, data_dir=str(tmp_path / "tfds"))
    x_train, y_train = read_split(builder, "train")
    x_test, y_test = read_split(builder, "test")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(47, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])

    model.fit(x_train[..., None], y_train, batch_size=32, epochs=1, verbose=0)

    # One epoch on 3000 examples gave 0.43-0.51 on the 500 test ones over 3 seeds; chance is 0.02.
    assert model.evaluate(x_test[..., None], y_test, verbose=0)[1] > 0.25


def test_synthetic_rejects_a_bad_size(tmp_path):
    with pytest.raises(UserError, match=r"^The synthetic dataset size must be a positive integer, not 0\.$"):
        synthetic_builder(0, data_dir=str(tmp_path / "tfds"))
