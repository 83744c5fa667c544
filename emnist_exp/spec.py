"""TrialSpec: one member (architecture and width) and how to train it, as plain data (no Optuna, no Keras)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True)
class TrialSpec:
    """One member and how to train it. Defaults are the Kaggle EMNIST/MNIST recipe.

    The recipe: https://www.kaggle.com/code/cdeotte/25-million-images-0-99757-mnist
    """

    # architecture: cnn (the Kaggle CNN), resnet or vgg5 (emnist_exp.model.ARCHITECTURES), each
    # with stages of 1x, 2x and 4x `width` filters
    arch: str = "cnn"
    width: int = 32
    dropout: float = 0.4
    batch_norm: bool = True
    # augmentation (training only; never flips: they turn characters into other characters)
    augment: bool = False
    rotation: float = 0.0  # degrees, both ways
    shift: float = 0.0  # fraction of the image, both axes
    zoom: float = 0.0  # fraction, in and out
    elastic: float = 0.0  # keras RandomElasticTransform scale; 0 = off
    stroke: float = 0.0  # pen width: each image moved toward its 3x3 grey dilation or erosion by up to this; 0 = off
    # optimisation
    learning_rate: float = 1e-3
    schedule: str = "exp"  # exp: lr*0.95^epoch (the Kaggle recipe); cosine; onecycle
    batch_size: int = 32
    label_smoothing: float = 0.0

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_run_params(cls, params: dict[str, str]) -> TrialSpec:
        """The spec a trial run logged (params(); MLflow keeps each value as a string) with its types back."""
        kinds = {"bool": lambda text: text == "True", "int": int, "float": float, "str": str}
        return cls(**{f.name: kinds[f.type](params[f.name]) for f in dataclasses.fields(cls) if f.name in params})

    def short_name(self) -> str:
        """What a run list should show at a glance: `vgg5-32 noaug bn drop0.3`."""
        augment = "aug" if self.augment else "noaug"
        batch_norm = "bn" if self.batch_norm else "nobn"
        return f"{self.arch}-{self.width} {augment} {batch_norm} drop{self.dropout:.2g}"
