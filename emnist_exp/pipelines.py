"""What a model reads from a split: shuffled, batched, augmented training epochs and fixed-order evaluation batches."""

from __future__ import annotations

import functools
from typing import Callable

import tensorflow as tf

AUTOTUNE = tf.data.AUTOTUNE


def _one_hot(num_classes: int) -> Callable:
    return lambda images, labels: (images, tf.one_hot(labels, num_classes))


def _targets(num_classes: int) -> Callable:
    """One-hot labels; with a teacher's soft targets after the label (soft_targets.Teacher.paired), the two
    side by side, [one-hot | soft], as the one target tensor Keras gives the loss."""

    def targets(images, labels, *soft):
        hot = tf.one_hot(labels, num_classes)
        return images, tf.concat([hot, tf.cast(soft[0], tf.float32)], axis=-1) if soft else hot

    return targets


def training_pipeline(ds: tf.data.Dataset, *, num_classes: int, batch_size: int, seed: int,
                      shuffle_buffer: int, augment: Callable | None = None,
                      epochs: range = range(1)) -> tf.data.Dataset:
    """shuffle -> batch -> float -> augmentation (when on) -> one-hot -> prefetch, for each of `epochs`.

    Examples are (image, label), or (image, label, soft target) for a student (see _targets).

    Batches are whole (the remainder, a different few each epoch, waits for the next shuffle):
    with a dynamic batch size Keras' RandomElasticTransform (Keras 3.15) displaces pixels
    across images, pasting one example's strokes onto its neighbours' labels.

    Epoch e is shuffled with seed + e, so its order depends on the epoch and not on how many
    epochs this dataset object has served: a fit resumed at epoch 3 (epochs=range(2, n)) sees the
    orders the uninterrupted fit saw. Keras reads the epochs one after the other (steps_per_epoch).
    The epochs are concatenated in Python, each shuffle with a Python-int seed: a tensor seed (from
    Dataset.range(...).flat_map) makes tf.random's get_seed compare it as a Python bool when the
    global seed is 0, which fails inside a graph.
    """
    if not len(epochs):
        raise ValueError(f"training_pipeline needs at least one epoch, got {epochs}")
    per_epoch = [ds.shuffle(shuffle_buffer, seed=seed + e).batch(batch_size, drop_remainder=True) for e in epochs]
    out = functools.reduce(tf.data.Dataset.concatenate, per_epoch)
    out = out.map(lambda x, *y: (tf.cast(x, tf.float32), *y), num_parallel_calls=AUTOTUNE)
    if augment is not None:
        out = out.map(lambda x, *y: (augment(x, training=True), *y), num_parallel_calls=AUTOTUNE)
    return out.map(_targets(num_classes), num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)


def eval_pipeline(ds: tf.data.Dataset, *, batch_size: int, num_classes: int | None = None) -> tf.data.Dataset:
    """batch -> float (-> one-hot, for Keras validation) -> prefetch, in a fixed order."""
    ds = ds.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y), num_parallel_calls=AUTOTUNE)
    if num_classes is not None:
        ds = ds.map(_one_hot(num_classes), num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
