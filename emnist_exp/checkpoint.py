"""A trial's whole training state in one file, written each epoch and read back to resume on any worker."""

from __future__ import annotations

import hashlib
import json
import os
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from emnist_exp.errors import UserError

FORMAT = 1  # the file's layout; a checkpoint of another layout is refused as unreadable
GROUPS = ("model", "optimizer", "best")  # the arrays, in the order of their variables


class CorruptCheckpoint(UserError):
    """A checkpoint that cannot be read or does not fit the trial's model: the trial starts again."""


@dataclass
class TrainingState:
    """Everything that a fit carried over from one epoch to the next, at the end of `epoch` epochs."""

    epoch: int  # epochs finished: training goes on at this (0-based) epoch
    seed: int  # the trial's Keras seed, so the resumed trial draws what the original would have
    history: dict[str, list[float]]  # Keras' logs per epoch; val_accuracy is what the pruner was told
    seconds: float  # training time so far, over every worker that ran the trial
    stopper: dict = field(default_factory=dict)  # EarlyStopping's best, best_epoch, wait, and whether it stopped
    model: list[np.ndarray] = field(default_factory=list)  # every model variable: weights, BN statistics, dropout RNG
    optimizer: list[np.ndarray] = field(default_factory=list)  # iterations (the per-step schedules' position), moments
    best: list[np.ndarray] | None = None  # EarlyStopping's best weights (model.get_weights() order)

    @property
    def stopped(self) -> bool:
        """Early stopping ended the fit at this epoch: nothing is left to train."""
        return bool(self.stopper.get("stopped"))


def digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def save(state: TrainingState, path: Path) -> str:
    """Write `state` to `path` (through a temporary file beside it, then a rename); returns its sha256."""
    meta = {"format": FORMAT, "epoch": state.epoch, "seed": state.seed, "history": state.history,
            "seconds": state.seconds, "stopper": state.stopper, "has_best": state.best is not None}
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}
    for group in GROUPS:
        for i, value in enumerate(getattr(state, group) or []):
            arrays[f"{group}.{i}"] = value
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as handle:
        np.savez(handle, **arrays)  # uncompressed: float weights barely compress, and saving stays fast
    os.replace(partial, path)
    return digest(path)


def load(path: Path, expected: str | None = None) -> TrainingState:
    """The state in `path`; a CorruptCheckpoint if it is truncated, changed (against `expected`) or unreadable."""
    if expected and digest(path) != expected:
        raise CorruptCheckpoint("its contents differ from the digest recorded when it was written (truncated "
                                "or changed since)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            if meta.get("format") != FORMAT:
                raise CorruptCheckpoint(f"it has layout {meta.get('format')!r}, not {FORMAT}")
            groups = {g: [npz[k] for k in sorted((k for k in npz.files if k.startswith(g + ".")),
                                                 key=lambda k: int(k.rpartition(".")[2]))] for g in GROUPS}
    except CorruptCheckpoint:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise CorruptCheckpoint(f"it is not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    return TrainingState(epoch=int(meta["epoch"]), seed=int(meta["seed"]), history=meta["history"],
                         seconds=float(meta["seconds"]), stopper=meta["stopper"], model=groups["model"],
                         optimizer=groups["optimizer"],
                         best=groups["best"] if meta.get("has_best") else None)


def _values(variables) -> list[np.ndarray]:
    return [keras.ops.convert_to_numpy(v) for v in variables]


def _assign(variables, values: list[np.ndarray], what: str) -> None:
    variables = list(variables)
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [tuple(a.shape) for a in values]:
        raise CorruptCheckpoint(f"its {what} state does not fit this trial's model ({len(values)} arrays for "
                                f"{len(variables)} variables, or of other shapes)")
    for variable, value in zip(variables, values):
        variable.assign(value)


def restore(state: TrainingState, model: keras.Model, stopper: "ResumableEarlyStopping") -> None:
    """Put `state` into a freshly built and compiled model, its optimizer and early stopping.

    Augmentation draws (Keras' random layers in the tf.data map) are not part of it: a resumed
    epoch augments its images otherwise than the uninterrupted fit would have; all else is the same.
    """
    model.optimizer.build(model.trainable_variables)
    _assign(model.variables, state.model, "model")
    _assign(model.optimizer.variables, state.optimizer, "optimizer")
    if state.best is not None and [a.shape for a in state.best] != [tuple(w.shape) for w in model.weights]:
        raise CorruptCheckpoint("its best weights do not fit this trial's model")
    stopper.resume_from(state)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping that can start a fit where an earlier one left off (its best, wait and best weights)."""

    resumed: TrainingState | None = None

    def resume_from(self, state: TrainingState) -> None:
        self.resumed = state

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)  # resets everything
        if self.resumed is not None:
            self.best = self.resumed.stopper.get("best")
            self.best_epoch = int(self.resumed.stopper.get("best_epoch", 0))
            self.wait = int(self.resumed.stopper.get("wait", 0))
            self.best_weights = self.resumed.best

    def state(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {"best": best, "best_epoch": int(self.best_epoch), "wait": int(self.wait),
                "stopped": bool(self.stopped_epoch > 0)}


Publish = Callable[[Path, str, int], None]  # (file, its sha256, epochs finished): make it the trial's checkpoint


class Checkpointer(keras.callbacks.Callback):
    """Write the training state at the end of every epoch and hand the file to `publish`.

    Goes after EarlyStopping (whose state of this epoch it takes) and before the callbacks that
    report the epoch elsewhere (the pruner, MLflow): an epoch is reported only once it is saved,
    so a resumed trial never reports an epoch twice.
    """

    def __init__(self, publish: Publish, folder: Path, *, seed: int, stopper: ResumableEarlyStopping,
                 resumed: TrainingState | None = None):
        super().__init__()
        self.publish, self.folder, self.seed = publish, folder, seed
        self.stopper = stopper
        self.history = {k: list(v) for k, v in (resumed.history if resumed else {}).items()}
        self.seconds_before = resumed.seconds if resumed else 0.0
        self.started = time.perf_counter()

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        best = self.stopper.best_weights if self.stopper.restore_best_weights else None
        state = TrainingState(epoch=epoch + 1, seed=self.seed, history=self.history,
                              seconds=self.seconds_before + time.perf_counter() - self.started,
                              stopper=self.stopper.state(), model=_values(self.model.variables),
                              optimizer=_values(self.model.optimizer.variables),
                              best=None if best is None else [np.asarray(w) for w in best])
        path = self.folder / f"epoch-{epoch + 1:03d}.npz"
        sha = save(state, path)
        try:
            self.publish(path, sha, epoch + 1)
        finally:
            path.unlink(missing_ok=True)
