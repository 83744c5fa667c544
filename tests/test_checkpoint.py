"""The training state a preempted trial resumes from: written whole, read back exactly, refused when damaged."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest


def state(epoch: int = 2):
    from emnist_exp.checkpoint import TrainingState

    rng = np.random.default_rng(0)
    return TrainingState(epoch=epoch, seed=123, history={"loss": [3.1, 2.4], "val_accuracy": [0.2, 0.31]},
                         seconds=12.5, stopper={"best": 0.31, "best_epoch": 1, "wait": 0, "stopped": False},
                         model=[rng.normal(size=(3, 3)).astype(np.float32), np.arange(4, dtype=np.uint32)],
                         optimizer=[np.array(40, np.int64), rng.normal(size=(3, 3)).astype(np.float32)],
                         best=[rng.normal(size=(3, 3)).astype(np.float32)])


def test_a_checkpoint_reads_back_what_was_written(tmp_path):
    from emnist_exp import checkpoint

    written = state()
    sha = checkpoint.save(written, tmp_path / "epoch-002.npz")
    read = checkpoint.load(tmp_path / "epoch-002.npz", sha)
    assert (read.epoch, read.seed, read.history, read.seconds, read.stopper) == \
        (written.epoch, written.seed, written.history, written.seconds, written.stopper)
    for group in ("model", "optimizer", "best"):
        assert [a.dtype for a in getattr(read, group)] == [a.dtype for a in getattr(written, group)]
        assert all(np.array_equal(a, b) for a, b in zip(getattr(read, group), getattr(written, group), strict=True))
    assert not list(tmp_path.glob("*.partial"))  # written beside, then renamed into place


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_checkpoint_is_one_sentence(tmp_path, damage):
    from emnist_exp import checkpoint

    path = tmp_path / "epoch-002.npz"
    sha = checkpoint.save(state(), path)
    raw = path.read_bytes()
    if damage == "truncate":  # a worker killed mid-upload, or a full disk
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":  # still a readable zip, other numbers: only the digest tells
        spot = raw.index(b"\x93NUMPY", raw.index(b"model.0")) + 200
        path.write_bytes(raw[:spot] + bytes([raw[spot] ^ 0xFF]) + raw[spot + 1:])
    else:
        path.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CorruptCheckpoint) as caught:
        checkpoint.load(path, sha)
    assert "\n" not in str(caught.value) and str(caught.value)
    if damage != "flip":  # without a digest, a file that no longer parses is refused too
        with pytest.raises(checkpoint.CorruptCheckpoint, match="not a readable checkpoint"):
            checkpoint.load(path)


def test_a_checkpoint_of_another_model_does_not_load(tmp_path):
    from emnist_exp import checkpoint, model as models
    from emnist_exp.spec import TrialSpec

    spec = TrialSpec(width=8, batch_norm=False)
    net = models.compile_model(models.build_model(spec, 47), spec, 10, 4)
    stop = checkpoint.ResumableEarlyStopping("val_accuracy", patience=2, restore_best_weights=True)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not fit this trial's model"):
        checkpoint.restore(state(), net, stop)


@pytest.mark.slow  # trains 4 + 2 epochs
def test_a_fit_resumed_from_its_epoch_2_checkpoint_ends_as_the_uninterrupted_fit(tmp_path):
    """Weights, optimizer (the one-cycle schedule's position), dropout's RNG, early stopping and the
    epochs' shuffle orders all carry over: the resumed fit repeats the uninterrupted one."""
    from emnist_exp import checkpoint, data, trainer
    from emnist_exp.spec import TrialSpec

    splits = data.load_splits("synthetic:600", data_dir=str(tmp_path / "tfds"), seed=0)
    spec = TrialSpec(width=8, dropout=0.2, batch_norm=False, schedule="onecycle", batch_size=64)
    saved: dict[int, tuple[Path, str]] = {}

    def keep(path: Path, sha: str, epoch: int) -> None:
        saved[epoch] = (shutil.copy(path, tmp_path / path.name), sha)

    options = {"epochs": 4, "patience": 3, "seed": 123, "shuffle_buffer": 1000, "verbose": 0}
    whole = trainer.train_spec(spec, splits, publish=keep, **options)
    assert sorted(saved) == [1, 2, 3, 4]
    resumed_from = checkpoint.load(*saved[2])
    assert resumed_from.history["loss"] == whole.history["loss"][:2]
    resumed = trainer.train_spec(spec, splits, resume=resumed_from, **options)
    assert resumed.epochs_run == 4
    np.testing.assert_allclose(resumed.history["loss"], whole.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(resumed.val_probs, whole.val_probs, atol=1e-5)
    assert resumed.seconds > resumed_from.seconds  # the first worker's training time is counted too
