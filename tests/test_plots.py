"""The figures the runs carry: epochs counted as MLflow counts steps, trial colours that can be told apart."""

from __future__ import annotations

import itertools

import matplotlib.colors
import numpy as np

from emnist_exp import plots


def test_the_learning_curve_counts_epochs_from_0_like_the_epoch_metrics_steps():
    history = {"loss": [2.0, 1.0, 0.5], "val_loss": [2.1, 1.2, 0.7], "accuracy": [0.3, 0.6, 0.8],
               "val_accuracy": [0.3, 0.5, 0.7]}
    fig = plots.learning_curve(history)
    for ax in fig.axes:
        assert "MLflow" in ax.get_xlabel()
        for line in ax.get_lines():
            assert list(line.get_xdata()) == [0, 1, 2]  # tracking.EpochLogger logs epoch k at step k


def test_trial_colours_stay_apart_for_ten_trials_in_a_row():
    colours = [plots.trial_colour(n) for n in range(3, 13)]
    assert len(set(colours)) == 10 and plots.trial_colour(3) == plots.trial_colour(13)
    rgb = np.array([matplotlib.colors.to_rgb(c) for c in colours])
    closest = min(np.linalg.norm(a - b) for a, b in itertools.combinations(rgb, 2))
    assert closest > 0.25  # MLflow's own palette holds greens 0.195 apart (#308613, #277c43)
