"""Database URLs (the Optuna storage, a database MLflow store): parsing, checks, and an RDB storage with heartbeats."""

from __future__ import annotations

import hashlib
import os
import re
import time
import warnings
from typing import Callable

import optuna

from emnist_exp.errors import UserError
from emnist_exp.redaction import redact

DEFAULT_STORAGE = "sqlite:///optuna.db"  # beside mlflow.db, MLflow 3's default store
SQLITE_TIMEOUT = 120  # seconds a local worker waits on another's write lock
CONNECT_TIMEOUT = 10  # seconds before an unreachable database server is reported
CREATE_RACE = re.compile(r"already exists|duplicate key|UNIQUE constraint failed")  # two workers, one new database
URL_SHAPE = "dialect[+driver]://user[:password]@host[:port]/database, or sqlite:///file.db"
IN_MEMORY = (None, "", ":memory:")  # SQLite databases that vanish with the process


def storage_url(url: str, setting: str = "storage URL") -> "sqlalchemy.engine.URL":  # noqa: F821
    """Parse and check a database URL: its shape, its dialect, that its driver is installed, and that it
    names a database that outlives this process. `setting` names it in the sentences (MLFLOW_TRACKING_URI)."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415
    from sqlalchemy.exc import NoSuchModuleError  # noqa: PLC0415

    if url.count("@") > 1:
        raise UserError(f"{setting} {redact(url)} is malformed: percent-encode an @ in the password as %40.")
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 (ArgumentError, or ValueError for a port that is no number)
        raise UserError(f"{setting} {redact(url)} is malformed: expected {URL_SHAPE}.") from None
    if parsed.drivername == "postgresql" and not _importable("psycopg") and _importable("psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg2")  # SQLAlchemy 2.1 defaults to psycopg 3
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        raise UserError(f"{setting} {redact(url)} names an unknown database or driver {parsed.drivername!r}: "
                        "use sqlite:///file.db or postgresql://user@host/database.") from None
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise UserError(f"{setting} {redact(url)} needs the Python module {exc.name!r}, "
                        "which is not installed.") from None
    _check_database(parsed, url, setting)
    return parsed


def _check_database(parsed, url: str, setting: str) -> None:
    """A database that outlives the worker, in a folder that exists: the store must be there for the next one."""
    if parsed.get_backend_name() != "sqlite":
        if not parsed.database:  # PostgreSQL would take the user's own database, often `postgres` itself
            raise UserError(f"{setting} {redact(url)} names no database: add one after the host, as in "
                            "postgresql://user@host/<database>.")
        return
    if parsed.database in IN_MEMORY or parsed.query.get("mode") == "memory":
        raise UserError(f"{setting} {redact(url)} is an in-memory SQLite database, which is lost when this process "
                        "exits: name a file, e.g. sqlite:///optuna.db.")
    if parsed.database.startswith("file:"):
        return  # an SQLite URI filename (uri=true): SQLite itself reads it
    folder = os.path.dirname(os.path.abspath(parsed.database))
    if not os.path.isdir(folder):
        raise UserError(f"{setting} {redact(url)} is in the folder {folder}, which does not exist: create it, "
                        "or name a file in a folder that exists.")


def connect(url: str, setting: str) -> None:
    """Open one connection to a server database and close it: an unreachable server, an unknown database or role
    gets one sentence before any work starts."""
    parsed = storage_url(url, setting)
    if parsed.get_backend_name() == "sqlite":
        return  # a file: _check_database has seen its folder, and SQLite creates the file on first use
    import sqlalchemy as sa  # noqa: PLC0415

    engine = sa.create_engine(parsed, poolclass=sa.pool.NullPool, connect_args=_connect_args(parsed))
    try:
        engine.connect().close()
    except Exception as exc:  # noqa: BLE001 (sqlalchemy and driver errors alike)
        raise UserError(f"cannot connect to {setting} {redact(url)}: {_reason(exc, parsed.password)}.") from None
    finally:
        engine.dispose()


def _connect_args(parsed) -> dict:
    if parsed.get_backend_name() == "sqlite":
        return {"timeout": SQLITE_TIMEOUT}
    if parsed.get_backend_name() == "postgresql":
        return {"connect_timeout": CONNECT_TIMEOUT}
    return {}


def _importable(module: str) -> bool:
    import importlib.util  # noqa: PLC0415

    return importlib.util.find_spec(module) is not None


def open_storage(url: str, *, heartbeat_interval: int, grace_period: int,
                 on_stale_trial: Callable | None = None) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats: a worker silent for grace_period seconds has its trial failed
    (and handed to on_stale_trial, which may retry it)."""
    url = url or DEFAULT_STORAGE
    parsed = storage_url(url)
    engine_kwargs = {"connect_args": _connect_args(parsed)}
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
            return HeartbeatStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat_interval,
                grace_period=grace_period, heartbeat_stale_trial_callback=on_stale_trial,
            )
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt == attempts - 1 or not CREATE_RACE.search(str(exc)):
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


class HeartbeatStorage(optuna.storages.RDBStorage):
    """An RDB storage whose heartbeats skip a beat the database refuses (a full disk, a server restarting).

    Optuna beats from a thread of its own, which an error ends with a traceback and no more beats. A
    missed beat is what grace_period allows for; the trial's own next write says, once, what is wrong.
    """

    def record_heartbeat(self, trial_id: int) -> None:
        import sqlalchemy.exc  # noqa: PLC0415

        try:
            super().record_heartbeat(trial_id)
        except (optuna.exceptions.StorageInternalError, sqlalchemy.exc.SQLAlchemyError):
            pass


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
        if backend == "sqlite":  # storage_url refuses in-memory databases
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
