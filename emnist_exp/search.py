"""The search space: the only place that calls trial.suggest_*; it returns a plain TrialSpec."""

from __future__ import annotations

import sys
from typing import Any, Callable

import optuna

from emnist_exp.spec import TrialSpec


# Each architecture's width knob (its first stage's filters), searched under its own name
# (cnn_width, resnet_width, vgg5_width): Optuna keeps one set of choices per parameter name.
WIDTHS = {"cnn": [16, 32, 48], "resnet": [16, 24, 32], "vgg5": [16, 32, 48]}
TUNED_WIDTHS = {"cnn": [32], "resnet": [24, 32], "vgg5": [24, 32]}  # each about the cost of cnn-32 or up to 2x


def _architecture(trial: optuna.Trial, widths: dict[str, list[int]]) -> dict[str, Any]:
    arch = trial.suggest_categorical("arch", list(widths))
    return {"arch": arch, "width": trial.suggest_categorical(f"{arch}_width", widths[arch])}


def _augmentation(trial: optuna.Trial, max_rotation: float = 20.0) -> dict[str, Any]:
    if not trial.suggest_categorical("augment", [True, False]):
        return {"augment": False}
    return {
        "augment": True,
        "rotation": trial.suggest_float("rotation", 0.0, max_rotation),
        "shift": trial.suggest_float("shift", 0.0, 0.15),
        "zoom": trial.suggest_float("zoom", 0.0, 0.15),
        "elastic": trial.suggest_float("elastic", 0.0, 1.0),
        "stroke": trial.suggest_float("stroke", 0.0, 1.0),
    }


def full_space(trial: optuna.Trial) -> TrialSpec:
    """Everything: architecture and width, augmentation, dropout, BN, lr, schedule, batch, smoothing."""
    return TrialSpec(
        **_architecture(trial, WIDTHS),
        **_augmentation(trial),
        dropout=trial.suggest_float("dropout", 0.0, 0.5),
        batch_norm=trial.suggest_categorical("batch_norm", [True, False]),
        learning_rate=trial.suggest_float("learning_rate", 3e-4, 3e-3, log=True),
        schedule=trial.suggest_categorical("schedule", ["exp", "cosine", "onecycle"]),
        batch_size=trial.suggest_categorical("batch_size", [32, 64, 128, 256]),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.15),
    )


def kaggle_space(trial: optuna.Trial) -> TrialSpec:
    """The Kaggle recipe with nothing searched: a baseline, and members that differ only by random seed."""
    return TrialSpec()


def tuned_space(trial: optuna.Trial) -> TrialSpec:
    """A narrow space for CPU budgets: every point is a strong member, and members differ.

    One-cycle at batch 32 or 64 (on 2 cores batch 64 is as fast per image as 128, and both
    converge further per epoch), batch-norm on. Augmentation on or off, and light when on: in
    ~10 epochs heavy augmentation costs more fit than it buys. No elastic warp: Keras' costs
    more CPU per image than the training step can spare. The architecture is searched too:
    members of different architectures share fewer errors. Measured in BENCHMARKS.md.
    """
    architecture = _architecture(trial, TUNED_WIDTHS)
    augment = trial.suggest_categorical("augment", [True, False])
    return TrialSpec(
        **architecture,
        augment=augment,
        rotation=trial.suggest_float("rotation", 3.0, 8.0) if augment else 0.0,
        shift=trial.suggest_float("shift", 0.02, 0.06) if augment else 0.0,
        zoom=trial.suggest_float("zoom", 0.02, 0.06) if augment else 0.0,
        dropout=trial.suggest_float("dropout", 0.2, 0.4),
        learning_rate=trial.suggest_float("learning_rate", 1e-3, 3e-3, log=True),
        schedule="onecycle",
        batch_size=trial.suggest_categorical("batch_size", [32, 64]),
        label_smoothing=trial.suggest_float("label_smoothing", 0.0, 0.1),
    )


DEMO_WIDTHS = {"cnn": [32], "vgg5": [32], "resnet": [24]}  # about the same cost per epoch (BENCHMARKS.md)


def demo_space(trial: optuna.Trial) -> TrialSpec:
    """The four switches a reader of the runs table compares: architecture, augmentation, dropout, batch-norm.

    The Kaggle schedule and batch for every point, so the switches are all that differ. Augmentation,
    when on, is the tuned space's light kind.
    """
    augment = trial.suggest_categorical("augment", [True, False])
    return TrialSpec(
        **_architecture(trial, DEMO_WIDTHS),
        augment=augment,
        rotation=5.0 if augment else 0.0,
        shift=0.04 if augment else 0.0,
        zoom=0.04 if augment else 0.0,
        dropout=trial.suggest_float("dropout", 0.1, 0.5),
        batch_norm=trial.suggest_categorical("batch_norm", [True, False]),
        learning_rate=trial.suggest_float("learning_rate", 5e-4, 2e-3, log=True),
    )


SPACES: dict[str, Callable[[optuna.Trial], TrialSpec]] = {
    "full": full_space,
    "tuned": tuned_space,
    "kaggle": kaggle_space,
    "demo": demo_space,
}
# Points a new study of a space tries first, in order, before its sampler takes over (Optuna's
# enqueue_trial): the demo's first trials are one of each kind, whatever the seed.
FIRST_POINTS: dict[str, list[dict[str, Any]]] = {
    # On the synthetic set in 3 epochs the CNN learns with or without batch-norm; VGG-5 (the best
    # member on real EMNIST) is still far behind, which the runs table shows.
    "demo": [
        {"arch": "cnn", "cnn_width": 32, "augment": False, "dropout": 0.4, "batch_norm": True, "learning_rate": 1e-3},
        {"arch": "vgg5", "vgg5_width": 32, "augment": False, "dropout": 0.3, "batch_norm": True, "learning_rate": 1e-3},
        {"arch": "cnn", "cnn_width": 32, "augment": True, "dropout": 0.1, "batch_norm": False, "learning_rate": 1e-3},
        {"arch": "cnn", "cnn_width": 32, "augment": False, "dropout": 0.25, "batch_norm": False,
         "learning_rate": 1e-3},
    ],
}

# Old names still accepted: "seed" also meant the random seed, so the baseline space was renamed.
DEPRECATED_SPACES = {"seed": "kaggle"}


def space_name(name: str) -> str:
    """The current name of a search space, saying once on stderr when an old name is used."""
    if name in DEPRECATED_SPACES:
        new = DEPRECATED_SPACES[name]
        print(f"note: space {name!r} is now called {new!r}; the old name will go in a later version.",
              file=sys.stderr)
        return new
    return name


def suggest_spec(trial: optuna.Trial, space: str = "full") -> TrialSpec:
    """Ask the trial for a TrialSpec from the named search space."""
    return SPACES[DEPRECATED_SPACES.get(space, space)](trial)


def spec_from_params(params: dict[str, Any], space: str = "full") -> TrialSpec:
    """Rebuild the spec of a finished trial from its params (e.g. study.best_params)."""
    return suggest_spec(optuna.trial.FixedTrial(params), space)
