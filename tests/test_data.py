"""The data pipeline: every source, orientation, the validation carve, streaming, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds
from idxfiles import random_split, write_idx_folder

from emnist_exp import data, pipelines
from emnist_exp.classes import BYMERGE_CLASSES
from emnist_exp.errors import UserError


def arrays(ds, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    ds = ds.take(limit) if limit else ds
    pairs = list(ds.as_numpy_iterator())
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def test_idx_source_streams_upright_images(tmp_path):
    upright, labels = random_split(20, seed=5)
    folder = write_idx_folder(tmp_path / "f", splits={"train": (upright, labels), "test": random_split(4, seed=6)})
    splits = data.load_splits(f"idx:{folder}", val_fraction=0.25, data_dir=str(tmp_path / "tfds"))
    assert splits.counts == {"train": 15, "val": 5, "test": 4}
    assert splits.classes == BYMERGE_CLASSES
    images, got = arrays(splits.val)
    # The files hold transposed images; what the pipeline gives must be the upright originals.
    np.testing.assert_array_equal(images[..., 0], upright[15:])
    np.testing.assert_array_equal(got, labels[15:])


def test_block_reader_gives_what_tfds_as_dataset_gives(tmp_path, monkeypatch):
    """Our builders are parsed a block at a time from their records; the result must be tfds' own."""
    monkeypatch.setattr(data, "BLOCK", 8)  # blocks boundaries inside the slices
    upright, labels = random_split(60, seed=4)
    folder = write_idx_folder(tmp_path / "f", splits={"train": (upright, labels)})
    source = data.open_source(f"idx:{folder}", data_dir=str(tmp_path / "tfds"))
    assert source.builder.name in data.RAW_BUILDERS
    for split in ("train", "train[7:33]", "train[50:]"):
        images, got = arrays(data.read_split(source, split))
        stored, want = arrays(source.builder.as_dataset(split=split, as_supervised=True))
        np.testing.assert_array_equal(images, stored.transpose(0, 2, 1, 3))
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(arrays(data.read_split(source, "train[7:33]"))[0][..., 0], upright[7:33])


def test_validation_is_carved_from_train_disjoint_and_deterministic(tmp_path):
    upright, labels = random_split(50, seed=9)
    folder = write_idx_folder(tmp_path / "f", splits={"train": (upright, labels)})
    first = data.load_splits(f"idx:{folder}", data_dir=str(tmp_path / "tfds"), seed=1)
    second = data.load_splits(f"idx:{folder}", data_dir=str(tmp_path / "tfds"), seed=2)
    train, _ = arrays(first.train)
    val, _ = arrays(first.val)
    assert first.counts == {"train": 45, "val": 5, "test": 0} and first.test is None
    assert len(train) == 45 and len(val) == 5
    train_keys = {im.tobytes() for im in train}
    assert not train_keys & {im.tobytes() for im in val}
    assert train_keys | {im.tobytes() for im in val} == {im.tobytes() for im in upright}
    np.testing.assert_array_equal(val, arrays(second.val)[0])  # same carve whatever the seed


def test_max_examples_caps_train_validation_and_test(tmp_path):
    folder = write_idx_folder(tmp_path / "f", splits={"train": random_split(40, 1), "test": random_split(30, 2)})
    splits = data.load_splits(f"idx:{folder}", max_examples=20, data_dir=str(tmp_path / "tfds"))
    assert splits.counts == {"train": 18, "val": 2, "test": 20}
    assert len(arrays(splits.train)[0]) == 18 and len(arrays(splits.test)[0]) == 20


def test_training_pipeline_batches_floats_one_hot_and_augments(tmp_path):
    from emnist_exp.model import build_augmenter
    from emnist_exp.spec import TrialSpec

    folder = write_idx_folder(tmp_path / "f", splits={"train": random_split(40, 3)})
    splits = data.load_splits(f"idx:{folder}", data_dir=str(tmp_path / "tfds"))
    plain = pipelines.training_pipeline(splits.train, num_classes=47, batch_size=8, seed=0, shuffle_buffer=100)
    x, y = next(iter(plain))
    assert x.shape == (8, 28, 28, 1) and x.dtype.name == "float32" and y.shape == (8, 47)
    assert float(x.numpy().max()) > 1.0  # raw pixels: scaling is inside the model
    spec = TrialSpec(augment=True, rotation=15, shift=0.1, zoom=0.1, elastic=0.5)
    augmented = pipelines.training_pipeline(splits.train, num_classes=47, batch_size=36, seed=0, shuffle_buffer=1,
                                            augment=build_augmenter(spec, seed=0))
    xa, _ = next(iter(augmented))
    xp, _ = next(iter(pipelines.training_pipeline(splits.train, num_classes=47, batch_size=36, seed=0,
                                                  shuffle_buffer=1)))
    assert xa.shape == xp.shape and not np.allclose(xa.numpy(), xp.numpy())


