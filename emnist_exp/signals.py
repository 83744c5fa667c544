"""How a worker stops: SIGINT and SIGTERM end the current trial cleanly, once; an orphaned `mlflow run` child stops too."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

PARENT_POLL_SECONDS = 1.0  # how soon a child of `mlflow run` notices that the CLI has gone


class Stopped(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so Optuna fails the trial and the runs end as KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_requested: list[int] = []  # the stop signal received, if any (module state: a process stops once)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turn the first SIGINT or SIGTERM into Stopped; ignore later ones while the worker cleans up.

    `mlflow run` forwards a Ctrl-C as SIGTERM to a child that already has the terminal's SIGINT,
    and Kubernetes, Slurm and `timeout` send SIGTERM before SIGKILL: a second signal must not cut
    the cleanup (FAIL the trial, end the runs) short. Under `mlflow run` (MLFLOW_RUN_ID set) a
    watcher also stops the worker when the CLI that started it exits, since the CLI dies of a
    SIGTERM without passing it on.
    """

    def handle(signum, frame) -> None:
        if _requested:
            print(f"{signal.Signals(signum).name} while stopping: still cleaning up", file=sys.stderr, flush=True)
            return
        _requested.append(signum)
        print(f"{signal.Signals(signum).name}: failing the current trial and ending its runs as KILLED",
              file=sys.stderr, flush=True)
        raise Stopped(signum)

    def unraisable(report) -> None:  # a Stopped raised inside a weakref callback or __del__: raised again later
        if not isinstance(report.exc_value, Stopped):
            hook(report)

    _requested.clear()
    hook, sys.unraisablehook = sys.unraisablehook, unraisable
    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    done = threading.Event()
    if os.environ.get("MLFLOW_RUN_ID"):
        threading.Thread(target=_stop_when_orphaned, args=(os.getppid(), done), daemon=True,
                         name="parent-watch").start()
    try:
        yield
    finally:
        done.set()
        _requested.clear()  # outside the worker, an error is what it says (stop_requested)
        sys.unraisablehook = hook
        for signum, old in previous.items():
            signal.signal(signum, old)


def stop_requested() -> Stopped | None:
    """The stop a signal asked for, if one came: an error raised after it is most likely its echo
    (a store call cut short mid-write fails on the next one), so it counts as that stop."""
    return Stopped(_requested[0]) if _requested else None


def raise_if_stopped() -> None:
    """Raise Stopped again if a stop signal came: the handler's own raise can land where Python
    drops it (a weakref callback run mid-fit, as SQLAlchemy's are), so training checks at each
    batch and after each trial."""
    if _requested:
        raise Stopped(_requested[0])


def _stop_when_orphaned(parent: int, done: threading.Event) -> None:
    while not done.wait(PARENT_POLL_SECONDS):
        if os.getppid() != parent:  # re-parented: the process that started us has exited
            os.kill(os.getpid(), signal.SIGTERM)
            return


class TimeLimit(Exception):
    """The worker's own time limit (--timeout) came while a trial was training: it stops, and goes back to the study."""
