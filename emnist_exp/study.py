"""An Optuna study and one worker's part in it: sampler, pruner, the study-wide trial cap, retries of lost trials."""

from __future__ import annotations

import os
import socket
import sys
import time
import warnings
from typing import Any

import numpy as np
import optuna

from emnist_exp import signals, storage as storages
from emnist_exp.tracking import endings
from emnist_exp.config import Config
from emnist_exp.search import FIRST_POINTS

MAX_RETRY = 3  # a trial whose worker died or was stopped runs again at most this often
# User attributes of a trial. stopped_by (SIGTERM, SIGINT or timeout) marks a preemption, retried, apart from a
# failure of the trial's own (NaN loss, bad spec), which has none and is not retried. A trial lost with its worker
# cannot be marked any more once Optuna has failed it: its retry's system attr retry_reasons says "heartbeat".
STOPPED_BY = "stopped_by"
SEED = "seed"  # the trial's Keras seed, kept by its retries (which have other numbers)
CHECKPOINT = "checkpoint"  # the newest training state: {run_id, path, sha256, epoch, trial, worker}; None once done
NOT_INHERITED = ("worker", STOPPED_BY)  # what a retry must not take over from the trial it retries
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def open_study(cfg: Config) -> optuna.Study:
    """This worker's study on its storage (created by the first worker), with heartbeats and retries."""
    storage = storages.open_storage(cfg.storage or storages.DEFAULT_STORAGE,
                                    heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period,
                                    on_stale_trial=RetryStaleTrial(MAX_RETRY))
    return make_study(cfg, storage)


class RetryStaleTrial:
    """Retry the trial of a worker that stopped sending heartbeats, and end its MLflow runs as FAILED.

    Optuna calls this from fail_stale_trials, which every worker runs before each trial.
    """

    def __init__(self, max_retry: int):
        self.max_retry = max_retry

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            ended = endings.end_stale_trial_run(study.study_name, trial.number, trial.user_attrs.get("mlflow_run_id"))
        except Exception as exc:  # noqa: BLE001 (the study goes on even if the tracking server is away)
            ended, note = [], f"; its MLflow run could not be ended ({type(exc).__name__}: {exc})"
        else:
            note = f"; MLflow runs ended as FAILED: {', '.join(ended)}" if ended else ""
        # Queued after its runs are ended: the worker that resumes it reopens the trial's run.
        queued = requeue(study, trial, "heartbeat", self.max_retry)
        again = "queued again with the same parameters" if queued else f"not queued again ({self.max_retry} retries)"
        print(f"[{study.study_name}] trial {trial.number} lost its worker (no heartbeat): marked FAIL and "
              f"{again}{note}", file=sys.stderr, flush=True)


def requeue(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str, max_retry: int = MAX_RETRY) -> bool:
    """Queue a copy of `trial` (same parameters, seed and checkpoint) to run again; False once it has been
    retried max_retry times.

    The copy is what Optuna's RetryHeartbeatStaleTrialCallback makes (system attrs failed_trial and
    retry_history, read by its retried_trial_number and retry_history), plus retry_reasons. Intermediate
    values are not copied: the trial that resumes reports again those of the epochs its checkpoint holds.
    """
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    if len(history) > max_retry:
        return False
    system_attrs = {**trial.system_attrs, "failed_trial": trial.system_attrs.get("failed_trial", trial.number),
                    "retry_history": history, "retry_reasons": [*trial.system_attrs.get("retry_reasons", []), reason]}
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in NOT_INHERITED}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.WAITING, params=trial.params,
                                              distributions=trial.distributions, user_attrs=user_attrs,
                                              system_attrs=system_attrs))
    return True


def requeue_stopped(trial: optuna.Trial, reason: str) -> bool:
    """Mark a running trial as stopped by `reason` (SIGTERM, SIGINT, timeout) and queue it again."""
    trial.set_user_attr(STOPPED_BY, reason)
    frozen = trial.study._storage.get_trial(trial._trial_id)
    return requeue(trial.study, frozen, reason)


def newest_checkpoint(trial: optuna.Trial) -> dict | None:
    """The checkpoint with the most epochs among this trial's and those of the trials it retries."""
    storage, study_id = trial.study._storage, trial.study._study_id
    frozen = storage.get_trial(trial._trial_id)
    found = [frozen.user_attrs.get(CHECKPOINT)]
    for number in frozen.system_attrs.get("retry_history", []):
        earlier = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(study_id, number))
        found.append(earlier.user_attrs.get(CHECKPOINT))
    found = [c for c in found if c]
    return max(found, key=lambda c: c["epoch"]) if found else None


def fail_stale_trials(study: optuna.Study, runs: bool = True) -> None:
    """Fail (and retry) the trials of dead workers now, rather than before this worker's next trial; then (with
    `runs`) end the MLflow runs that workers which lost a store left RUNNING (end_abandoned_runs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    if runs:
        end_abandoned_runs(study)


def end_abandoned_runs(study: optuna.Study) -> None:
    """End the runs no worker will end (endings.end_abandoned_runs), once their trial is grace_period seconds over."""
    try:
        ended = endings.end_abandoned_runs(study, getattr(study._storage, "grace_period", None) or 0)
    except Exception as exc:  # noqa: BLE001 (the study goes on even if the tracking server is away)
        print(f"[{study.study_name}] note: runs left RUNNING were not checked ({type(exc).__name__}: "
              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})", file=sys.stderr, flush=True)
        return
    if ended:
        print(f"[{study.study_name}] MLflow runs left RUNNING by a worker that lost its store or exited, ended: "
              f"{', '.join(ended)}", file=sys.stderr, flush=True)


def trial_seed(seed: int, number: int) -> int:
    """A seed drawn from (seed, trial number). Not seed + number: workers started with seeds 0, 1, 2
    would meet on the diagonal (worker 0's trial 1 and worker 1's trial 0)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


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
        self.tpe = optuna.samplers.TPESampler(seed=trial_seed(self.seed, trial.number), **self.tpe_options)
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


