"""One model contract: any logged model loads through serving.load_model, scores 28x28 images, names its classes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from emnist_exp import serving
from emnist_exp.errors import UserError
from idxfiles import write_idx_folder

LETTERS = ("Aa", "Bb", "Dd", "Ee")  # emnist-letters style: a name of two characters, labels from 1


def strokes(label: int, n: int, rng) -> np.ndarray:
    """n upright 28x28 images of class `label` (1..4): a bar whose place and direction tell the class."""
    images = rng.integers(0, 40, (n, 28, 28), dtype=np.uint8)
    offset = rng.integers(-2, 3, n)
    for i, shift in enumerate(offset):
        at = 8 + 12 * ((label - 1) % 2) + shift
        if label <= 2:
            images[i, 4:24, at - 2 : at + 2] = 255  # vertical, left or right
        else:
            images[i, at - 2 : at + 2, 4:24] = 255  # horizontal, top or bottom
    return images


def letters_folder(folder):
    rng = np.random.default_rng(3)
    splits = {}
    for split, per_class in (("train", 60), ("test", 10)):
        labels = np.repeat(np.arange(1, len(LETTERS) + 1), per_class)
        order = rng.permutation(len(labels))
        images = np.concatenate([strokes(k, per_class, rng) for k in range(1, len(LETTERS) + 1)])
        splits[split] = (images[order], labels[order])
    return write_idx_folder(folder, name="letters", splits=splits, classes=LETTERS, first_label=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3-class Keras model saved once as an MLflow model; `saved(metadata)` is a copy with that metadata."""
    import shutil

    import keras
    import mlflow
    import yaml

    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(inputs))
    root = tmp_path_factory.mktemp("models")
    # Requirements named: inferring them loads the model again in a subprocess, a minute on busy cores.
    mlflow.keras.save_model(keras.Model(inputs, outputs), str(root / "base"), pip_requirements=["keras"])

    def copy(metadata: dict | None):
        path = root / f"m{len(list(root.iterdir()))}"
        shutil.copytree(root / "base", path)
        mlmodel = yaml.safe_load((path / "MLmodel").read_text())
        mlmodel.pop("metadata", None)
        if metadata is not None:
            mlmodel["metadata"] = metadata
        (path / "MLmodel").write_text(yaml.safe_dump(mlmodel))
        return str(path)

    return copy


def test_a_model_with_the_older_joined_class_string_still_loads(saved):
    """Older versions stored the classes as "".join(classes); such a model still loads, one name a character."""
    model = serving.load_model(saved({"classes": "xyz"}))
    assert model.classes == ("x", "y", "z")
    scores = model.class_scores(np.zeros((2, 28, 28), np.uint8))
    assert scores.shape == (2, 3) and np.allclose(scores.sum(axis=1), 1, atol=1e-5)


def test_class_lists_are_stored_as_lists_and_read_back_whatever_the_form():
    metadata = serving.classes_metadata(("unused_0", "Aa", "Bb"))
    assert metadata == {"classes": ["unused_0", "Aa", "Bb"]}
    assert serving.classes_from_metadata(metadata) == ("unused_0", "Aa", "Bb")
    assert serving.classes_from_metadata({"classes": '["Aa", "Bb"]'}) == ("Aa", "Bb")  # a JSON string
    assert serving.classes_from_metadata({"classes": "0123"}) == ("0", "1", "2", "3")  # older: one per character
    assert serving.classes_from_metadata({}) is None


def test_models_the_project_did_not_log_get_one_sentence(saved, tmp_path):
    with pytest.raises(UserError, match="cannot load model"):
        serving.load_model(str(tmp_path / "nothing-here"))
    with pytest.raises(UserError, match="carries no class list"):
        serving.load_model(saved(None))
    lying = serving.load_model(saved({"classes": ["a", "b"]}))
    with pytest.raises(UserError, match=r"shape \(1, 3\) for 1 images and 2 classes"):
        lying.class_scores(np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(UserError, match="batch of 28x28 images"):
        lying.class_scores(np.zeros((1, 32, 32), np.uint8))


@pytest.mark.slow
def test_letters_style_names_survive_train_ensemble_evaluate_predict(workdir, tmp_path, capsys):
    """Names of several characters and labels from 1 (emnist-letters' mapping) through every command."""
    from emnist_exp import ensemble, evaluate, predict, train
    from emnist_exp.tracking import models, queries

    folder = letters_folder(tmp_path / "letters")
    dataset = f"idx:{folder}"
    assert train.main(["--dataset", dataset, "--study", "letters", "--n_trials", "2", "--epochs", "2",
                       "--patience", "2", "--seed", "5", "--pruner", "none", "--space", "kaggle"]) == 0
    classes = ("unused_0", *LETTERS)  # the builder names the label the mapping skips
    trial = queries.finished_trials(study="letters")[0]
    trial_model = serving.load_model(models.model_uri(trial.info.run_id))
    assert trial_model.classes == classes

    assert ensemble.main(["--study", "letters", "--top", "2", "--no-register"]) == 0
    assert ensemble.main(["--study", "letters", "--top", "2", "--no-register", "--reinfer"]) == 0
    reinferred, logged = queries.study_runs("letters", "ensemble")[:2]
    # --reinfer scores the members through the contract; float16 like the logged predictions: the same vote
    assert reinferred.data.metrics["val_accuracy"] == logged.data.metrics["val_accuracy"]
    assert reinferred.data.metrics["test_accuracy"] == logged.data.metrics["test_accuracy"]
    uri = f"runs:/{logged.info.run_id}/model"
    assert serving.load_model(uri).classes == classes
    capsys.readouterr()

    for model_uri, run in ((uri, logged), (models.model_uri(trial.info.run_id), trial)):
        assert evaluate.main(["--model", model_uri, "--dataset", dataset, "--split", "test"]) == 0
        last = capsys.readouterr().out.splitlines()[-1]
        assert last == f"accuracy {run.data.metrics['test_accuracy']:.4f}", (model_uri, last)

    files = []
    for i, (image, label) in enumerate(zip(*letters_test_images(folder))):
        path = tmp_path / f"letter{i}-{LETTERS[label - 1]}.png"
        Image.fromarray(255 - image).resize((112, 112), Image.NEAREST).save(path)  # dark ink on paper
        files.append(str(path))
    assert predict.main([*files, "--model", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    from emnist_exp.preprocess import load_image, to_emnist

    expected = serving.load_model(uri).class_scores(np.stack([to_emnist(load_image(f)) for f in files]))
    named = [line.split()[1] for line in lines]
    assert named == [classes[i] for i in expected.argmax(axis=1)]
    assert set(named) <= set(LETTERS)  # every one a name of two characters


def letters_test_images(folder) -> tuple[np.ndarray, np.ndarray]:
    """The first 8 test images (upright) and labels of the letters folder, read through the project's reader."""
    from emnist_exp import data

    source = data.open_source(f"idx:{folder}")
    images, labels = next(data.read_split(source, "test").batch(8).as_numpy_iterator())
    return images[..., 0], labels
