"""What the console shows: our progress lines, without known-harmless library chatter."""

from __future__ import annotations

import logging
import os
import warnings


def quiet() -> None:
    """Silence known-harmless notices at their source. Call before TensorFlow is imported.

    TensorFlow's C++ start-up lines (CUDA probing, CPU flags) bury the progress lines on a CPU box;
    the warnings below would otherwise repeat on every trial.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    warnings.filterwarnings("ignore", message=".*regimes for parameter.*")


def quiet_libraries() -> None:
    """Our own progress lines replace Optuna's per-trial INFO and TensorFlow's retracing notes."""
    import optuna  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_no_traceback_for_stops)  # where trials fail
    tf.get_logger().setLevel("ERROR")


def _no_traceback_for_stops(record) -> bool:
    """Optuna logs a failed trial's traceback; for a stop signal or a UserError the one line is enough."""
    from emnist_exp.errors import UserError  # noqa: PLC0415

    if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, UserError)):
        record.exc_info = None
    return True
