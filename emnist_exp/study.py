"""The Optuna side of a worker: storage, sampler, pruner, and the objective that trains one trial."""

from __future__ import annotations

import math
import os
import re
import socket
import sys
import time
import warnings
from typing import Any

import keras
import numpy as np
import optuna

from emnist_exp import data, tracking, trainer
from emnist_exp.config import Config
from emnist_exp.errors import UserError
from emnist_exp.search import suggest_spec

DEFAULT_STORAGE = "sqlite:///optuna.db"  # beside mlflow.db, MLflow 3's default store
HEARTBEAT_SECONDS = 60  # a worker silent for GRACE seconds has its trial failed and retried
GRACE_SECONDS = 180
SQLITE_TIMEOUT = 120  # seconds a local worker waits on another's write lock
CONNECT_TIMEOUT = 10  # seconds before an unreachable database server is reported
MAX_RETRY = 3  # a trial whose worker died runs again at most this often
WORKER = f"{socket.gethostname()}:{os.getpid()}"
CREATE_RACE = re.compile(r"already exists|duplicate key|UNIQUE constraint failed")  # two workers, one new database
URL_SHAPE = "dialect[+driver]://user[:password]@host[:port]/database, or sqlite:///file.db"


def quiet_libraries() -> None:
    """Our own progress lines replace Optuna's per-trial INFO and TensorFlow's retracing notes."""
    import tensorflow as tf  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tf.get_logger().setLevel("ERROR")


def redact(url: str) -> str:
    """The storage URL without its password, fit for logs and error messages (even when malformed)."""
    url = re.sub(r"(//[^/:@]*):[^/]*@", r"\1:***@", url)  # user:password@host, up to the last @
    return re.sub(r"(password=)[^&]*", r"\1***", url)


def storage_url(url: str) -> "sqlalchemy.engine.URL":  # noqa: F821
    """Parse and check a storage URL: its shape, its dialect and that its driver is installed."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.exc import NoSuchModuleError  # noqa: PLC0415

    if url.count("@") > 1:
        raise UserError(f"storage URL {redact(url)} is malformed: percent-encode an @ in the password as %40.")
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 (ArgumentError, or ValueError for a port that is no number)
        raise UserError(f"storage URL {redact(url)} is malformed: expected {URL_SHAPE}.") from None
    if parsed.drivername == "postgresql" and not _importable("psycopg") and _importable("psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg2")  # SQLAlchemy 2.1 defaults to psycopg 3
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise UserError(f"storage URL {redact(url)} names an unknown database or driver {parsed.drivername!r}: "
                        "use sqlite:///file.db or postgresql://user@host/database.") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise UserError(f"storage URL {redact(url)} needs the Python module {exc.name!r}, "
                        "which is not installed.") from None
    return parsed


def _importable(module: str) -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec(module) is not None


def open_storage(url: str, *, heartbeat_interval: int = HEARTBEAT_SECONDS, grace_period: int = GRACE_SECONDS
                 ) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a worker silent for grace_period seconds has its trial failed and retried."""
    url = url or DEFAULT_STORAGE
    parsed = storage_url(url)
    engine_kwargs = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}}
    elif parsed.get_backend_name() == "postgresql":
        engine_kwargs = {"connect_args": {"connect_timeout": CONNECT_TIMEOUT}}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna since 2.9, and we rely on them
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return _create_storage(parsed.render_as_string(hide_password=False), engine_kwargs,
                                   heartbeat_interval, grace_period)
    except Exception as exc:  # noqa: BLE001 (sqlalchemy and driver errors alike)
        raise UserError(f"cannot open Optuna storage {redact(url)}: {_reason(exc, parsed.password)}.") from None


def _create_storage(url: str, engine_kwargs: dict, heartbeat_interval: int, grace_period: int,
                    attempts: int = 3) -> optuna.storages.RDBStorage:
    """Workers that start together on a fresh database race to create its tables: the losers try again."""
    import sqlalchemy.exc  # noqa: PLC0415

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=RetryStaleTrial(MAX_RETRY),
            )
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt == attempts - 1 or not CREATE_RACE.search(str(exc)):
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _reason(exc: Exception, password: str | None) -> str:
    """The driver's first line, e.g. 'connection to server ... failed: Connection refused', password scrubbed."""
    text = str(getattr(exc, "orig", None) or exc) or type(exc).__name__
    reason = " ".join(text.strip().splitlines()[0].split()).rstrip(".")
    return reason.replace(password, "***") if password else reason


