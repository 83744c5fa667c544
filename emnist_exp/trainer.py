"""Train one TrialSpec on the splits and predict val/test. Keras only: no Optuna, no MLflow."""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from emnist_exp import checkpoint, data, model as models, pipelines, precision, soft_targets
from emnist_exp.spec import TrialSpec
from emnist_exp.voting import accuracy

EVAL_BATCH = 512


@dataclass
class TrainResult:
    model: keras.Model
    history: dict[str, list[float]]
    seconds: float
    val_probs: np.ndarray
    val_labels: np.ndarray
    test_probs: np.ndarray | None = None
    test_labels: np.ndarray | None = None
    diverged: bool = False

    @property
    def epochs_run(self) -> int:
        return len(self.history.get("loss", []))

    @property
    def best_epoch(self) -> int:
        """The epoch (from 0) whose weights the model holds: EarlyStopping restores the first best val_accuracy."""
        values = self.history.get("val_accuracy", [])
        return int(np.argmax(values)) if values else max(0, self.epochs_run - 1)

    @property
    def val_accuracy(self) -> float:
        return accuracy(self.val_probs, self.val_labels)

    @property
    def test_accuracy(self) -> float | None:
        return None if self.test_probs is None else accuracy(self.test_probs, self.test_labels)


def predict(model: keras.Model, ds) -> np.ndarray:
    """Class probabilities for an unbatched split, in order."""
    return model.predict(pipelines.eval_pipeline(ds, batch_size=EVAL_BATCH), verbose=0)


class EpochLine(keras.callbacks.Callback):
    """One console line per epoch; Keras' verbose=2 spends two on it (an "Epoch i/n" header, then the numbers)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        numbers = " - ".join(f"{name}: {float(value):.4g}" for name, value in (logs or {}).items())
        print(f"epoch {epoch + 1}/{self.epochs} - {time.perf_counter() - self.started:.0f}s - {numbers}", flush=True)


def train_spec(spec: TrialSpec, splits: data.Splits, *, epochs: int, patience: int, seed: int,
               shuffle_buffer: int, callbacks: list | None = None, verbose: int = 2,
               policy: str = "float32", resume: checkpoint.TrainingState | None = None,
               publish: checkpoint.Publish | None = None, teacher: soft_targets.Teacher | None = None
               ) -> TrainResult:
    """Fit in a Keras dtype policy with early stopping on validation accuracy (best weights kept),
    then predict val and test with the float32 model that leaves the trial.

    `resume`: a checkpoint of this spec's fit, which goes on from its next epoch. `publish`: given
    the checkpoint file of every epoch (see checkpoint.Checkpointer); without it none is written.
    `teacher`: soft targets over splits.train, which make this fit a student's (soft_targets.Teacher);
    its model leaves compiled with the plain loss, so that it loads with Keras alone.
    """
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    num_classes = len(splits.classes)
    net = models.build_model(spec, num_classes, policy)
    batch_size = min(spec.batch_size, splits.counts["train"])  # whole batches only (see training_pipeline)
    steps = splits.counts["train"] // batch_size
    if teacher is None:
        models.compile_model(net, spec, steps, epochs)
    else:
        models.compile_model(net, spec, steps, epochs, loss=teacher.loss(num_classes, spec.label_smoothing),
                             accuracy=soft_targets.label_accuracy(num_classes))
    augmenter = models.build_augmenter(spec, seed)
    # mode="max": Keras infers it from the metric's name, which a student's own accuracy metric does not give
    stop = checkpoint.ResumableEarlyStopping("val_accuracy", patience=patience, mode="max",
                                             restore_best_weights=True)
    first = 0
    if resume is not None:
        checkpoint.restore(resume, net, stop)
        first = resume.epoch
    # A student's augmented image keeps the soft target of the image as stored: the teacher saw
    # each train image once, un-augmented, and the label term still matches the augmented one.
    train_ds = pipelines.training_pipeline(
        splits.train if teacher is None else teacher.paired(splits.train), num_classes=num_classes,
        batch_size=batch_size, seed=seed, shuffle_buffer=shuffle_buffer, augment=augmenter, epochs=range(first, epochs),
    )
    val_ds = pipelines.eval_pipeline(splits.val, batch_size=EVAL_BATCH, num_classes=num_classes)
    nan = keras.callbacks.TerminateOnNaN()
    started = time.perf_counter()
    lines = [EpochLine(epochs)] if verbose == 2 else []
    history = {k: list(v) for k, v in (resume.history if resume else {}).items()}
    with tempfile.TemporaryDirectory(prefix="emnist-checkpoint-") as folder:
        saving = [checkpoint.Checkpointer(publish, Path(folder), seed=seed, stopper=stop, resumed=resume)] if publish else []
        if first < epochs and not (resume and resume.stopped):
            fit = net.fit(train_ds, validation_data=val_ds, epochs=epochs, initial_epoch=first, steps_per_epoch=steps,
                          verbose=0 if lines else verbose,
                          callbacks=[*models.schedule_callbacks(spec), nan, stop, *saving, *(callbacks or []), *lines])
            for key, values in fit.history.items():
                history.setdefault(key, []).extend(float(v) for v in values)
        elif resume.best is not None:  # stopped after its last epoch: keep its best epoch, as EarlyStopping would
            net.set_weights(resume.best)
    seconds = (resume.seconds if resume else 0.0) + time.perf_counter() - started
    diverged = any(not math.isfinite(v) for v in history.get("loss", []))
    net = precision.float32_copy(net, lambda: models.build_model(spec, num_classes))
    if teacher is not None:
        models.compile_model(net, spec, steps, epochs)
        net.optimizer.build(net.trainable_variables)  # saved with its slots, as a trial's: no warning on load
    result = TrainResult(net, history, seconds, val_probs=np.zeros((0, num_classes)),
                         val_labels=splits.val_labels, diverged=diverged)
    if diverged:
        return result
    result.val_probs = predict(net, splits.val)
    if splits.test is not None:
        result.test_probs = predict(net, splits.test)
        result.test_labels = splits.test_labels
    return result