@pytest.mark.slow  # every batch of an epoch through the elastic transform: the fast tier's largest cost
def test_augmentation_keeps_every_image_with_its_own_label(workdir):
    """Each augmented image must still be the image its label belongs to, batch after batch.

    Keras' elastic transform on batches of unknown size pastes strokes across the batch; whole
    batches (static shape) keep it honest. On batches of unknown size about half the images here move.
    """
    from emnist_exp.model import build_augmenter
    from emnist_exp.spec import TrialSpec

    splits = data.load_splits("synthetic:600", val_fraction=0.1)
    spec = TrialSpec(augment=True, elastic=0.5)
    kwargs = dict(num_classes=47, batch_size=32, seed=3, shuffle_buffer=200)
    plain = pipelines.training_pipeline(splits.train, **kwargs)
    augmented = pipelines.training_pipeline(splits.train, **kwargs, augment=build_augmenter(spec, seed=0))
    moved = total = 0
    for (xp, yp), (xa, ya) in zip(plain, augmented):
        np.testing.assert_array_equal(yp.numpy(), ya.numpy())  # same shuffle: the same examples
        a = xp.numpy().reshape(len(xp), -1)
        b = xa.numpy().reshape(len(xa), -1)
        assert not np.allclose(a, b)
        a, b = a - a.mean(1, keepdims=True), b - b.mean(1, keepdims=True)
        similarity = (b @ a.T) / np.outer(np.linalg.norm(b, axis=1), np.linalg.norm(a, axis=1))
        moved += int(np.sum(similarity.argmax(axis=1) != np.arange(len(b))))
        total += len(b)
    assert moved <= 0.02 * total, f"{moved} of {total} augmented images look more like a batch-mate"
    assert total == 32 * (540 // 32)  # whole batches only


def test_synthetic_source_is_upright_and_unchanged_by_the_pipeline(workdir):
    splits = data.load_splits("synthetic:600", val_fraction=0.1)
    assert splits.classes == BYMERGE_CLASSES and not splits.source.transposed
    assert splits.counts == {"train": 540, "val": 60, "test": 100}
    images, labels = arrays(splits.train)
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    assert set(labels) <= set(range(47)) and len(set(labels)) > 40


def test_tfds_emnist_through_mock_data(tmp_path):
    # tfds's own emnist builder, offline: its split sizes are written as metadata files, as
    # tfds.testing.mock_data recommends, and mock_data stands in for the download. The sizes match
    # what mock_data yields, because load_splits tells tf.data each split's length.
    mock_emnist(tmp_path, 2000, 1000)
    with tfds.testing.mock_data(num_examples=2000, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
        splits = data.load_splits("emnist/bymerge", max_examples=1000, data_dir=str(tmp_path))
        assert splits.source.transposed and splits.classes == BYMERGE_CLASSES
        assert splits.counts == {"train": 900, "val": 100, "test": 1000}
        x, y = next(iter(pipelines.training_pipeline(splits.train, num_classes=47, batch_size=16, seed=0,
                                                     shuffle_buffer=64)))
        assert x.shape == (16, 28, 28, 1) and y.shape == (16, 47)
        assert sum(1 for _ in splits.val) == 100 and sum(1 for _ in splits.test) == 1000


def mock_emnist(data_dir, n_train: int, n_test: int):
    """tfds `emnist/bymerge` metadata of the given split sizes in data_dir, as mock_data (USE_FILES) reads it."""
    builder = tfds.builder("emnist/bymerge", data_dir=str(data_dir))
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name="train", shard_lengths=[n_train], num_bytes=0),
        tfds.core.SplitInfo(name="test", shard_lengths=[n_test], num_bytes=0),
    ]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    return builder


