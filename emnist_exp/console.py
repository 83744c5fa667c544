"""What the console shows: our progress lines, without known-harmless library chatter."""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
import warnings

# Lines TensorFlow's C++ code writes straight to file descriptor 2 while it loads, before absl
# logging is set up, so no log level reaches them: the CUDA probe and oneDNN's notice, twice
# (once per shared library).
LOAD_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|I\d{4} [\d:. ]+ +\d+ (port\.cc|cudart_stub\.cc|cpu_feature_guard\.cc):\d+\]"
)
QUIET_LOGGERS = {
    # "Creating initial MLflow database tables..." on a new store, and a traceback for every write a full
    # disk refuses, which MLflow raises anyway (and the worker turns into one sentence)
    "mlflow.store.db.utils": logging.CRITICAL,
    "mlflow.pyfunc": logging.ERROR,  # "Validating input example against model signature" on every ensemble
}
ABSL_NOTICES = (  # tfds' own, through absl logging
    "Using custom data configuration",  # for every builder config made at run time, as ours are
    "`FeatureConnector.dtype` is deprecated",  # tfds 4.9's decode_batch_example reads it itself
)
_filter: _LoadFilter | None = None


def add_verbose_flag(parser) -> None:
    """--verbose (or --verbose 1, as `mlflow run -P verbose=1` passes it): library notices stay on."""
    parser.add_argument("--verbose", nargs="?", type=int, const=1, default=0, metavar="0|1",
                        help="1 (or the flag alone): show TensorFlow's, Keras' and MLflow's notices too (default: 0)")


def quiet(verbose: bool = False) -> None:
    """Silence known-harmless notices at their source. Call before TensorFlow is imported.

    TensorFlow's C++ start-up lines (CUDA probing, CPU flags) bury the progress lines on a CPU box;
    the warnings below would otherwise repeat on every trial. `verbose` leaves everything on.
    """
    global _filter
    if verbose:
        return
    # 3: also its ERROR lines, which on a CPU box are the failed CUDA probe (cuInit) and oneDNN's
    # int32 fallback; a real failure still raises in Python with its message.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow prints "View run ... at: <url>" for every run a tracking server ends, each trial's too;
    # train and ensemble print the experiment's address once, in the view that shows the runs.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    warnings.filterwarnings("ignore", message=".*is experimental.*")
    warnings.filterwarnings("ignore", message=".*regimes for parameter.*")
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("absl").addFilter(lambda record: not str(record.msg).startswith(ABSL_NOTICES))
    if _filter is None and "tensorflow" not in sys.modules:
        _filter = _LoadFilter()
        atexit.register(loaded)


def loaded() -> None:
    """End of TensorFlow's loading: standard error goes straight to the terminal again."""
    global _filter
    if _filter is not None:
        _filter.stop()
        _filter = None


def quiet_libraries() -> None:
    """Our own progress lines replace Optuna's per-trial INFO and TensorFlow's retracing notes."""
    import optuna  # noqa: PLC0415
    import tensorflow as tf  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("optuna.study._optimize").addFilter(_no_traceback_for_stops)  # where trials fail
    tf.get_logger().setLevel("ERROR")
    loaded()


class _LoadFilter:
    """Standard error through a pipe that drops LOAD_NOISE lines and passes every other byte on."""

    def __init__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        read, self.write = os.pipe()
        os.dup2(self.write, 2)
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True)
        self.thread.start()

    def _pump(self, read: int) -> None:
        pending = b""
        with os.fdopen(read, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    if not LOAD_NOISE.search(line):
                        os.write(self.saved, line + b"\n")
                if pending and not re.match(rb"W|I\d", pending):  # a progress bar's \r-line: show it now
                    os.write(self.saved, pending)
                    pending = b""
        if pending:
            os.write(self.saved, pending)

    def stop(self) -> None:
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.write)  # the pump sees the end of the pipe once fd 2 no longer points at it
        self.thread.join(timeout=5)


def _no_traceback_for_stops(record) -> bool:
    """Optuna logs a failed trial's traceback; for a stop (signal, time limit), a UserError or a store that went
    away (the worker's error sentence names it) the one line is enough."""
    from emnist_exp.errors import UserError  # noqa: PLC0415
    from emnist_exp.signals import TimeLimit  # noqa: PLC0415
    from emnist_exp.tracking.endings import lost_store  # noqa: PLC0415

    error = record.exc_info[1] if record.exc_info else None
    if error is not None and (isinstance(error, (KeyboardInterrupt, UserError, TimeLimit)) or lost_store(error)):
        record.exc_info = None
    return True
