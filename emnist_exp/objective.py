"""One trial: spec -> train -> log. The Optuna objective and its pruning callback."""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import optuna

from emnist_exp import checkpoint, data, signals, study as studies, trainer
from emnist_exp.tracking import checkpoints as stored, datasets, models, results, runs
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


class StopAtDeadline(keras.callbacks.Callback):
    """Stop training for the worker's time limit (a monotonic `deadline`) with signals.TimeLimit.

    At an epoch's end (its checkpoint written) when another epoch as long would end after the
    limit; at the limit itself, mid-epoch, when the estimate was wrong. The trial resumes from its
    last checkpoint either way, so a stop at an epoch's end loses nothing and one mid-epoch loses
    that epoch so far. Raised as the next epoch begins, after the finished epoch's console line.
    """

    def __init__(self, deadline: float):
        super().__init__()
        self.deadline = deadline
        self.began = time.monotonic()
        self.stop_after: int | None = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        if self.stop_after is not None:
            raise signals.TimeLimit(f"stopped at the end of epoch {self.stop_after}, as the next would end after "
                                    "the time limit")
        self.began = time.monotonic()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        now = time.monotonic()
        if now + (now - self.began) > self.deadline:
            self.stop_after = epoch + 1  # the fit's last epoch ends it anyway: on_epoch_begin is not called again

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if time.monotonic() > self.deadline:
            raise signals.TimeLimit("stopped mid-epoch at the time limit")

    on_test_batch_end = on_train_batch_end


class Objective:
    """Train one trial on data loaded once; every trial is a nested MLflow run.

    A trial stopped by a signal or by the time limit goes back to the study (studies.requeue_stopped);
    one that takes up a stopped or lost trial resumes it from its newest checkpoint, in the same MLflow run.
    """

    def __init__(self, cfg: Config, splits: data.Splits, on_start: Callable[[], None] | None = None,
                 policy: str = "float32"):
        self.cfg = cfg
        self.splits = splits
        self.policy = policy  # the Keras dtype policy cfg.precision resolved to on this machine
        self.on_start = on_start  # told once each trial exists in the storage (the trial cap's claim)
        self.datasets = datasets.split_datasets(cfg.dataset, data.split_records(splits), len(splits.classes))
        self.deadline = time.monotonic() + cfg.timeout if cfg.timeout else None

    def __call__(self, trial: optuna.Trial) -> float:
        signals.raise_if_stopped()
        studies.end_abandoned_runs(trial.study)  # Optuna has just failed the stale trials: their runs, and others
        if self.on_start:
            self.on_start()
        spec = suggest_spec(trial, self.cfg.space)
        trial.set_user_attr("worker", WORKER)  # which machine and process ran (or lost) this trial
        try:
            resume, pointer = self._resume(trial)
            # unique per trial across workers, like the sampler's; a retry keeps the seed of the trial it retries
            seed = resume.seed if resume else int(trial.user_attrs.get(studies.SEED, trial_seed(self.cfg.seed,
                                                                                                trial.number)))
            trial.set_user_attr(studies.SEED, seed)
            return self._train(trial, spec, seed, resume, Checkpoints(trial, pointer))
        except signals.TimeLimit as limit:
            self._requeue(trial, "timeout", str(limit))
            trial.study.stop()  # this worker's time is up: no new trial (optimize would start one otherwise)
            raise
        except (signals.Stopped, Exception) as error:
            # any other error after a stop signal is that signal's echo (signals.stop_requested)
            stop = error if isinstance(error, signals.Stopped) else signals.stop_requested()
            if stop is None:
                raise
            self._requeue(trial, str(stop) or "SIGINT", "stopped")
            if stop is error:
                raise
            raise stop from error

    def _train(self, trial: optuna.Trial, spec, seed: int, resume: checkpoint.TrainingState | None,
               checkpoints: Checkpoints) -> float:
        cfg, splits = self.cfg, self.splits
        # What it takes to rebuild this trial's splits (the ensemble's fallback to inference).
        extra = {"dataset": cfg.dataset, "val_fraction": cfg.val_fraction, "max_examples": cfg.max_examples,
                 "data_dir": cfg.data_dir, "n_train": splits.counts["train"], "max_epochs": cfg.epochs}
        reopen = checkpoints.resumed["run_id"] if resume else None
        with runs.trial_run(cfg.study, trial.number, spec, seed, extra, policy=self.policy, reopen=reopen) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            if resume:
                runs.mark_resumed(trial.number, checkpoints.resumed["trial"], resume.epoch, resume.history)
                report_again(trial, resume)
            else:
                datasets.log_datasets(self.datasets)
            pruning = PruningCallback(trial)
            stops = [StopOnSignal()] + ([StopAtDeadline(self.deadline)] if self.deadline else [])
            result = trainer.train_spec(spec, splits, epochs=cfg.epochs, patience=cfg.patience, seed=seed,
                                        shuffle_buffer=cfg.shuffle_buffer, policy=self.policy, resume=resume,
                                        publish=checkpoints.publish, callbacks=[pruning, runs.EpochLogger(), *stops])
            if result.diverged:
                checkpoints.drop()
                runs.set_state("FAIL")
                print(f"trial {trial.number}: loss became NaN; the trial fails and the study goes on")
                return float("nan")  # Optuna records a NaN objective as FAIL
            if pruning.pruned_at is not None:
                checkpoints.drop()
                raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at + 1}")
            try:
                self._log(result, spec)
            except OSError as exc:  # a full disk, or an artifact folder gone or read-only
                raise results.artifact_write_error(exc) from None
            checkpoints.drop()  # the logged model replaces it
            runs.set_state("COMPLETE")
            return result.val_accuracy

    def _resume(self, trial: optuna.Trial) -> tuple[checkpoint.TrainingState | None, dict | None]:
        """The newest checkpoint of this trial's retry history, read back; (None, its pointer) if unusable."""
        pointer = studies.newest_checkpoint(trial)
        if pointer is None:
            return None, None
        where = f"trial {pointer['trial']}'s checkpoint of epoch {pointer['epoch']} ({pointer['path']} in run " \
                f"{pointer['run_id']})"
        try:
            with tempfile.TemporaryDirectory(prefix="emnist-resume-") as folder:
                state = checkpoint.load(stored.download_checkpoint(pointer, folder), pointer["sha256"])
        except checkpoint.CorruptCheckpoint as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 (gone from the artifact store, or the store unreachable)
            reason = f"it cannot be downloaded ({type(exc).__name__}: {str(exc).strip().splitlines()[0]})"
        else:
            left = state.epoch < self.cfg.epochs and not state.stopped
            start = f"from epoch {state.epoch + 1} of {self.cfg.epochs}" if left else "with its training done"
            print(f"[{self.cfg.study}] trial {trial.number} resumes {start}: {where}, written by {pointer['worker']}",
                  file=sys.stderr, flush=True)
            return state, pointer
        print(f"[{self.cfg.study}] trial {trial.number}: {where} is unusable, as {reason}; the trial starts again "
              "from epoch 1", file=sys.stderr, flush=True)
        return None, pointer

    def _requeue(self, trial: optuna.Trial, reason: str, how: str) -> None:
        queued = studies.requeue_stopped(trial, reason)
        again = ("queued again with the same parameters, to resume from its last checkpoint" if queued
                 else f"not queued again: it was retried {studies.MAX_RETRY} times")
        print(f"[{self.cfg.study}] trial {trial.number} {how} ({reason}): {again}", file=sys.stderr, flush=True)

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


