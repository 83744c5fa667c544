"""Shared fixtures: a private tfds dir and MLflow store for the session, and one tiny real study."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SAMPLE_ENV = "EMNIST_SAMPLE_DIR"
CHECKOUT = Path(__file__).resolve().parent.parent
STORES = ("mlruns", "mlflow.db", "optuna.db", "optuna.db-journal")  # the user's own stores in the checkout


def store_files() -> dict[str, int]:
    """Every file of the checkout's local stores, with its modification time in ns."""
    found = {}
    for name in STORES:
        path = CHECKOUT / name
        for file in ([path] if path.is_file() else path.rglob("*") if path.is_dir() else []):
            found[str(file.relative_to(CHECKOUT))] = file.stat().st_mtime_ns
    return found


@pytest.fixture(scope="session", autouse=True)
def checkout_untouched():
    """Tests write into temporary folders only: the checkout's mlruns/, mlflow.db and optuna.db stay as they were."""
    before = store_files()
    yield
    after = store_files()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"the tests wrote into the checkout's stores: {changed[:10]}"


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """The session's working folder: tfds data, mlflow.db, mlruns/ and optuna.db live here.

    MLflow puts artifacts under ./mlruns of the working directory, so the session runs from here.
    """
    root = tmp_path_factory.mktemp("work")
    old = {k: os.environ.get(k) for k in ("TFDS_DATA_DIR", "MLFLOW_TRACKING_URI")}
    os.environ["TFDS_DATA_DIR"] = str(root / "tfds")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    cwd = os.getcwd()
    os.chdir(root)
    import mlflow

    mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    yield root
    os.chdir(cwd)
    for key, value in old.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def prepared_tfds(tmp_path_factory, dataset: str) -> Path:
    """`dataset` prepared once in a tfds folder of its own, so that workers read it instead of racing to prepare it."""
    from emnist_exp import data

    path = tmp_path_factory.mktemp("tfds")
    data.open_source(dataset, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_study(workdir) -> dict:
    """A real 3-trial study (synthetic, 2 epochs) through the train entry point, and its ensemble."""
    from emnist_exp import train

    args = ["--dataset", "synthetic:1500", "--study", "tiny", "--n_trials", "3", "--epochs", "2", "--patience", "2",
            "--seed", "7", "--pruner", "none"]
    assert train.main(args) == 0
    return {"study": "tiny", "dataset": "synthetic:1500", "workdir": workdir, "train_args": args}


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real EMNIST bymerge sample, found through EMNIST_SAMPLE_DIR (set by .ci/run)."""
    value = os.environ.get(SAMPLE_ENV)
    if not value:
        pytest.skip(f"{SAMPLE_ENV} is not set: point it at shared/data/emnist-bymerge-sample to run real-data tests")
    path = Path(value)
    if not path.is_dir():
        pytest.skip(f"{SAMPLE_ENV}={value} is not a folder")
    return path


TINY_ENSEMBLE_RUN: dict[str, str] = {}  # the run tiny_ensemble logged, by the version it registered


@pytest.fixture(scope="session")
def tiny_ensemble(tiny_study) -> str:
    """The tiny study's 3 trials voted (soft) into `emnist-ensemble`; returns the registered version.

    Other tests log ensembles of the same study before and after this one (whichever module asks first
    builds it), so the run it logged is kept in TINY_ENSEMBLE_RUN instead of being found as the newest.
    """
    from emnist_exp import ensemble
    from emnist_exp.tracking import models, queries

    before = {r.info.run_id for r in queries.study_runs(tiny_study["study"], "ensemble")}
    assert ensemble.main(["--top", "3", "--study", tiny_study["study"]]) == 0
    (logged,) = [r.info.run_id for r in queries.study_runs(tiny_study["study"], "ensemble")
                 if r.info.run_id not in before]
    version = models.latest_version(models.ENSEMBLE_MODEL)
    TINY_ENSEMBLE_RUN[version] = logged
    return version
