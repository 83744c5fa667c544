"""One trial: spec -> train -> log. The Optuna objective and its pruning callback."""

from __future__ import annotations

import math
from typing import Callable

import keras
import numpy as np
import optuna

from emnist_exp import data, signals, trainer
from emnist_exp.tracking import datasets, models, results, runs
from emnist_exp.config import Config
from emnist_exp.search import suggest_spec
from emnist_exp.study import WORKER, trial_seed


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


class StopOnSignal(keras.callbacks.Callback):
    """End training at the next batch once a stop signal has come (see signals.raise_if_stopped)."""

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        signals.raise_if_stopped()

    on_test_batch_end = on_predict_batch_end = on_train_batch_end


class Objective:
    """Train one trial on data loaded once; every trial is a nested MLflow run."""

    def __init__(self, cfg: Config, splits: data.Splits, on_start: Callable[[], None] | None = None,
                 policy: str = "float32"):
        self.cfg = cfg
        self.splits = splits
        self.policy = policy  # the Keras dtype policy cfg.precision resolved to on this machine
        self.on_start = on_start  # told once each trial exists in the storage (the trial cap's claim)
        self.datasets = datasets.split_datasets(cfg.dataset, data.split_records(splits), len(splits.classes))

    def __call__(self, trial: optuna.Trial) -> float:
        cfg, splits = self.cfg, self.splits
        signals.raise_if_stopped()
        if self.on_start:
            self.on_start()
        spec = suggest_spec(trial, cfg.space)
        seed = trial_seed(cfg.seed, trial.number)  # unique per trial across workers, like the sampler's
        # What it takes to rebuild this trial's splits (the ensemble's fallback to inference).
        extra = {"dataset": cfg.dataset, "val_fraction": cfg.val_fraction, "max_examples": cfg.max_examples,
                 "data_dir": cfg.data_dir, "n_train": splits.counts["train"], "max_epochs": cfg.epochs}
        trial.set_user_attr("worker", WORKER)  # which machine and process ran (or lost) this trial
        with runs.trial_run(cfg.study, trial.number, spec, seed, extra, policy=self.policy) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            datasets.log_datasets(self.datasets)
            pruning = PruningCallback(trial)
            result = trainer.train_spec(spec, splits, epochs=cfg.epochs, patience=cfg.patience, seed=seed,
                                        shuffle_buffer=cfg.shuffle_buffer, policy=self.policy,
                                        callbacks=[pruning, runs.EpochLogger(), StopOnSignal()])
            if result.diverged:
                runs.set_state("FAIL")
                print(f"trial {trial.number}: loss became NaN; the trial fails and the study goes on")
                return float("nan")  # Optuna records a NaN objective as FAIL
            if pruning.pruned_at is not None:
                raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at + 1}")
            try:
                self._log(result, spec)
            except OSError as exc:  # a full disk, or an artifact folder gone or read-only
                raise results.artifact_write_error(exc) from None
            runs.set_state("COMPLETE")
            return result.val_accuracy

    def _log(self, result: trainer.TrainResult, spec) -> None:
        images = wrong = None
        if result.test_probs is not None:
            wrong = np.flatnonzero(result.test_probs.argmax(axis=1) != result.test_labels)[:48]
            images = data.images_at(self.splits.test, wrong)
        model_id = models.log_keras_model(result.model, self.splits.classes,
                                            data.images_at(self.splits.val, range(min(4, self.splits.counts["val"]))),
                                            step=result.best_epoch)
        results.log_trial_result(result, spec, self.splits.classes, param_count=result.model.count_params(),
                                  model_id=model_id, datasets=self.datasets, test_images=images, wrong_index=wrong)
