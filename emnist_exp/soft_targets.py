"""A teacher's soft targets beside the labels, and the distillation loss on them. Keras and tf.data only.

The targets travel through pipelines.training_pipeline next to each image, so they are shuffled and
batched with it; each batch's target is [one-hot label | teacher probabilities], 2 x classes wide.
Validation batches carry the one-hot label alone, and the same loss and metric read either.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

FLOOR = 1e-7  # float16 targets round probabilities below ~6e-8 to 0, whose log has no temperature

# Half the loss on the labels: on the real sample's protocol ensemble, alpha 0.5 selected a better
# student on validation than 0.9 (0.9065 against 0.9018; BENCHMARKS.md "Distillation"), and on a
# smaller teacher 0.5 beat 0.9 by 5.6 points. Ensembles of members that fail on the same images teach
# little beyond the label.
DEFAULT_ALPHA = 0.5


@dataclass(frozen=True)
class Teacher:
    """Soft targets for the train split, in its order (n x classes probabilities), and how to weigh them.

    loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels, student), where x_T is
    softmax(log x / T) (Hinton et al. 2015, https://arxiv.org/abs/1503.02531: T^2 keeps the soft
    term's gradients the size of the hard term's whatever T is).
    """

    targets: np.ndarray
    temperature: float = 4.0
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")

    def paired(self, train: tf.data.Dataset) -> tf.data.Dataset:
        """(image, label, soft target) for every example: the train split must be read in the order the
        targets were computed in, which load_splits' readers keep (ordered builders, fixed seeds)."""
        return tf.data.Dataset.zip(train, tf.data.Dataset.from_tensor_slices(self.targets)).map(
            lambda pair, soft: (*pair, soft))

    def loss(self, num_classes: int, label_smoothing: float = 0.0) -> DistillationLoss:
        return DistillationLoss(num_classes, self.temperature, self.alpha, label_smoothing)


def tempered(probs: tf.Tensor, temperature: float) -> tf.Tensor:
    """softmax(log p / T): the distribution of logits log p divided by T (p a softmax's output)."""
    return tf.nn.softmax(tf.math.log(tf.maximum(probs, FLOOR)) / temperature, axis=-1)


class DistillationLoss(keras.losses.Loss):
    """Teacher's KL plus label cross-entropy on [one-hot | soft] targets; plain cross-entropy on one-hot ones.

    The width of y_true is known when Keras traces a step, so the train step takes the first branch
    and the validation step the second: val_loss is the student's cross-entropy, as a trial's is.
    """

    def __init__(self, num_classes: int, temperature: float, alpha: float, label_smoothing: float = 0.0,
                 name: str = "distillation", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes, self.temperature, self.alpha = num_classes, temperature, alpha
        self.label_smoothing = label_smoothing
        self.cross_entropy = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing, reduction=None)

    def call(self, y_true, y_pred):
        hard = y_true[..., :self.num_classes]
        ce = self.cross_entropy(hard, y_pred)
        if y_true.shape[-1] == self.num_classes:
            return ce
        teacher = tempered(y_true[..., self.num_classes:], self.temperature)
        student = tempered(y_pred, self.temperature)
        kl = tf.reduce_sum(teacher * (tf.math.log(tf.maximum(teacher, FLOOR)) - tf.math.log(student)), axis=-1)
        return self.alpha * self.temperature**2 * kl + (1.0 - self.alpha) * ce

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes, "temperature": self.temperature,
                "alpha": self.alpha, "label_smoothing": self.label_smoothing}


def label_accuracy(num_classes: int) -> keras.metrics.Metric:
    """Accuracy against the one-hot half of the targets, named `accuracy` so that EarlyStopping and the
    learning curve read val_accuracy as for any trial."""

    def hits(y_true, y_pred):
        return keras.metrics.categorical_accuracy(y_true[..., :num_classes], y_pred)

    return keras.metrics.MeanMetricWrapper(hits, name="accuracy")
