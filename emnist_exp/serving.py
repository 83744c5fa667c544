"""The model contract: any model this project logs (a trial's or the ensemble) loaded one way; the ensemble pyfunc.

Every logged model answers two questions: class scores for a batch of 28x28 upright images
(n x classes), and its class names, stored as a list in the MLmodel metadata under "classes".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from emnist_exp import voting
from emnist_exp.errors import UserError

CLASSES_KEY = "classes"  # MLmodel metadata: the class names, label index -> name
BATCH = 512  # images per Keras predict call


def classes_metadata(classes: tuple[str, ...]) -> dict[str, list[str]]:
    """The metadata every logged model carries: its class names as a list (names may be several characters)."""
    return {CLASSES_KEY: list(classes)}


def classes_from_metadata(metadata: dict[str, Any] | None) -> tuple[str, ...] | None:
    """The class names from a model's metadata; a string is the one-character-per-class form of older models."""
    value = (metadata or {}).get(CLASSES_KEY)
    if value is None:
        return None
    return tuple(str(c) for c in (json.loads(value) if isinstance(value, str) and value.startswith("[") else value))


@dataclass(frozen=True)
class ProjectModel:
    """A logged model behind the contract: `class_scores(images)` (n x classes) and `classes`."""

    uri: str
    classes: tuple[str, ...]
    scores: Callable[[np.ndarray], np.ndarray]  # float32 pixels (n, 28, 28, 1), 0..255 -> (n, classes)

    def class_scores(self, images) -> np.ndarray:
        """Scores over every class for a batch of 28x28 images (uint8 0..255 or float 0..1), as float64."""
        try:
            pixels = to_pixels(images)
        except ValueError as exc:
            raise UserError(f"the model takes a batch of 28x28 images: {exc}.") from None
        out = np.asarray(self.scores(pixels), dtype=np.float64)
        if out.shape != (len(pixels), len(self.classes)):
            raise UserError(f"model {self.uri} gave scores of shape {out.shape} for {len(pixels)} images and "
                            f"{len(self.classes)} classes; it is not a model this project logged.")
        return out


def load_model(uri: str) -> ProjectModel:
    """Any model this project logged (runs:/<id>/model, models:/<name>/<version>, a path) behind one contract."""
    from mlflow.models import get_model_info  # noqa: PLC0415

    try:
        info = get_model_info(uri)
        classes = classes_from_metadata(info.metadata)
        if classes is None:
            raise UserError(f"model {uri} carries no class list, so it is not a model this project logged; "
                            "log it with `python -m emnist_exp.train` or `python -m emnist_exp.ensemble`.")
        if "keras" in info.flavors:
            net = mlflow.keras.load_model(uri)
            return ProjectModel(uri, classes, lambda x: net.predict(x, batch_size=BATCH, verbose=0))
        inner = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 (MlflowException, OSError, ...: all mean "no such model")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {uri}: {first}") from None
    if not isinstance(inner, EnsembleModel):
        raise UserError(f"model {uri} is a {type(inner).__name__}, not a trial's Keras model or the ensemble.")
    return ProjectModel(uri, classes, inner.vote)


PIXEL_CONTRACT = "numbers from 0 to 255 (or floats from 0 to 1)"  # what every logged model takes


