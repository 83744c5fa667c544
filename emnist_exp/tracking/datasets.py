"""A study's splits as MLflow datasets: metadata and counts only, logged as each run's inputs."""

from __future__ import annotations

import json
from typing import Any

import mlflow
import numpy as np
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.types import Schema, TensorSpec

IMAGES_SCHEMA = Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28, 1), "image"),
                        TensorSpec(np.dtype(np.int64), (-1,), "label")])


class SplitDataset(MetaDataset):
    """One split as an MLflow dataset: metadata only (the examples stay where they are), counts as its profile."""

    def __init__(self, spec: str, record, num_classes: int):
        self.record = record
        self.num_classes = num_classes
        super().__init__(LocalArtifactDatasetSource(record.location), name=spec, digest=record.digest,
                         schema=IMAGES_SCHEMA)

    @property
    def profile(self) -> dict[str, Any]:
        return {"num_rows": self.record.count, "num_classes": self.num_classes, "slice": self.record.slice}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def split_datasets(spec: str, records: list, num_classes: int) -> dict[str, SplitDataset]:
    """data.split_records as MLflow datasets, keyed by context (training, validation, test)."""
    return {r.context: SplitDataset(spec, r, num_classes) for r in records}


def log_datasets(datasets: dict[str, SplitDataset]) -> None:
    """The active run's inputs: the UI's Dataset column, with each split's context."""
    for context, dataset in datasets.items():
        mlflow.log_input(dataset, context=context)