class RetryStaleTrial:
    """Retry the trial of a worker that stopped sending heartbeats, and end its MLflow runs as FAILED.

    Optuna calls this from fail_stale_trials, which every worker runs before each trial.
    """

    def __init__(self, max_retry: int):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.retry(study, trial)
        try:
            ended = tracking.end_stale_trial_run(study.study_name, trial.number, trial.user_attrs.get("mlflow_run_id"))
        except Exception as exc:  # noqa: BLE001 (the study goes on even if the tracking server is away)
            ended, note = [], f"; its MLflow run could not be ended ({type(exc).__name__}: {exc})"
        else:
            note = f"; MLflow runs ended as FAILED: {', '.join(ended)}" if ended else ""
        print(f"[{study.study_name}] trial {trial.number} lost its worker (no heartbeat): marked FAIL and "
              f"queued again with the same parameters{note}", file=sys.stderr, flush=True)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and retry) the trials of dead workers now, rather than before this worker's next trial."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE whose random draws are seeded by the seed and the trial's number, not by the worker.

    With TPESampler(seed=s) in every worker, workers that start together draw the same start-up
    points: parallel workers repeat each other's first trials. Trial numbers are unique within a
    study, so a TPE made afresh for each trial, seeded from (s, number), keeps one worker
    reproducible and sends parallel workers to different points. TPE carries nothing between trials but its
    random state (it reads the history from the storage), so nothing else is lost.
    """

    def __init__(self, seed: int, **tpe_options: Any):
        self.seed = seed
        self.tpe_options = tpe_options
        self.tpe = optuna.samplers.TPESampler(seed=seed, **tpe_options)

    def __str__(self) -> str:
        options = "".join(f", {key}={value}" for key, value in self.tpe_options.items())
        return f"TPESampler(seed=({self.seed}, trial number){options})"

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        # Not seed + number: workers started with seeds 0, 1, 2 would meet on the diagonal.
        seed = int(np.random.SeedSequence([self.seed, trial.number]).generate_state(1)[0])
        self.tpe = optuna.samplers.TPESampler(seed=seed, **self.tpe_options)
        self.tpe.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.tpe.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.tpe.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.tpe.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.tpe.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.tpe.reseed_rng()


def make_study(cfg: Config, storage: optuna.storages.BaseStorage) -> optuna.Study:
    # constant_liar: workers treat each other's running trials as bad, so they don't all sample one point.
    sampler = TrialSeededTPE(cfg.seed, constant_liar=True)
    return optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler,
                               pruner=make_pruner(cfg.pruner), direction="maximize", load_if_exists=True)


class TrialCap:
    """Stop this worker once the study holds `total` COMPLETE trials, whichever workers ran them.

    Unlike optuna.study.MaxTrialsCallback it counts other workers' RUNNING trials too, so the study
    does not overshoot; and while those alone would fill the cap it waits for them (failing dead
    workers' trials as it polls), so a trial lost with its worker is still retried by someone.
    """

    def __init__(self, total: int, poll_seconds: float = 5.0):
        self.total = total
        self.poll_seconds = poll_seconds

    def has_room(self, study: optuna.Study) -> bool:
        """True if this worker should run another trial; False once `total` trials are COMPLETE."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)
        while True:
            fail_stale_trials(study)
            trials = study.get_trials(deepcopy=False, states=states)
            complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
            if complete >= self.total:
                return False
            if len(trials) < self.total:
                return True
            time.sleep(self.poll_seconds)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if not self.has_room(study):
            study.stop()


def worker_callbacks(cfg: Config, study: optuna.Study) -> list | None:
    """Progress lines, and the study-wide cap when total_trials is set; None when the cap is already met."""
    callbacks: list = [Progress(cfg.n_trials)]
    if cfg.total_trials:
        cap = TrialCap(cfg.total_trials, poll_seconds=min(cfg.heartbeat_interval, 5))
        if not cap.has_room(study):
            return None
        callbacks.append(cap)
    return callbacks


class PruningCallback(keras.callbacks.Callback):
    """Report validation accuracy each epoch; stop training when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial = trial
        self.pruned_at: int | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        value = float((logs or {}).get("val_accuracy", float("nan")))
        if not math.isfinite(value):
            return
        self.trial.report(value, step=epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            self.model.stop_training = True


class Objective:
    """Train one trial on data loaded once; every trial is a nested MLflow run."""

    def __init__(self, cfg: Config, splits: data.Splits):
        self.cfg = cfg
        self.splits = splits

    def __call__(self, trial: optuna.Trial) -> float:
        cfg, splits = self.cfg, self.splits
        spec = suggest_spec(trial, cfg.space)
        seed = cfg.seed + trial.number
        # What it takes to rebuild this trial's splits (the ensemble's fallback to inference).
        extra = {"dataset": cfg.dataset, "val_fraction": cfg.val_fraction, "max_examples": cfg.max_examples,
                 "data_dir": cfg.data_dir, "n_train": splits.counts["train"], "max_epochs": cfg.epochs}
        trial.set_user_attr("worker", WORKER)  # which machine and process ran (or lost) this trial
        with tracking.trial_run(cfg.study, trial.number, spec, seed, extra) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            pruning = PruningCallback(trial)
            result = trainer.train_spec(spec, splits, epochs=cfg.epochs, patience=cfg.patience, seed=seed,
                                        shuffle_buffer=cfg.shuffle_buffer,
                                        callbacks=[pruning, tracking.EpochLogger()])
            if result.diverged:
                tracking.set_state("FAIL")
                print(f"trial {trial.number}: loss became NaN; the trial fails and the study goes on")
                return float("nan")  # Optuna records a NaN objective as FAIL
            if pruning.pruned_at is not None:
                raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at + 1}")
            self._log(result, spec)
            tracking.set_state("COMPLETE")
            return result.val_accuracy

    def _log(self, result: trainer.TrainResult, spec) -> None:
        images = wrong = None
        if result.test_probs is not None:
            wrong = np.flatnonzero(result.test_probs.argmax(axis=1) != result.test_labels)[:48]
            images = data.images_at(self.splits.test, wrong)
        tracking.log_trial_result(result, spec, self.splits.classes, param_count=result.model.count_params(),
                                  test_images=images, wrong_index=wrong)
        tracking.log_keras_model(result.model, self.splits.classes,
                                 data.images_at(self.splits.val, range(min(4, self.splits.counts["val"]))))


class Progress:
    """One line per finished trial: i of n for this worker, and the study's best so far."""

    def __init__(self, n_trials: int):
        self.n_trials = n_trials
        self.done = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.done += 1
        value = "" if trial.value is None else f" val_accuracy {trial.value:.4f}"
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        print(f"[{study.study_name}] trial {self.done} of {self.n_trials} (#{trial.number}) "
              f"{trial.state.name}{value}; {best}", file=sys.stderr, flush=True)