def test_tfds_emnist_reads_decoded_blocks_in_tfds_order_with_slices(tmp_path):
    """read_split's raw-byte copy of tfds `emnist` gives what as_dataset gives, made upright, slices included."""
    builder = mock_emnist(tmp_path, 2 * data.BLOCK + 100, 30)
    with tfds.testing.mock_data(num_examples=2 * data.BLOCK + 100, policy=tfds.testing.MockPolicy.USE_FILES,
                                data_dir=str(tmp_path)):
        source = data.open_source("emnist/bymerge", str(tmp_path))
        stored = list(source.builder.as_dataset(split="train", as_supervised=True).as_numpy_iterator())
        whole = arrays(data.read_split(source, "train"))
        cases = {"train[1000:2100]": (1000, 2100), "train[-5:]": (len(stored) - 5, len(stored))}
        sliced = {split: arrays(data.read_split(source, split)) for split in cases}
        empty = list(data.read_split(source, "train[7:7]").as_numpy_iterator())

    expected_images = np.stack([image.transpose(1, 0, 2) for image, _ in stored])  # upright
    expected_labels = np.array([label for _, label in stored])
    np.testing.assert_array_equal(whole[0], expected_images)
    np.testing.assert_array_equal(whole[1], expected_labels)
    for split, (start, stop) in cases.items():
        np.testing.assert_array_equal(sliced[split][0], expected_images[start:stop])
        np.testing.assert_array_equal(sliced[split][1], expected_labels[start:stop])
    assert empty == []
    assert (builder.data_path / f"raw-blocks-{data.BLOCK}" / "train").is_dir()  # decoded once, kept


def test_tfds_emnist_without_room_for_the_copy_still_reads(tmp_path):
    builder = mock_emnist(tmp_path, 300, 30)
    (builder.data_path / f"raw-blocks-{data.BLOCK}").write_text("a file where the copy's folder would go")
    with tfds.testing.mock_data(num_examples=300, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=str(tmp_path)):
        source = data.open_source("emnist/bymerge", str(tmp_path))
        stored = list(source.builder.as_dataset(split="train", as_supervised=True).as_numpy_iterator())
        images, labels = arrays(data.read_split(source, "train[10:20]"))

    np.testing.assert_array_equal(images, np.stack([image.transpose(1, 0, 2) for image, _ in stored[10:20]]))
    np.testing.assert_array_equal(labels, [label for _, label in stored[10:20]])


def test_tfds_emnist_offline_says_how_to_get_the_data(tmp_path, monkeypatch):
    # A host under .invalid never resolves (RFC 6761): offline whatever this machine's network, no download.
    monkeypatch.setattr(data, "EMNIST_HOST", "emnist-download.invalid")
    with pytest.raises(UserError, match="unreachable.*TFDS_DATA_DIR.*idx:<folder>"):
        data.open_source("emnist/bymerge", str(tmp_path))
    assert not any(tmp_path.rglob("*.zip")) and not any(tmp_path.rglob("*.tfrecord*"))


@pytest.mark.parametrize("spec, message", [
    ("mnist", "unknown dataset 'mnist'"),
    ("emnist/nope", "unknown tfds dataset 'emnist/nope'"),
    ("synthetic:ten", "synthetic size must be a whole number"),
    ("idx:/no/such/folder", "/no/such/folder"),
])
def test_bad_dataset_specs(tmp_path, spec, message):
    with pytest.raises(UserError, match=message):
        data.open_source(spec, str(tmp_path))


def test_missing_split_is_one_clear_error(tmp_path):
    folder = write_idx_folder(tmp_path / "f", splits={"test": random_split(5, 1)})
    with pytest.raises(UserError, match="has no 'train' split"):
        data.load_splits(f"idx:{folder}", data_dir=str(tmp_path / "tfds"))


def mass(images: np.ndarray) -> dict[str, float]:
    mean = images.astype(np.float64).mean(axis=0)[..., 0]
    return {"top": mean[:14].sum(), "bottom": mean[14:].sum(), "left": mean[:, :14].sum(), "right": mean[:, 14:].sum()}


@pytest.mark.slow
def test_real_sample_reaches_the_model_upright(sample_dir, workdir):
    """On real EMNIST images: an upright 'L' has its ink low and left; a '7' has its bar on top."""
    splits = data.load_splits(f"idx:{sample_dir}", max_examples=20_000)
    assert splits.counts == {"train": 18_000, "val": 2_000, "test": 15_000}
    images, labels = arrays(splits.train)
    ell = mass(images[labels == BYMERGE_CLASSES.index("L")])
    seven = mass(images[labels == BYMERGE_CLASSES.index("7")])
    assert ell["bottom"] > 1.2 * ell["top"] and ell["left"] > 1.2 * ell["right"]
    assert seven["top"] > 1.2 * seven["bottom"]
    # The same files read as stored (transposed) fail those checks: the test can tell the difference.
    flipped = mass(images.transpose(0, 2, 1, 3)[labels == BYMERGE_CLASSES.index("L")])
    assert not flipped["bottom"] > 1.2 * flipped["top"]