def report_again(trial: optuna.Trial, state: checkpoint.TrainingState) -> None:
    """Tell the pruner the validation accuracy of the epochs a resumed trial does not train again."""
    for step, value in enumerate(state.history.get("val_accuracy", [])):
        if math.isfinite(value):
            trial.report(value, step=step)


class Checkpoints:
    """One trial's checkpoint: each epoch's file goes to its MLflow run, then becomes the trial's, then the
    one before is deleted, so a worker killed at any point leaves a usable one behind."""

    def __init__(self, trial: optuna.Trial, resumed: dict | None):
        self.trial = trial
        self.resumed = resumed  # the pointer this trial started from (unusable ones too: deleted on the next publish)
        self.current = resumed

    def publish(self, path: Path, sha256: str, epoch: int) -> None:
        try:
            where = stored.log_checkpoint(path)
        except OSError as exc:  # the same sentence as the trial's own artifacts: the store refuses writes
            raise results.artifact_write_error(exc) from None
        pointer = {**where, "sha256": sha256, "epoch": epoch, "trial": self.trial.number, "worker": WORKER}
        self.trial.set_user_attr(studies.CHECKPOINT, pointer)
        previous, self.current = self.current, pointer
        self._delete(previous, keep=pointer)

    def drop(self) -> None:
        """The trial ends for good (complete, pruned, NaN): no checkpoint is left."""
        self.trial.set_user_attr(studies.CHECKPOINT, None)
        previous, self.current = self.current, None
        self._delete(previous)

    @staticmethod
    def _delete(pointer: dict | None, keep: dict | None = None) -> None:
        if pointer is None:
            return
        try:
            same_run = keep is not None and keep["run_id"] == pointer["run_id"]
            stored.delete_checkpoints(pointer["run_id"], keep=keep["path"] if same_run else None)
        except Exception as exc:  # noqa: BLE001 (a file left over costs space, not the trial)
            print(f"note: an old checkpoint in run {pointer['run_id']} was not deleted ({type(exc).__name__}: {exc})",
                  file=sys.stderr)
