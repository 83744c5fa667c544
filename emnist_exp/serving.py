"""The ensemble as an MLflow pyfunc model: 28x28 upright images in; class, character, probability out."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pandas as pd

from emnist_exp import voting


def to_pixels(images) -> np.ndarray:
    """A batch of 28x28 images (uint8 0..255, or float 0..1) as float32 pixels, shape (n, 28, 28, 1)."""
    x = np.asarray(images.to_numpy() if isinstance(images, pd.DataFrame) else images)
    if x.ndim == 2 and x.shape[-1] == 784:
        x = x.reshape(-1, 28, 28)
    if x.shape[-1] != 1:
        x = x[..., None]
    if x.shape[1:] != (28, 28, 1):
        raise ValueError(f"expected a batch of 28x28 images, got shape {np.asarray(images).shape}")
    x = x.astype(np.float32)
    if not np.issubdtype(np.asarray(images).dtype, np.integer) and x.size and x.max() <= 1.0:
        x = x * 255.0
    return x


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """Members are MLflow Keras models (artifacts member_0..); the vote is in ensemble.json."""

    def load_context(self, context) -> None:
        with open(context.artifacts["ensemble"]) as f:
            spec = json.load(f)
        self.strategy = spec["strategy"]
        self.weights = None if spec["weights"] is None else np.asarray(spec["weights"])
        self.classes = tuple(spec["classes"])
        self.members = [mlflow.keras.load_model(context.artifacts[f"member_{i}"]) for i in range(spec["members"])]

    def member_probs(self, images) -> np.ndarray:
        x = to_pixels(images)
        # float16, like the predictions the trials logged, so served and logged votes agree exactly.
        return np.stack([m.predict(x, batch_size=512, verbose=0).astype(np.float16) for m in self.members])

    @staticmethod
    def example_output(classes: tuple[str, ...]) -> pd.DataFrame:
        return pd.DataFrame({"class_index": np.zeros(2, np.int64), "character": [classes[0]] * 2,
                             "probability": np.ones(2)})

    def class_scores(self, images) -> np.ndarray:
        """The vote over every class, shape (n, classes), rows summing to 1: for a top-k beyond `predict`."""
        return voting.combine(self.strategy, self.member_probs(images), self.weights)

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        try:
            scores = self.class_scores(model_input)
        except ValueError as exc:  # bad input: the REST client gets our sentence, not a stack trace
            from mlflow.exceptions import MlflowException  # noqa: PLC0415
            from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE  # noqa: PLC0415

            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        index = scores.argmax(axis=1)
        return pd.DataFrame({
            "class_index": index.astype(np.int64),
            "character": [self.classes[i] for i in index],
            "probability": scores[np.arange(len(index)), index].astype(np.float64),
        })
