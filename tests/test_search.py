"""The search space: one function, testable with FixedTrial; specs rebuild models."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from emnist_exp.model import build_augmenter, build_model
from emnist_exp.search import SPACES, spec_from_params, suggest_spec
from emnist_exp.spec import TrialSpec


def test_fixed_trial_gives_the_spec_it_describes():
    params = {"arch": "resnet", "resnet_width": 16, "augment": True, "rotation": 10.0, "shift": 0.1, "zoom": 0.05,
              "elastic": 0.2, "stroke": 0.4, "dropout": 0.3, "batch_norm": False, "learning_rate": 2e-3, "schedule": "cosine",
              "batch_size": 64, "label_smoothing": 0.1}
    spec = suggest_spec(optuna.trial.FixedTrial(params), "full")
    fields = {k: v for k, v in params.items() if k != "resnet_width"}
    assert spec == TrialSpec(**fields, width=16)
    assert spec_from_params(params) == spec
    assert spec.short_name() == "resnet-16 aug nobn drop0.3"


def test_augmentation_off_asks_for_no_strengths():
    spec = spec_from_params({"arch": "cnn", "cnn_width": 32, "augment": False, "dropout": 0.1, "batch_norm": True,
                             "learning_rate": 1e-3, "schedule": "exp", "batch_size": 32, "label_smoothing": 0.0})
    assert not spec.augment and spec.rotation == spec.shift == spec.zoom == spec.elastic == spec.stroke == 0.0
    assert build_augmenter(spec, seed=0) is None


def test_pen_width_augmentation_broadens_and_thins_strokes_and_keeps_the_peak():
    import tensorflow as tf

    image = np.zeros((28, 28, 1), np.float32)
    image[6:22, 12:15] = 255.0  # a 3 px upright stroke
    batch = np.repeat(image[None], 64, axis=0)
    augment = build_augmenter(TrialSpec(augment=True, stroke=1.0), seed=0)
    out = next(iter(tf.data.Dataset.from_tensors(batch).map(lambda x: augment(x, training=True)))).numpy()
    ink = (out > 127).sum(axis=(1, 2, 3))
    assert ink.min() < (image > 127).sum() < ink.max(), ink  # some images finer, some broader
    np.testing.assert_allclose(out.max(axis=(1, 2, 3)), 255.0, rtol=1e-5)
    assert np.array_equal(augment(batch, training=False), batch)


@pytest.mark.parametrize("space", sorted(SPACES))
def test_every_space_samples_buildable_specs(space):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        trial = study.ask()
        spec = suggest_spec(trial, space)
        model = build_model(spec, 47)
        assert model.output_shape == (None, 47) and model.input_shape == (None, 28, 28, 1)
        assert not any("flip" in layer.name for layer in (build_augmenter(spec, 0) or model).layers)
        study.tell(trial, 0.5)


def test_kaggle_space_is_the_kaggle_recipe():
    spec = suggest_spec(optuna.trial.FixedTrial({}), "kaggle")
    assert (spec.width, spec.dropout, spec.batch_norm, spec.augment) == (32, 0.4, True, False)
    assert (spec.learning_rate, spec.schedule, spec.batch_size) == (1e-3, "exp", 32)
    model = build_model(spec, 47)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    assert [c.filters for c in convs] == [32, 32, 32, 64, 64, 64, 128]
    assert [c.kernel_size for c in convs] == [(3, 3), (3, 3), (5, 5), (3, 3), (3, 3), (5, 5), (4, 4)]
    assert [c.strides for c in convs] == [(1, 1), (1, 1), (2, 2), (1, 1), (1, 1), (2, 2), (1, 1)]
    assert sum(layer.__class__.__name__ == "BatchNormalization" for layer in model.layers) == 7


def test_parallel_workers_draw_different_trials_and_one_worker_repeats(tmp_path):
    """Two workers of one study, each with the configured seed, asking for a trial at the same time."""
    from emnist_exp.config import Config
    from emnist_exp.study import make_study

    def two_workers(path) -> list[TrialSpec]:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        cfg = Config(study="parallel", seed=7)
        first, second = make_study(cfg, storage), make_study(cfg, storage)
        return [suggest_spec(first.ask(), "tuned"), suggest_spec(second.ask(), "tuned")]

    run = two_workers(tmp_path / "a.db")
    assert run[0] != run[1]  # one seed in both workers' samplers, yet two different trials
    assert run == two_workers(tmp_path / "b.db")  # and the seed still makes a study reproducible


def test_old_space_name_seed_still_works_with_one_line_of_notice(capsys):
    from emnist_exp.config import resolve

    cfg = resolve({"space": "seed"})
    assert cfg.space == "kaggle"
    notice = capsys.readouterr().err.strip().splitlines()
    assert len(notice) == 1 and "'seed' is now called 'kaggle'" in notice[0]