class RetriesFirstStudy(optuna.Study):
    """A study whose workers take a queued retry before any other WAITING trial.

    Optuna pops WAITING trials by number, so a retry (queued when its trial stopped) would wait behind
    the first points enqueued when the study began, and with total_trials the study could fill up
    before it resumed. Overrides Study._pop_waiting_trial_id (Optuna 5.1, as locked), keeping its
    claim: the first worker to set a trial RUNNING has it.
    """

    def _pop_waiting_trial_id(self) -> int | None:
        waiting = self._storage.get_all_trials(self._study_id, deepcopy=False,
                                               states=(optuna.trial.TrialState.WAITING,))
        for trial in sorted(waiting, key=lambda t: "failed_trial" not in t.system_attrs):  # stable: by number
            try:
                if self._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.RUNNING):
                    return trial._trial_id
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
        return None


def make_study(cfg: Config, storage: optuna.storages.BaseStorage) -> optuna.Study:
    # constant_liar: workers treat each other's running trials as bad, so they don't all sample one point.
    sampler = TrialSeededTPE(cfg.seed, constant_liar=True)
    pruner = make_pruner(cfg.pruner)
    optuna.create_study(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner,
                        direction="maximize", load_if_exists=True)
    study = RetriesFirstStudy(study_name=cfg.study, storage=storage, sampler=sampler, pruner=pruner)
    for params in FIRST_POINTS.get(cfg.space, []):
        # skip_if_exists: a continued study, or a second worker, does not queue them again
        study.enqueue_trial(params, skip_if_exists=True)
    return study


class TrialCap:
    """Stop this worker once the study holds `total` COMPLETE trials, whichever workers ran them.

    Unlike optuna.study.MaxTrialsCallback it counts other workers' RUNNING trials too, so the study
    does not overshoot; and while those alone would fill the cap it waits for them (failing dead
    workers' trials as it polls), so a trial lost with its worker is still retried by someone.
    A queued retry (a WAITING copy of a stopped or lost trial) holds its trial's place: it is counted
    like a RUNNING trial, and a worker that finds one has room to take it (RetriesFirstStudy hands it
    out first), so a stopped trial resumes instead of a new one filling its place.

    Checking and claiming are one step: a worker that finds room holds the study's lock until
    its next trial exists in the storage (the objective calls `claimed`), so two workers that
    finish together cannot both take the last place.
    """

    def __init__(self, total: int, lock: storages.StudyLock, n_trials: int, poll_seconds: float = 5.0):
        self.total = total
        self.lock = lock
        self.left = n_trials  # trials this worker may still start
        self.poll_seconds = poll_seconds

    def has_room(self, study: optuna.Study, hold: bool = True) -> bool:
        """True if this worker should run another trial; then (with hold) it keeps the lock until `claimed`."""
        states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        self.lock.acquire()
        while True:
            fail_stale_trials(study, runs=hold)  # a late worker's first look (hold=False) stays off the tracking store
            trials = study.get_trials(deepcopy=False, states=states)
            complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
            running = sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)
            retries = sum(t.state == optuna.trial.TrialState.WAITING and "failed_trial" in t.system_attrs
                          for t in trials)
            taken = complete + running
            if complete >= self.total or taken + retries < self.total or (retries and taken < self.total):
                if not hold or complete >= self.total:
                    self.lock.release()
                return complete < self.total
            time.sleep(self.poll_seconds)

    def claimed(self) -> None:
        """This worker's next trial is in the storage: other workers may count it now."""
        self.left -= 1
        self.lock.release()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if self.left <= 0:
            return  # optimize ends after this callback: nothing to claim
        if not self.has_room(study):
            study.stop()


def worker_callbacks(cfg: Config, study: optuna.Study) -> tuple[list, TrialCap | None]:
    """Progress lines, and the study-wide cap when total_trials is set (also returned on its own)."""
    callbacks: list = [Progress(cfg.n_trials)]
    cap = None
    if cfg.total_trials:
        cap = TrialCap(cfg.total_trials, storages.StudyLock(cfg.storage, cfg.study), cfg.n_trials,
                       poll_seconds=min(cfg.heartbeat_interval, 5))
        callbacks.append(cap)
    return callbacks, cap


class Progress:
    """One line per finished trial: i of n for this worker, and the study's best so far."""

    def __init__(self, n_trials: int):
        self.n_trials = n_trials
        self.done = 0

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        signals.raise_if_stopped()  # a stop swallowed during the trial ends the worker before the next one
        self.done += 1
        value = "" if trial.value is None else f" val_accuracy {trial.value:.4f}"
        try:
            best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
        except ValueError:
            best = "no complete trial yet"
        print(f"[{study.study_name}] trial {self.done} of {self.n_trials} (#{trial.number}) "
              f"{trial.state.name}{value}; {best}", file=sys.stderr, flush=True)
