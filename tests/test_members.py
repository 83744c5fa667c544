"""The member architectures: each builds, trains a step and comes back from MLflow predicting the same."""

from __future__ import annotations

import mlflow
import numpy as np
import optuna
import pytest

from emnist_exp import data, model
from emnist_exp.tracking import models, runs
from emnist_exp.search import SPACES, TUNED_WIDTHS, WIDTHS, spec_from_params, suggest_spec
from emnist_exp.spec import TrialSpec


@pytest.fixture(scope="module")
def batch(workdir):
    splits = data.load_splits("synthetic:600")
    images = np.stack([x for x, _ in splits.train.take(64).as_numpy_iterator()]).astype(np.float32)
    labels = data.labels_of(splits.train.take(64))
    return splits.classes, images, np.eye(len(splits.classes), dtype=np.float32)[labels]


# The seed CNN in the fast tier, the others (a Keras model each to build, train and log) in the slow one.
@pytest.mark.parametrize("arch", [a if a == "cnn" else pytest.param(a, marks=pytest.mark.slow)
                                  for a in sorted(model.ARCHITECTURES)])
def test_each_architecture_trains_a_step_and_round_trips_through_mlflow(arch, batch, workdir):
    classes, images, onehot = batch
    spec = TrialSpec(arch=arch, width=16, schedule="onecycle", batch_size=64)
    net = model.compile_model(model.build_model(spec, len(classes)), spec, steps_per_epoch=10, epochs=1)
    assert net.input_shape == (None, 28, 28, 1) and net.output_shape == (None, len(classes))
    before = [w.copy() for w in net.get_weights()]
    loss = net.train_on_batch(images, onehot, return_dict=True)["loss"]
    assert np.isfinite(loss)
    assert any(not np.array_equal(a, b) for a, b in zip(before, net.get_weights()))
    with runs.trial_run("members", 0, spec, seed=0, extra_params={}) as run:
        models.log_keras_model(net, classes, images[:4])
    logged = mlflow.get_run(run.info.run_id)
    assert logged.info.run_name == f"{arch}-16 noaug bn drop0.4 #000"
    assert logged.data.tags["arch"] == arch and logged.data.params["arch"] == arch
    back = models.load_keras_model(run.info.run_id)
    assert back.count_params() == net.count_params()
    np.testing.assert_allclose(back.predict(images, verbose=0), net.predict(images, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", sorted(model.ARCHITECTURES))
def test_the_width_knob_scales_each_architecture(arch):
    narrow, wide = (model.build_model(TrialSpec(arch=arch, width=w), 47).count_params() for w in (16, 32))
    assert 2.5 < wide / narrow < 4.5  # convolutions grow with width squared, the first layers and head less


def test_the_small_resnet_is_the_measured_one():
    net = model.build_model(TrialSpec(arch="resnet", width=32), 47)
    assert net.count_params() == 313_455
    assert sum(layer.__class__.__name__ == "Add" for layer in net.layers) == 3


def test_an_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="unknown architecture 'mlp'"):
        model.build_model(TrialSpec(arch="mlp"), 47)


@pytest.mark.parametrize("space, widths", [("full", WIDTHS), ("tuned", TUNED_WIDTHS)])
def test_searched_spaces_reach_every_architecture_with_its_own_width(space, widths):
    assert set(widths) == set(model.ARCHITECTURES)
    seen = set()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    for _ in range(30):
        trial = study.ask()
        spec = suggest_spec(trial, space)
        assert spec.width in widths[spec.arch] and trial.params[f"{spec.arch}_width"] == spec.width
        assert spec_from_params(trial.params, space) == spec
        seen.add(spec.arch)
        study.tell(trial, 0.5)
    assert seen == set(model.ARCHITECTURES)


def test_the_kaggle_space_stays_the_kaggle_cnn():
    assert suggest_spec(optuna.trial.FixedTrial({}), "kaggle").arch == "cnn"
    assert "kaggle" in SPACES
