"""User-facing errors: one clear sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Callable


class UserError(Exception):
    """Bad input from the user (dataset, file, parameter, storage). Its message is one sentence."""


def cli_main(fn: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap an entry point so that a UserError prints `error: <sentence>` and exits 2, and a stop
    (Ctrl-C, or a signal that signals.stop_on_signals turned into one) exits 128 + its signal."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> int:
        try:
            return fn(*args, **kwargs) or 0
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:
            print("interrupted", file=sys.stderr)
            return getattr(exc, "exit_code", 130)

    return wrapper
