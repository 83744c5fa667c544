"""The member architectures (seed CNN, small ResNet, VGG-5), augmentation and optimiser. No tracking here."""

from __future__ import annotations

from typing import Callable

import keras
from keras import layers

from emnist_exp import precision
from emnist_exp.spec import TrialSpec

IMAGE_SHAPE = (28, 28, 1)
SEED_DECAY = 0.95  # the seed recipe: lr * 0.95^epoch


def build_model(spec: TrialSpec, num_classes: int, policy: str = "float32") -> keras.Model:
    """The member `spec.arch` names, `spec.width` wide, with a softmax over `num_classes`, in a Keras dtype policy.

    After Chris Deotte's https://www.kaggle.com/code/cdeotte/25-million-images-0-99757-mnist

    Input is raw pixels (0..255, upright, white on black) in float32; scaling is inside, so a saved
    model needs no preprocessing of its own. The softmax is float32 in every policy: scores and
    the loss keep float32's range (Keras' mixed-precision guide).
    """
    if spec.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {spec.arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    with precision.dtype_policy(policy):
        image = keras.Input(IMAGE_SHAPE, name="image")
        features = ARCHITECTURES[spec.arch](layers.Rescaling(1.0 / 255)(image), spec)
        probs = layers.Dense(num_classes, activation="softmax", name="probs", dtype="float32")(
            layers.Dropout(spec.dropout)(features))
        return keras.Model(image, probs, name=f"emnist_{spec.arch}")


def _conv(x, filters: int, kernel: int, spec: TrialSpec, strides: int = 1, padding: str = "valid"):
    """Conv, ReLU, then batch-norm when the spec has it (the seed's order)."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, activation="relu")(x)
    return layers.BatchNormalization()(x) if spec.batch_norm else x


def seed_cnn(x, spec: TrialSpec):
    """The Kaggle EMNIST/MNIST CNN: 32-32-32/s2, 64-64-64/s2, 128 (at width 32), dropout, BN.

    ~332k parameters at width 32 for 47 classes.
    """
    w = spec.width
    for filters in (w, 2 * w):
        x = _conv(x, filters, 3, spec)
        x = _conv(x, filters, 3, spec)
        x = _conv(x, filters, 5, spec, strides=2, padding="same")
        x = layers.Dropout(spec.dropout)(x)
    return layers.Flatten()(_conv(x, 4 * w, 4, spec))


def _residual(x, filters: int, strides: int, spec: TrialSpec):
    """A basic pre-sum block: two 3x3 convs, a 1x1 projection when the shape changes."""
    y = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=not spec.batch_norm)(x)
    y = layers.BatchNormalization()(y) if spec.batch_norm else y
    y = layers.Conv2D(filters, 3, padding="same", use_bias=not spec.batch_norm)(layers.ReLU()(y))
    y = layers.BatchNormalization()(y) if spec.batch_norm else y
    if strides != 1 or x.shape[-1] != filters:
        x = layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x)
    return layers.ReLU()(layers.Add()([x, y]))


def small_resnet(x, spec: TrialSpec):
    """A 3x3 stem and three residual stages of w, 2w, 4w filters (28, 14, 7 px), global average pool.

    ~314k parameters at width 32: the architecture that was the best single member at equal epochs.
    """
    w = spec.width
    x = _conv(x, w, 3, spec, padding="same")
    for filters, strides in ((w, 1), (2 * w, 2), (4 * w, 2)):
        x = _residual(x, filters, strides, spec)
    return layers.GlobalAveragePooling2D()(x)


def vgg5(x, spec: TrialSpec):
    """VGG-style, five 3x3 convs: w-w, pool, 2w-2w, pool, 4w, global average pool, a 4w dense layer.

    The head of the published VGG-5 EMNIST models (Spinal FC) is replaced by one dense layer.
    """
    w = spec.width
    for filters in (w, 2 * w):
        x = _conv(x, filters, 3, spec, padding="same")
        x = _conv(x, filters, 3, spec, padding="same")
        x = layers.Dropout(spec.dropout / 2)(layers.MaxPooling2D()(x))
    x = layers.GlobalAveragePooling2D()(_conv(x, 4 * w, 3, spec, padding="same"))
    return layers.Dense(4 * w, activation="relu")(x)


ARCHITECTURES: dict[str, Callable] = {"cnn": seed_cnn, "resnet": small_resnet, "vgg5": vgg5}


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
    if spec.stroke > 0:
        stack.append(RandomStroke(spec.stroke, seed=seed + 4))
    return keras.Sequential(stack, name="augment") if stack else None


class RandomStroke(layers.Layer):
    """A random pen width: each image moved toward its 3x3 grey dilation (broader strokes) or its
    erosion (finer ones), by a fraction drawn uniformly from [-amount, amount].

    Users' pens are broader or finer than NIST's for the size of their characters, and a dilated
    pen closes small holes that no conversion can open again (benchmarks/own_images.py), so the
    members learn to read either. At 28 px a full step is a pixel on each side of every stroke.
    """

    def __init__(self, amount: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.amount, self.seed = float(amount), seed

    def call(self, images, training=True):
        import tensorflow as tf  # noqa: PLC0415 (the tf.data map runs TensorFlow ops whatever the backend)

        if not training:
            return images
        broader = tf.nn.max_pool2d(images, 3, 1, "SAME")
        finer = -tf.nn.max_pool2d(-images, 3, 1, "SAME")
        # a stateful op seed: a new draw every batch, the same sequence for the same Keras seed
        step = tf.random.uniform(tf.stack([tf.shape(images)[0], 1, 1, 1]), -self.amount, self.amount, seed=self.seed)
        out = images + tf.maximum(step, 0.0) * (broader - images) + tf.maximum(-step, 0.0) * (finer - images)
        # erosion dims a thin stroke: stretched back to the image's own peak, as EMNIST's are to 255
        peak = lambda x: tf.reduce_max(x, axis=[1, 2, 3], keepdims=True)  # noqa: E731
        return out * tf.math.divide_no_nan(peak(images), peak(out))

    def get_config(self) -> dict:
        return {**super().get_config(), "amount": self.amount, "seed": self.seed}


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


def compile_model(model: keras.Model, spec: TrialSpec, steps_per_epoch: int, epochs: int,
                  loss: keras.losses.Loss | None = None, accuracy: keras.metrics.Metric | str = "accuracy"
                  ) -> keras.Model:
    """Adam and cross-entropy (or `loss`, e.g. a student's distillation loss, with its `accuracy`); under
    mixed_float16 Keras wraps the optimiser in a LossScaleOptimizer itself.

    XLA is off: Keras' "auto" would turn it on wherever a GPU is visible, and it has not been shown
    to pay on CPU (benchmarks/precision.py times it) nor measured on a GPU.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate(spec, steps_per_epoch, epochs)),
        loss=loss or keras.losses.CategoricalCrossentropy(label_smoothing=spec.label_smoothing),
        metrics=[accuracy],
        jit_compile=False,
    )
    return model


def ensemble_graph(members: list[keras.Model], weights) -> keras.Model:
    """The soft (weighted) vote of `members` as one Keras model: the members' input in, class scores out.

    Built from Keras' own layers only (Rescaling by each weight, then Add), so the saved `.keras`
    file loads without this package. Weights are normalised to sum to 1, as in voting.soft_vote.
    """
    weights = [float(w) for w in weights]
    if len(weights) != len(members) or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError("one non-negative weight per member is needed, and not all zero")
    image = keras.Input(IMAGE_SHAPE, name="image")
    # Each member becomes a model of its own name: members trained alike share a name, and a
    # model's layers must not.
    scaled = [layers.Rescaling(w / sum(weights), name=f"weight_{i}")(
        keras.Model(m.inputs, m.output, name=f"member_{i}")(image)) for i, (m, w) in enumerate(zip(members, weights))]
    scores = layers.Add(name="vote")(scaled) if len(scaled) > 1 else layers.Identity(name="vote")(scaled[0])
    return keras.Model(image, scores, name="emnist_ensemble")
