"""The ensemble exported as one Keras graph (.keras and SavedModel) gives the pyfunc's class scores."""

from __future__ import annotations

import json

import keras
import mlflow
import numpy as np
import pytest

from emnist_exp import data, ensemble, voting
from emnist_exp.tracking import models, queries
from conftest import TINY_ENSEMBLE_RUN

pytestmark = pytest.mark.slow  # the tiny study and its ensembles

FLOAT16_STEP = 2.0**-11  # float16's spacing just below 1: the pyfunc votes on float16 member outputs


def images_and_classes(dataset: str) -> tuple[np.ndarray, tuple[str, ...]]:
    splits = data.load_splits(dataset)
    return np.stack([x for x, _ in splits.test.as_numpy_iterator()]).astype(np.float32), splits.classes


def graph_and_pyfunc(run_id: str):
    folder = models.download_graph(run_id)
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{run_id}/{models.MODEL_NAME}").unwrap_python_model()
    return folder, pyfunc


def assert_same_scores(scores: np.ndarray, pyfunc, images: np.ndarray) -> None:
    """The graph's scores are the pyfunc's vote: to float16's step against the pyfunc (which votes on float16
    member outputs), and to float32 round-off against the same vote of the members' float32 outputs."""
    np.testing.assert_allclose(scores, pyfunc.class_scores(images), rtol=0, atol=FLOAT16_STEP)
    members = np.stack([member.predict(images, verbose=0) for member in pyfunc.members])
    exact = voting.combine(pyfunc.strategy, members, pyfunc.weights)
    np.testing.assert_allclose(scores, exact, rtol=0, atol=1e-5)
    top_two = np.sort(exact, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 1e-4  # exact near-ties may swap under float32 round-off
    np.testing.assert_array_equal(scores.argmax(axis=1)[clear], exact.argmax(axis=1)[clear])


def test_the_exported_graph_matches_the_pyfunc_to_float16(tiny_ensemble, tiny_study):
    import tensorflow as tf

    folder, pyfunc = graph_and_pyfunc(TINY_ENSEMBLE_RUN[tiny_ensemble])  # soft, so it has a graph
    images, classes = images_and_classes(tiny_study["dataset"])
    graph = keras.saving.load_model(folder / "ensemble.keras")
    assert graph.input_shape == (None, 28, 28, 1) and graph.output_shape == (None, len(classes))
    assert len([layer for layer in graph.layers if isinstance(layer, keras.Model)]) == 3  # the members inside
    assert_same_scores(graph.predict(images, verbose=0), pyfunc, images)
    saved = tf.saved_model.load(str(folder / "saved_model"))  # held: its variables go with the object
    assert_same_scores(saved.serve(tf.constant(images)).numpy(), pyfunc, images)
    assert tuple(json.loads((folder / "classes.json").read_text())) == classes


def test_a_weighted_vote_exports_its_weights(tiny_study):
    assert ensemble.main(["--top", "3", "--study", tiny_study["study"], "--strategy", "weighted",
                          "--no-register"]) == 0
    run = queries.study_runs(tiny_study["study"], "ensemble")[0]
    assert run.data.params["strategy"] == "weighted"
    folder, pyfunc = graph_and_pyfunc(run.info.run_id)
    images, _ = images_and_classes(tiny_study["dataset"])
    graph = keras.saving.load_model(folder / "ensemble.keras")
    weights = [layer.scale for layer in graph.layers if layer.name.startswith("weight_")]
    assert weights == pytest.approx(list(pyfunc.weights / pyfunc.weights.sum()))
    assert_same_scores(graph.predict(images, verbose=0), pyfunc, images)


def test_a_hard_vote_logs_no_graph(tiny_study):
    assert ensemble.main(["--top", "3", "--study", tiny_study["study"], "--strategy", "hard", "--no-register"]) == 0
    run = queries.study_runs(tiny_study["study"], "ensemble")[0]
    assert run.data.params["strategy"] == "hard"
    assert models.GRAPH not in {f.path for f in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
