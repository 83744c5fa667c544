"""The seed CNN and its variants, their augmentation stack and optimiser. No tracking here."""

from __future__ import annotations

import keras
from keras import layers

from emnist_exp.spec import TrialSpec

IMAGE_SHAPE = (28, 28, 1)
SEED_DECAY = 0.95  # the seed recipe: lr * 0.95^epoch


def build_model(spec: TrialSpec, num_classes: int) -> keras.Model:
    """The Kaggle EMNIST/MNIST CNN: 32-32-32/s2, 64-64-64/s2, 128, dropout, BN, softmax.

    After Chris Deotte's https://www.kaggle.com/code/cdeotte/25-million-images-0-99757-mnist

    Input is raw pixels (0..255, upright, white on black); scaling is inside, so a saved
    model needs no preprocessing of its own.
    """
    w, bn = spec.width, spec.batch_norm

    def conv(filters: int, kernel: int, strides: int = 1) -> list[layers.Layer]:
        padding = "same" if strides > 1 else "valid"
        block = [layers.Conv2D(filters, kernel, strides=strides, padding=padding, activation="relu")]
        return block + ([layers.BatchNormalization()] if bn else [])

    stack = [keras.Input(IMAGE_SHAPE, name="image"), layers.Rescaling(1.0 / 255)]
    stack += conv(w, 3) + conv(w, 3) + conv(w, 5, strides=2) + [layers.Dropout(spec.dropout)]
    stack += conv(2 * w, 3) + conv(2 * w, 3) + conv(2 * w, 5, strides=2) + [layers.Dropout(spec.dropout)]
    stack += conv(4 * w, 4) + [layers.Flatten(), layers.Dropout(spec.dropout)]
    stack += [layers.Dense(num_classes, activation="softmax", name="probs")]
    return keras.Sequential(stack, name="emnist_cnn")


def build_augmenter(spec: TrialSpec, seed: int) -> keras.Sequential | None:
    """Random geometry for training batches, applied in the tf.data map (CPU, asynchronous).

    Empty space is filled with 0 (the black background) rather than reflected strokes.
    """
    if not spec.augment:
        return None
    fill = {"fill_mode": "constant", "fill_value": 0.0}
    stack: list[layers.Layer] = []
    if spec.rotation > 0:
        stack.append(layers.RandomRotation(spec.rotation / 360.0, seed=seed, **fill))
    if spec.shift > 0:
        stack.append(layers.RandomTranslation(spec.shift, spec.shift, seed=seed + 1, **fill))
    if spec.zoom > 0:
        stack.append(layers.RandomZoom(spec.zoom, seed=seed + 2, **fill))
    if spec.elastic > 0:
        stack.append(layers.RandomElasticTransform(factor=1.0, scale=spec.elastic, seed=seed + 3, **fill))
    return keras.Sequential(stack, name="augment") if stack else None


def learning_rate(spec: TrialSpec, steps_per_epoch: int, epochs: int):
    """A float (exp: decayed per epoch by a callback) or a per-step schedule."""
    total = max(1, steps_per_epoch * epochs)
    if spec.schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(spec.learning_rate, total, alpha=0.01)
    if spec.schedule == "onecycle":
        # Warm up over 30% of the steps from lr/25, then cosine down (Smith & Topin 2017).
        warm = max(1, int(0.3 * total))
        return keras.optimizers.schedules.CosineDecay(
            spec.learning_rate / 25, total - warm, alpha=0.004, warmup_target=spec.learning_rate, warmup_steps=warm
        )
    return spec.learning_rate


def schedule_callbacks(spec: TrialSpec) -> list[keras.callbacks.Callback]:
    if spec.schedule == "exp":
        base = spec.learning_rate
        return [keras.callbacks.LearningRateScheduler(lambda epoch: base * SEED_DECAY**epoch)]
    return []


def compile_model(model: keras.Model, spec: TrialSpec, steps_per_epoch: int, epochs: int) -> keras.Model:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(spec, steps_per_epoch, epochs)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing),
        metrics=["accuracy"],
    )
    return model
