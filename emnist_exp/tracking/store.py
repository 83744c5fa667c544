"""The local tracking store: a SQLite file created, upgraded or repaired under a file lock before runs start."""

from __future__ import annotations

import contextlib
from pathlib import Path

import mlflow

from emnist_exp.errors import UserError

MIGRATION_LEFTOVER = "_alembic_tmp_"  # alembic's copy of a table that a SQLite migration is rebuilding


def prepare_local_store(repair: bool = False) -> str:
    """Create (or, with repair, finish migrating) a SQLite tracking store under a file lock; returns its URI.

    MLflow creates a fresh store's tables on first use, and two processes starting together break
    each other's migrations; one killed mid-migration leaves alembic's table copies behind, and then
    every command fails. A server or PostgreSQL store needs nothing here.
    """
    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return uri
    import fcntl  # noqa: PLC0415

    path = Path(uri.removeprefix("sqlite:///").partition("?")[0])
    path.parent.mkdir(parents=True, exist_ok=True)
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
            raise UserError(f"cannot open or upgrade the MLflow store {uri} ({reason}); its schema is changed in a "
                            "way no repair here undoes, so restore it from a backup.") from None
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
