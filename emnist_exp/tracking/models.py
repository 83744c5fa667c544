"""Logged models: a trial's Keras LoggedModel, the ensemble's voting pyfunc and exported graph, the registry."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

from emnist_exp import serving
from emnist_exp.tracking.launcher import start_entry_run
from emnist_exp.tracking.results import log_figure
from emnist_exp.tracking.tags import ROLE_TAG, STUDY_TAG, quoted

MODEL_NAME = "model"


def _pip_requirements() -> list[str]:
    import tensorflow as tf  # noqa: PLC0415

    # Named explicitly: MLflow's own inference loads the model in a subprocess, slow on 2 cores.
    return [f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"numpy=={np.__version__}"]


def log_keras_model(model: keras.Model, classes: tuple[str, ...], example: np.ndarray, step: int = 0) -> str:
    """The model as an MLflow LoggedModel (raw-pixel input, signature, class list); returns its model id.

    `step` is the epoch whose weights the model holds: MLflow links the run's metrics logged at
    that step (the epoch_* ones) to the LoggedModel, so its page shows that epoch's numbers.
    """
    example = example.astype(np.float32)
    signature = infer_signature(example, model.predict(example, verbose=0))
    # No input_example: mlflow 3.17's keras log_model writes it before it creates the model folder
    # and fails (mlflow#16183). The signature alone still makes a LoggedModel.
    info = mlflow.keras.log_model(model, name=MODEL_NAME, signature=signature, pip_requirements=_pip_requirements(),
                                  metadata=serving.classes_metadata(classes), step=step)
    return info.model_id


def download_model(run_id: str) -> str:
    return mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=MODEL_NAME)


def load_keras_model(run_id: str) -> keras.Model:
    """A trial's Keras model itself, to build the ensemble graph from; scoring goes through serving.load_model."""
    return mlflow.keras.load_model(model_uri(run_id))


def model_uri(run_id: str) -> str:
    """The URI of a trial run's logged model, for serving.load_model."""
    return f"runs:/{run_id}/{MODEL_NAME}"


ENSEMBLE_MODEL = "emnist-ensemble"
# One input tensor of any shape: the vote checks shape and pixel values itself (serving.to_pixels), so that
# out-of-contract input gets its sentence. A typed TensorSpec would pin one dtype (uint8 or float) and let
# MLflow's own check answer first, echoing the whole input in its error; MLflow's JSON parser keeps each
# value as it came under dtype object, booleans and NaN included, for to_pixels to judge.
ENSEMBLE_INPUTS = Schema([TensorSpec(np.dtype(object), (-1,))])
ENSEMBLE_OUTPUTS = Schema([ColSpec("long", "image"), ColSpec("long", "rank"), ColSpec("long", "class_index"),
                           ColSpec("string", "character"), ColSpec("double", "probability")])  # serving.ranked_frame


def log_ensemble(*, experiment_id: str, study: str | None, strategy: str, members: list[str],
                 weights: np.ndarray | None, classes: tuple[str, ...], metrics: dict[str, float],
                 tables: dict[str, str], figures: dict[str, Any], register: bool = True,
                 graph: keras.Model | None = None) -> tuple[str, str | None]:
    """The ensemble run: members, weights, metrics, tables, plots, the voting pyfunc model, and
    `graph` (the vote as one Keras model) as graph/ensemble.keras and a SavedModel in graph/saved_model.

    Returns the run id and the registered version (None when not registered).
    """
    package = str(Path(__file__).resolve().parent.parent)  # emnist_exp/, which the pyfunc carries as code
    tags = {ROLE_TAG: "ensemble", "ensemble.strategy": strategy, "ensemble.members": ",".join(members)}
    if study:
        tags[STUDY_TAG] = study
    name = f"ensemble-{study or 'runs'} {strategy} x{len(members)}"
    with start_entry_run(run_name=name, tags=tags, experiment_id=experiment_id) as run:
        mlflow.log_params({"strategy": strategy, "n_members": len(members), "members": ",".join(members)})
        mlflow.log_dict({"members": members, "weights": None if weights is None else weights.tolist(),
                         "strategy": strategy}, "ensemble.json")
        for path, text in tables.items():
            mlflow.log_text(text, path)
        for path, fig in figures.items():
            log_figure(fig, path)
        if graph is not None:
            log_graph(graph, classes)
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = Path(tmp) / "ensemble.json"
            spec_path.write_text(json.dumps({"strategy": strategy, "members": len(members), "classes": list(classes),
                                             "weights": None if weights is None else weights.tolist()}))
            artifacts = {"ensemble": str(spec_path)}
            artifacts.update({f"member_{i}": download_model(r) for i, r in enumerate(members)})
            params = ParamSchema([ParamSpec("top_k", "long", 1)])  # REST clients ask for a top-k this way
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME, python_model=str(Path(package) / "ensemble_model.py"), artifacts=artifacts,
                code_paths=[package], signature=ModelSignature(inputs=ENSEMBLE_INPUTS, outputs=ENSEMBLE_OUTPUTS, params=params),
                input_example=np.zeros((2, 28, 28), np.uint8),
                pip_requirements=_pip_requirements() + [f"mlflow=={mlflow.__version__}", "pandas", "scipy"],
                metadata=serving.classes_metadata(classes),
                registered_model_name=ENSEMBLE_MODEL if register else None,
            )
        # After the model, so that the ensemble's LoggedModel carries its accuracies.
        mlflow.log_metrics(metrics, model_id=info.model_id)
        version = getattr(info, "registered_model_version", None)
        return run.info.run_id, None if version is None else str(version)


GRAPH = "graph"


def log_graph(graph: keras.Model, classes: tuple[str, ...], filename: str = "ensemble.keras") -> None:
    """One graph (the ensemble's vote, or a student) for TF Serving and TFLite: .keras, SavedModel, class list."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / GRAPH
        folder.mkdir()
        graph.save(folder / filename)
        graph.export(str(folder / "saved_model"), verbose=False)
        (folder / "classes.json").write_text(json.dumps(list(classes)))
        mlflow.log_artifacts(str(folder), GRAPH)


def download_graph(run_id: str) -> Path:
    """A run's graph folder: ensemble.keras (student.keras for a student), saved_model/, classes.json."""
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=GRAPH))


def latest_version(name: str) -> str | None:
    """The highest version of a registered model, or None when it has none."""
    versions = mlflow.MlflowClient().search_model_versions(f"name = {quoted(name)}")
    return str(max(int(v.version) for v in versions)) if versions else None


def register(model_id: str, name: str) -> str:
    """A LoggedModel registered as a new version of `name`; returns the version."""
    return str(mlflow.register_model(f"models:/{model_id}", name).version)
