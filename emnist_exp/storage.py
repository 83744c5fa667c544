"""Optuna storage URLs: parsing, redaction, driver checks, and opening an RDB storage with heartbeats."""

from __future__ import annotations

import re
import time
import warnings
from typing import Callable

import optuna

from emnist_exp.errors import UserError

DEFAULT_STORAGE = "sqlite:///optuna.db"  # beside mlflow.db, MLflow 3's default store
SQLITE_TIMEOUT = 120  # seconds a local worker waits on another's write lock
CONNECT_TIMEOUT = 10  # seconds before an unreachable database server is reported
CREATE_RACE = re.compile(r"already exists|duplicate key|UNIQUE constraint failed")  # two workers, one new database
URL_SHAPE = "dialect[+driver]://user[:password]@host[:port]/database, or sqlite:///file.db"


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


def open_storage(url: str, *, heartbeat_interval: int, grace_period: int,
                 on_stale_trial: Callable | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a worker silent for grace_period seconds has its trial failed
    (and handed to on_stale_trial, which may retry it)."""
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
                                   heartbeat_interval, grace_period, on_stale_trial)
    except Exception as exc:  # noqa: BLE001 (sqlalchemy and driver errors alike)
        raise UserError(f"cannot open Optuna storage {redact(url)}: {_reason(exc, parsed.password)}.") from None


def _create_storage(url: str, engine_kwargs: dict, heartbeat_interval: int, grace_period: int,
                    on_stale_trial: Callable | None, attempts: int = 3) -> optuna.storages.RDBStorage:
    """Workers that start together on a fresh database race to create its tables: the losers try again."""
    import sqlalchemy.exc  # noqa: PLC0415

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=on_stale_trial,
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


