"""The tracking store: its settings checked before work starts; a local SQLite file created, upgraded or
repaired under a file lock before runs start."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from urllib.parse import urlparse

import mlflow

from emnist_exp import storage
from emnist_exp.errors import UserError
from emnist_exp.redaction import redact

MIGRATION_LEFTOVER = "_alembic_tmp_"  # alembic's copy of a table that a SQLite migration is rebuilding
PROBE_SECONDS = 5  # a tracking server that has not answered /health by then is reported, not retried for minutes
DATABASES = {"sqlite", "postgresql", "mysql", "mssql"}  # the schemes MLflow opens with SQLAlchemy
SERVERS = {"http", "https"}
LEFT_TO_MLFLOW = {"", "file", "databricks", "databricks-uc", "uc"}  # a folder, or a hosted store MLflow checks


def check_store() -> str:
    """MLFLOW_TRACKING_URI (and MLFLOW_REGISTRY_URI, when it differs) checked before any work; returns the URI.

    MLflow opens its store when first used, then retries: a server that is down costs 260 s and a
    traceback, a missing database 200 lines of one. Here a server gets one short request, a database
    one connection, and an unknown scheme a sentence, each naming the setting. Nothing is created.
    """
    uri = mlflow.get_tracking_uri()
    _check_uri(uri, "MLFLOW_TRACKING_URI")
    registry = mlflow.get_registry_uri()
    if registry and registry != uri:
        _check_uri(registry, "MLFLOW_REGISTRY_URI")
    return uri


def _check_uri(uri: str, setting: str) -> None:
    scheme = urlparse(uri).scheme.lower()
    if scheme in SERVERS:
        _check_server(uri, setting)
    elif scheme.partition("+")[0] in DATABASES:
        storage.connect(uri, setting)
    elif scheme not in LEFT_TO_MLFLOW:
        try:
            mlflow.MlflowClient(tracking_uri=uri)  # a plugin's scheme, registered by an installed package
        except mlflow.exceptions.MlflowException:
            raise UserError(f"{setting} {redact(uri)} has the scheme {scheme!r}, which MLflow has no store for: "
                            "use http(s)://host:port for a tracking server, sqlite:///mlflow.db, "
                            "postgresql://user@host/database or a folder.") from None


def _check_server(uri: str, setting: str) -> None:
    """One GET of the server's /health: any HTTP answer below 500 means a tracking server is there."""
    import requests  # noqa: PLC0415 (MLflow's own HTTP client)

    try:
        answer = requests.get(f"{uri.rstrip('/')}/health", timeout=PROBE_SECONDS)
    except requests.Timeout:
        reason = f"no answer within {PROBE_SECONDS} s"
    except requests.RequestException as exc:
        found = re.search(r"\[Errno -?\d+\] ([^'\"()]+)", str(exc))  # e.g. [Errno 111] Connection refused
        reason = found.group(1).strip() if found else type(exc).__name__
    else:
        if answer.status_code < 500:
            return
        reason = f"its /health answers HTTP {answer.status_code}"
    raise UserError(f"{setting} {redact(uri)} does not answer ({reason}): start the tracking server "
                    f"(`mlflow server`), or set {setting} to one that runs.")


def prepare_local_store(repair: bool = False) -> str:
    """Create (or, with repair, finish migrating) a SQLite tracking store under a file lock; returns its URI.

    MLflow creates a fresh store's tables on first use, and two processes starting together break
    each other's migrations; one killed mid-migration leaves alembic's table copies behind, and then
    every command fails. A server or PostgreSQL store needs nothing here.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return uri
    storage.storage_url(uri, "MLFLOW_TRACKING_URI")  # a file in a folder that exists: none is made here
    import fcntl  # noqa: PLC0415

    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    with open(path, "ab") as handle:  # flock is apart from SQLite's own fcntl locks on the same file
        fcntl.flock(handle, fcntl.LOCK_EX)
        leftovers = _migration_leftovers(path, repair)
        if leftovers:
            raise UserError(f"{path} was left half-migrated by MLflow processes that created or upgraded it at "
                            f"once (leftover tables {', '.join(leftovers)}): run `python -m emnist_exp.stores "
                            "--repair`, which removes only those copies and finishes the upgrade, keeping every run.")
        import sqlalchemy.exc  # noqa: PLC0415

        try:
            mlflow.MlflowClient().search_experiments(max_results=1)
        except (mlflow.exceptions.MlflowException, sqlalchemy.exc.SQLAlchemyError) as exc:
            # e.g. a migration killed between two of its statements: no leftover copy, a schema half changed
            reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
            raise UserError(f"cannot open or upgrade the MLflow store {redact(uri)} ({reason}); its schema is changed "
                            "in a way no repair here undoes, so restore it from a backup.") from None
    return uri


def _migration_leftovers(path: Path, repair: bool) -> list[str]:
    """Alembic's leftover table copies in a SQLite store; with repair, removed (or, where the
    migration had already dropped the original, renamed back to it)."""
    import sqlite3  # noqa: PLC0415

    with contextlib.closing(sqlite3.connect(path, timeout=120)) as db:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        leftovers = sorted(t for t in tables if t.startswith(MIGRATION_LEFTOVER))
        if not repair:
            return leftovers
        for table in leftovers:
            original = table.removeprefix(MIGRATION_LEFTOVER)
            if original in tables:
                db.execute(f'DROP TABLE "{table}"')  # a copy: the original still holds every row
            else:
                db.execute(f'ALTER TABLE "{table}" RENAME TO "{original}"')
        db.commit()
    return []
