"""How a run ends: its status for each way out of a study or trial, and the runs a lost worker or store left RUNNING."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import socket
from typing import Iterator

import mlflow
import optuna

from emnist_exp.errors import UserError
from emnist_exp.redaction import redact
from emnist_exp.signals import TimeLimit, stop_requested
from emnist_exp.tracking.tags import PARENT_TAG, ROLE_TAG, STATE_TAG, STOPPED_TAG, STUDY_TAG, TRIAL_TAG, WORKER_TAG, quoted

ENDED_BY_TAG = "emnist.ended_by"  # on a run another worker ended for the worker that could not: why
# How a store that went away shows in the exception chain (SQLite, the file system, MLflow's HTTP client), the most
# telling first (MLflow's "Max retries exceeded" wraps the socket's reason), each with how the sentence says it.
LOST_STORE = [("database or disk is full", "the disk is full"), ("No space left on device", "the disk is full"),
              ("Read-only file system", "its file system is read-only"), ("disk I/O error", "a disk I/O error"),
              ("unable to open database file", "its database file cannot be opened"),
              ("Connection refused", "Connection refused"), ("Connection reset", "Connection reset"),
              ("Remote end closed connection", "the server closed the connection"),
              ("Connection aborted", "Connection aborted"), ("Name or service not known", "its host is unknown"),
              ("Read timed out", "no answer in time"), (r"too many 5\d\d error responses", "it answers with errors"),
              ("Max retries exceeded", "no answer")]
# A trial's Optuna state gives its run's end, when its worker could not end the run itself.
STATUS_OF_STATE = {optuna.trial.TrialState.COMPLETE: "FINISHED", optuna.trial.TrialState.PRUNED: "FINISHED",
                   optuna.trial.TrialState.FAIL: "FAILED"}


def outcome(error: BaseException | None) -> tuple[str, dict[str, str]]:
    """The status a run ends with when its block ends with `error` (None: normally), and a trial run's tags saying why.

    A pruned trial is the search working as meant: FINISHED. A stop (Ctrl-C, SIGTERM, the time limit)
    is a preemption, after which the trial is queued again: KILLED. Anything else: FAILED.
    """
    if error is None:
        return "FINISHED", {}
    if isinstance(error, optuna.TrialPruned):
        return "FINISHED", {STATE_TAG: "PRUNED"}
    if not isinstance(error, (KeyboardInterrupt, TimeLimit)):
        error = stop_requested() or error  # an error in the wake of a stop signal is that stop
    if isinstance(error, (KeyboardInterrupt, TimeLimit)):
        return "KILLED", {STATE_TAG: "FAIL", STOPPED_TAG: "timeout" if isinstance(error, TimeLimit) else
                          str(error) or "SIGINT"}
    return "FAILED", {STATE_TAG: "FAIL"}


@contextlib.contextmanager
def ending(*, trial: bool = False) -> Iterator[None]:
    """End the active run as `outcome` says, whatever happens inside (`trial`: with the trial run's tags).

    When the block fails, the error in flight is what the user must see: a store that cannot take the
    end too (a server gone, a disk full) leaves the run RUNNING, for end_abandoned_runs to end.
    """
    try:
        yield
    except BaseException as error:
        status, tags = outcome(error)
        with contextlib.suppress(Exception):
            _end(status, tags if trial else {})
        raise
    _end("FINISHED", {})


def _end(status: str, tags: dict[str, str]) -> None:
    try:
        if tags:
            mlflow.set_tags(tags)
    finally:
        mlflow.end_run(status)  # takes the run off the active stack before it writes: the parent is next either way


def lost_store(error: BaseException) -> str | None:
    """Why a store went away, if that is what `error` (or an error that led to it) says; else None."""
    said = [text for error in _chain(error) if _from_a_store(error) for text in [str(error)]]
    for pattern, reason in LOST_STORE:
        if any(re.search(pattern, text) for text in said):
            return reason
    return None


def _from_a_store(error: BaseException) -> bool:
    return isinstance(error, (mlflow.exceptions.MlflowException, optuna.exceptions.StorageInternalError, OSError)) or \
        type(error).__module__.split(".")[0] in ("sqlalchemy", "sqlite3", "requests", "urllib3")


def store_lost_error(error: BaseException, storage: str) -> UserError | None:
    """The sentence for a study stopped by a store that went away (`storage`: the Optuna storage, redacted), or None."""
    reason = lost_store(error)
    if reason is None:
        return None
    optuna_side = any(isinstance(e, optuna.exceptions.StorageInternalError) for e in _chain(error))
    store = f"the Optuna storage {storage}" if optuna_side else \
        f"the MLflow tracking store {redact(mlflow.get_tracking_uri())}"
    return UserError(f"lost {store} mid-study ({reason}); the trial and runs it left RUNNING are ended as FAILED by "
                     "the next worker of this study once the store is back (after the grace period).")


def _chain(error: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def end_stale_trial_run(study: str, number: int, run_id: str | None = None) -> list[str]:
    """End a dead worker's trial run, and its study run if still RUNNING, as FAILED. Returns their ids.

    The run is the trial's `mlflow_run_id`, or (killed before it was recorded, or a retry still
    carrying its original's id) the RUNNING trial run tagged with this study and trial number.
    """
    client = mlflow.MlflowClient()
    runs = []
    if run_id:
        run = client.get_run(run_id)
        if run.data.tags.get(STUDY_TAG) == study and run.data.tags.get(TRIAL_TAG) == str(number):
            runs = [run]
    if not runs:
        where = (f"tags.`{ROLE_TAG}` = 'trial' and tags.`{STUDY_TAG}` = {quoted(study)} and "
                 f"tags.`{TRIAL_TAG}` = '{number}' and attributes.status = 'RUNNING'")
        runs = mlflow.search_runs(search_all_experiments=True, filter_string=where, output_format="list")
    ended = []
    for run in runs:
        ended += _end_left_running(client, run, "FAILED", "heartbeat: its worker stopped")
    return ended


def end_abandoned_runs(study: optuna.Study, grace_period: float) -> list[str]:
    """End the study's runs that no worker will end; returns their ids.

    A trial run is abandoned when Optuna has ended its trial more than grace_period seconds ago and it
    is still RUNNING: its worker lost the tracking store (or died) after Optuna heard of the trial's end
    and before MLflow did. It ends as its trial did (FAILED for FAIL), and its study run with it. A study
    run is abandoned when its worker, on this machine, has exited, and no trial of it is RUNNING.
    """
    client = mlflow.MlflowClient()
    where = f"tags.`{STUDY_TAG}` = {quoted(study.study_name)} and attributes.status = 'RUNNING'"
    found = mlflow.search_runs(search_all_experiments=True, filter_string=where, output_format="list")
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    oldest = datetime.datetime.now() - datetime.timedelta(seconds=grace_period)  # Optuna's times are local, naive
    ended = []
    for run in found:
        if run.data.tags.get(ROLE_TAG) != "trial":
            continue
        trial = trials.get(int(run.data.tags.get(TRIAL_TAG, "-1")))
        if trial is not None and trial.state in STATUS_OF_STATE and (trial.datetime_complete or oldest) <= oldest:
            ended += _end_left_running(client, run, STATUS_OF_STATE[trial.state],
                                       f"its trial ended {trial.state.name} in Optuna, its worker could not end it")
    working = {t.user_attrs.get("worker") for t in trials.values() if t.state == optuna.trial.TrialState.RUNNING}
    for run in found:
        if run.data.tags.get(ROLE_TAG) == "study" and run.info.run_id not in ended and \
                _worker_exited(run.data.tags.get(WORKER_TAG, ""), working):
            ended += _end_left_running(client, run, "FAILED", "its worker exited without ending it")
    return ended


def _worker_exited(worker: str, working: set) -> bool:
    """True if the study run's worker ("<host> seed <n> pid <pid>") ran on this machine and has exited."""
    host, pid = worker.partition(" seed ")[0], worker.rpartition(" pid ")[2]
    if host != socket.gethostname() or not pid.isdigit() or f"{host}:{pid}" in working:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # someone else's process: alive
        return False
    return False


def _end_left_running(client: mlflow.MlflowClient, run, status: str, why: str) -> list[str]:
    """End `run` (and its parent, once it is ended too) as `status`, if still RUNNING; returns the ids ended."""
    ended = []
    parent = run.data.tags.get(PARENT_TAG)
    for rid in [run.info.run_id] + ([parent] if parent else []):
        if client.get_run(rid).info.status == "RUNNING":
            client.set_tag(rid, ENDED_BY_TAG, why)
            if rid == run.info.run_id and run.data.tags.get(ROLE_TAG) == "trial" and status == "FAILED":
                client.set_tag(rid, STATE_TAG, "FAIL")
            client.set_terminated(rid, "FAILED" if rid == parent else status)
            ended.append(rid)
    return ended
