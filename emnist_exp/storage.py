"""Optuna storage URLs: parsing, redaction, driver checks, and opening an RDB storage with heartbeats."""

from __future__ import annotations

import hashlib
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
    """The storage URL without its password, fit for logs and error messages (even when malformed).

    SQLAlchemy parses the URL, so a password is hidden whatever it holds (/, :, ?, #); a URL it
    cannot parse, or one with a second @ (which it would split at the first), loses everything
    between the user name and the last @.
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415

    try:
        text = make_url(url).render_as_string(hide_password=True) if url.count("@") <= 1 else None
    except Exception:  # noqa: BLE001 (ArgumentError, ValueError: a malformed URL)
        text = None
    if text is None:
        head, at, host = url.rpartition("@")
        start = head.find("//") + 2 if "//" in head else 0
        user, colon, _ = head[start:].partition(":")
        text = f"{head[:start]}{user}:***@{host}" if at and colon else url
    return re.sub(r"(password=)[^&]*", r"\1***", text, flags=re.IGNORECASE)


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




class StudyLock:
    """A lock that every worker of one study, on any machine, shares through the study's storage.

    PostgreSQL: a session advisory lock, freed by the server when the holder's connection drops;
    SQLite (workers on one machine): flock on a file beside the database, freed when the holder exits.
    """

    def __init__(self, url: str, study: str):
        self.parsed = storage_url(url or DEFAULT_STORAGE)
        self.key = int.from_bytes(hashlib.sha256(f"emnist-exp trial cap {study}".encode()).digest()[:8],
                                  "big", signed=True)
        self._held = None

    def acquire(self) -> None:
        if self._held is not None:
            return
        backend = self.parsed.get_backend_name()
        if backend == "sqlite" and self.parsed.database not in (None, "", ":memory:"):
            import fcntl  # noqa: PLC0415

            handle = open(f"{self.parsed.database}.lock", "ab")
            fcntl.flock(handle, fcntl.LOCK_EX)
            self._held = handle
        elif backend == "postgresql":
            import sqlalchemy as sa  # noqa: PLC0415

            engine = sa.create_engine(self.parsed, poolclass=sa.pool.NullPool,
                                      connect_args={"connect_timeout": CONNECT_TIMEOUT})
            conn = engine.connect()
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            conn.commit()
            self._held = conn

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()  # closing the file drops the flock; closing the session drops the advisory lock