def to_pixels(images) -> np.ndarray:
    """A batch of 28x28 images (uint8 0..255, or float 0..1) as float32 pixels, shape (n, 28, 28, 1).

    Anything else is a ValueError: booleans, text, NaN or infinity, and values outside 0..255 have
    no brightness, and a model would still answer them with confident classes.
    """
    x = np.asarray(images.to_numpy() if isinstance(images, pd.DataFrame) else images)
    if x.dtype == object:  # as MLflow's scoring server parses JSON under the ensemble's signature: each value as sent
        x = np.array(x.tolist())
    if x.dtype == np.bool_ or not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        kind = "booleans" if x.dtype == np.bool_ else f"values of type {x.dtype}"
        raise ValueError(f"pixels must be {PIXEL_CONTRACT}, got {kind}")
    if x.ndim == 2 and x.shape[-1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.ndim and x.shape[-1] != 1:
        x = x[..., None]
    if x.shape[1:] != (28, 28, 1):
        raise ValueError(f"expected a batch of 28x28 images, got shape {np.asarray(images).shape}")
    if x.size:
        if not np.isfinite(x).all():
            raise ValueError(f"pixels must be {PIXEL_CONTRACT}, got NaN or infinity")
        low, high = x.min(), x.max()
        if low < 0 or high > 255:
            raise ValueError(f"pixels must be {PIXEL_CONTRACT}, got values from {low:g} to {high:g}")
    floats = np.issubdtype(x.dtype, np.floating)
    x = x.astype(np.float32)
    if floats and x.size and x.max() <= 1.0:
        x = x * 255.0
    return x


class ContractError(MlflowException):
    """Input outside the model contract, as MLflow's scoring server answers it: HTTP 400 with our sentence.

    The server (mlflow.pyfunc.scoring_server.invocations, 3.17) answers any other exception with a
    generic message and its stack trace, and prefixes an MlflowException's message with the whole
    input ("Failed to predict data '<array>'"); this one keeps its own sentence.
    """

    def __init__(self, sentence: str):
        self._sentence = sentence
        super().__init__(sentence, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._sentence

    @message.setter
    def message(self, value: str) -> None:
        pass  # the sentence stays as it was made


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Members are MLflow Keras models (artifacts member_0..); the vote is in ensemble.json."""

    def load_context(self, context) -> None:
        with open(context.artifacts["ensemble"]) as f:
            spec = json.load(f)
        self.strategy = spec["strategy"]
        self.weights = None if spec["weights"] is None else np.asarray(spec["weights"])
        self.classes = tuple(spec["classes"])
        self.members = [mlflow.keras.load_model(context.artifacts[f"member_{i}"]) for i in range(spec["members"])]

    def member_probs(self, pixels: np.ndarray) -> np.ndarray:
        """Each member's probabilities for float32 pixels (n, 28, 28, 1), 0..255 (see to_pixels)."""
        # float16, like the predictions the trials logged, so served and logged votes agree exactly.
        return np.stack([m.predict(pixels, batch_size=BATCH, verbose=0).astype(np.float16) for m in self.members])

    def class_scores(self, images) -> np.ndarray:
        """The vote over every class, shape (n, classes), rows summing to 1: for a top-k beyond `predict`."""
        return self.vote(to_pixels(images))

    def vote(self, pixels: np.ndarray) -> np.ndarray:
        return voting.combine(self.strategy, self.member_probs(pixels), self.weights)

    def predict(self, context, model_input: np.ndarray, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """The `top_k` best classes of each image (params, default 1): one row per image and rank, best first."""
        top_k = (params or {}).get("top_k", 1)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= len(self.classes):
            raise ContractError(f"top_k must be a whole number between 1 and {len(self.classes)}, got {top_k!r}.")
        try:
            scores = self.class_scores(model_input)
        except ValueError as exc:  # bad input: the REST client gets our sentence, not a stack trace
            raise ContractError(f"{exc}.") from None
        return ranked_frame(scores, self.classes, int(top_k))


def ranked_frame(scores: np.ndarray, classes: tuple[str, ...], top_k: int) -> pd.DataFrame:
    """Rows (image, rank, class_index, character, probability): the top_k classes of each row of scores."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    n = len(scores)
    index = order.reshape(-1)
    return pd.DataFrame({
        "image": np.repeat(np.arange(n, dtype=np.int64), top_k),
        "rank": np.tile(np.arange(1, top_k + 1, dtype=np.int64), n),
        "class_index": index.astype(np.int64),
        "character": [classes[i] for i in index],
        "probability": np.take_along_axis(scores, order, axis=1).reshape(-1).astype(np.float64),
    })
