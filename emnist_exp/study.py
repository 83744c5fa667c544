"""The Optuna side of a worker: storage, sampler, pruner, and the objective that trains one trial."""

from __future__ import annotations

import math
import sys

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


def quiet_libraries() -> None:
    """Our own progress lines replace Optuna's per-trial INFO and TensorFlow's retracing notes."""
    import tensorflow as tf  # noqa: PLC0415

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tf.get_logger().setLevel("ERROR")


def redact(url: str) -> str:
    """The storage URL without its password, fit for logs and error messages."""
    try:
        from sqlalchemy.engine import make_url  # noqa: PLC0415

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 (a malformed URL must not leak in the message either)
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats (so dead workers' trials fail and are retried)."""
    url = url or DEFAULT_STORAGE
    engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=3),
        )
    except Exception as exc:  # noqa: BLE001 (sqlalchemy, driver and argument errors alike)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = reason.replace(url, redact(url))
        raise UserError(f"cannot open Optuna storage {redact(url)}: {reason}") from None


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)


def make_study(cfg: Config, storage: optuna.storages.BaseStorage) -> optuna.Study:
    sampler = optuna.samplers.TPESampler(seed=cfg.seed)
    return optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler,
                               pruner=make_pruner(cfg.pruner), direction="maximize", load_if_exists=True)


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
