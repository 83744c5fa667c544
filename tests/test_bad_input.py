"""Bad settings and names where they enter: one sentence, a non-zero exit, nothing made the user did not ask for.

The stores' settings (MLFLOW_TRACKING_URI, the Optuna storage) are checked before any study, run or
data folder exists; names and split expressions where they are read. Real stores throughout: SQLite
files, the PostgreSQL server of EMNIST_TEST_POSTGRES, real tfds builders.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
DATASET = "synthetic:600"
SECRET = "Sekr3t/pa@ss%2Fw:rd"  # / : @ and a percent-escape: every part of a URL a password can break
PG_ENV = "EMNIST_TEST_POSTGRES"


def one_error_line(capfd) -> str:
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_refuses(capfd, tmp_path: Path, *args: str) -> str:
    """`train` with these flags exits 2 with one sentence, before its data folder or Optuna storage exists."""
    from emnist_exp import train

    data_dir, optuna_db = tmp_path / "tfds-untouched", tmp_path / "optuna-untouched.db"
    flags = {"--dataset": DATASET, "--data_dir": str(data_dir), "--storage": f"sqlite:///{optuna_db}",
             "--n_trials": "1", "--epochs": "1", "--study": "bad-input"}
    given = dict(zip(args[::2], args[1::2]))
    code = train.main([item for pair in {**flags, **given}.items() for item in pair])
    line = one_error_line(capfd)
    assert code == 2, line
    assert not data_dir.exists(), "the dataset was read before the settings were checked"
    assert not optuna_db.exists(), "an Optuna storage was created before the settings were checked"
    return line


# ---- names and splits -------------------------------------------------------------------------------------


def test_a_study_name_too_long_for_the_stores_is_refused_before_anything_exists(workdir, capfd, tmp_path):
    import mlflow

    name = "s" * 300
    line = train_refuses(capfd, tmp_path, "--study", name)
    assert "study must be at most 200 bytes long" in line and "got 300" in line
    assert mlflow.get_experiment_by_name(name) is None
    client = mlflow.MlflowClient()
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`optuna.study` = '{name}'")


def test_an_idx_images_file_that_is_a_folder_is_one_sentence(tmp_path):
    from idxfiles import write_idx_folder

    from emnist_exp import data
    from emnist_exp.errors import UserError

    folder = write_idx_folder(tmp_path / "f")
    images = Path(folder) / "emnist-bymerge-test-images-idx3-ubyte.gz"
    images.unlink()
    images.mkdir()
    with pytest.raises(UserError, match=r"emnist-bymerge-test-images-idx3-ubyte.gz is a folder, not an EMNIST IDX"):
        data.open_source(f"idx:{folder}", data_dir=str(tmp_path / "tfds"))
    assert not (tmp_path / "tfds").exists()


def test_evaluate_checks_every_split_of_an_expression(workdir, tmp_path, capfd):
    """`test[:10]+nosuch[:5]` parses; its second split does not exist, and that is said before a model loads."""
    from idxfiles import write_idx_folder

    from emnist_exp import evaluate

    folder = write_idx_folder(tmp_path / "f")
    args = ["--model", "runs:/no-such-run/model", "--dataset", f"idx:{folder}", "--data_dir", str(tmp_path / "tfds")]
    assert evaluate.main([*args, "--split", "test[:10]+nosuch[:5]"]) == 2
    assert "has no 'nosuch' split (it has: test, train)" in one_error_line(capfd)
    assert evaluate.main([*args, "--split", "test[:2]+train[:1]"]) == 2  # a good expression: on to the model
    assert "cannot load model runs:/no-such-run/model" in one_error_line(capfd)


def test_an_unknown_emnist_config_names_the_configs_there_are(tmp_path):
    from emnist_exp import data
    from emnist_exp.errors import UserError

    with pytest.raises(UserError) as caught:
        data.open_source("emnist/nosuch", data_dir=str(tmp_path / "tfds"))
    sentence = str(caught.value)
    assert sentence.endswith(".") and not sentence.rstrip(".").endswith(":"), sentence
    assert "balanced, byclass, bymerge, digits, letters, mnist" in sentence, sentence


# ---- entry points' flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("runs", [",,,", "", " , "])
def test_ensemble_runs_naming_no_run_is_refused(workdir, capfd, runs):
    """Not the latest study instead: the user asked for runs by id and named none."""
    from emnist_exp import ensemble

    assert ensemble.main(["--runs", runs, "--no-register"]) == 2
    assert f"--runs {runs!r} names no run ids" in one_error_line(capfd)


def test_predict_on_a_folder_says_it_is_a_folder(tmp_path, capfd):
    from emnist_exp import predict

    assert predict.main([str(tmp_path)]) != 0
    line = one_error_line(capfd)
    assert f"{tmp_path} is a folder, not an image file" in line and "no such file" not in line


def test_preparing_a_data_folder_leaves_no_lock_file_behind(tmp_path):
    """One lock file per tfds folder, removed by its holder; a second holder still waits for the first."""
    import fcntl
    import tempfile
    import threading

    from emnist_exp import data

    before = set(Path(tempfile.gettempdir()).glob("emnist_exp-prepare-*.lock"))
    entered, order = threading.Event(), []

    def second():
        entered.wait()
        with data.preparation_lock(str(tmp_path)):
            order.append("second")

    waiter = threading.Thread(target=second)
    with data.preparation_lock(str(tmp_path)):
        (held,) = set(Path(tempfile.gettempdir()).glob("emnist_exp-prepare-*.lock")) - before
        waiter.start()
        entered.set()
        waiter.join(timeout=1)
        assert waiter.is_alive(), "the second holder did not wait for the first"
        order.append("first")
        with open(held) as probe:  # held: no one else can take it
            with pytest.raises(BlockingIOError):
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    waiter.join(timeout=30)
    assert order == ["first", "second"]
    assert set(Path(tempfile.gettempdir()).glob("emnist_exp-prepare-*.lock")) - before == set()


def test_the_readmes_rest_example_answers_with_the_served_fields():
    """The README's example response has the fields, in the order, the ensemble's predict returns."""
    import json
    import re

    from emnist_exp import serving

    readme = (ROOT / "README.md").read_text()
    answer = re.search(r"\$ curl -s http://127.0.0.1:5001/invocations.*\n(\{.*\})\n", readme)
    assert answer, "no REST example in the README"
    rows = json.loads(answer.group(1))["predictions"]
    served = serving.ranked_frame(np.array([[0.1, 0.9], [0.8, 0.2]]), ("a", "b"), top_k=1)
    assert [list(row) for row in rows] == [list(served.columns)] * len(rows)


@pytest.mark.parametrize("images, says", [
    (np.full((1, 28, 28), np.nan), "got NaN or infinity"),
    (np.full((1, 28, 28), -1.0), "got values from -1 to -1"),
    (np.full((1, 28, 28), 256, np.int64), "got values from 256 to 256"),
    (np.ones((1, 28, 28), bool), "got booleans"),
    (np.full((1, 28, 28), "7"), "got values of type <U1"),
])
def test_pixels_outside_the_model_contract_are_refused(images, says):
    """What serving, predict and evaluate give a model: 0-255 (or 0-1 floats); the rest has no brightness."""
    from emnist_exp import serving

    with pytest.raises(ValueError, match=f"pixels must be numbers from 0 to 255 \\(or floats from 0 to 1\\), {says}"):
        serving.to_pixels(images)
    np.testing.assert_array_equal(serving.to_pixels(np.full((1, 28, 28), 0.5)), np.full((1, 28, 28, 1), 127.5))
    np.testing.assert_array_equal(serving.to_pixels(np.full((1, 28, 28), 200, np.uint8)), np.full((1, 28, 28, 1), 200))


# ---- the Optuna storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:x?mode=memory&uri=true"])
def test_an_in_memory_optuna_storage_is_refused(workdir, capfd, tmp_path, storage):
    line = train_refuses(capfd, tmp_path, "--storage", storage)
    assert "is an in-memory SQLite database, which is lost when this process exits" in line


def test_an_optuna_storage_in_a_missing_folder_is_refused_and_not_made(workdir, capfd, tmp_path):
    folder = tmp_path / "no" / "such"
    line = train_refuses(capfd, tmp_path, "--storage", f"sqlite:///{folder / 'optuna.db'}")
    assert f"is in the folder {folder}, which does not exist" in line
    assert not (tmp_path / "no").exists()


def admin_sql(url: str, *statements: str) -> None:
    """Run statements on the test server outside a transaction (CREATE DATABASE cannot run inside one)."""
    import sqlalchemy as sa

    from emnist_exp.storage import storage_url

    engine = sa.create_engine(storage_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        for statement in statements:
            conn.execute(sa.text(statement))
    engine.dispose()


@pytest.fixture
def pg_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(f"{PG_ENV} is not set: point it at a PostgreSQL database for the tests that need a server")
    return url


@pytest.fixture
def pg_role_with_database(pg_url):
    """A fresh role and a database of the same name, which PostgreSQL opens for it when a URL names none."""
    from sqlalchemy.engine import make_url

    name = f"emnist_ci_{uuid.uuid4().hex[:10]}"
    admin_sql(pg_url, f'CREATE ROLE "{name}" LOGIN', f'CREATE DATABASE "{name}" OWNER "{name}"')
    yield make_url(pg_url).set(username=name, password=None, database=name)
    admin_sql(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'DROP ROLE IF EXISTS "{name}"')


def test_a_postgresql_storage_naming_no_database_is_refused(workdir, capfd, tmp_path, pg_role_with_database):
    """`postgresql://user@host/` would put Optuna's tables in the user's own database."""
    import sqlalchemy as sa

    from emnist_exp.storage import storage_url

    bare = pg_role_with_database.set(database="").render_as_string(hide_password=False)
    assert bare.endswith("/")
    line = train_refuses(capfd, tmp_path, "--storage", bare)
    assert "names no database" in line
    engine = sa.create_engine(storage_url(pg_role_with_database.render_as_string(hide_password=False)))
    with engine.connect() as conn:
        tables = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).all()
    engine.dispose()
    assert tables == [], "Optuna's tables were written into the role's own database"



# ---- the MLflow tracking store --------------------------------------------------------------------------


@pytest.fixture
def tracking_uri(workdir):
    """Set this process's MLflow tracking URI (and MLFLOW_TRACKING_URI, which MLflow sets with it) for one test."""
    import mlflow

    before = mlflow.get_tracking_uri()
    yield mlflow.set_tracking_uri
    mlflow.set_tracking_uri(before)


@pytest.mark.parametrize("uri, says", [
    ("http://127.0.0.1:{closed}", "does not answer (Connection refused)"),  # MLflow itself retries for minutes
    ("foo://bar", "has the scheme 'foo', which MLflow has no store for"),
])
def test_a_tracking_uri_mlflow_cannot_reach_is_one_sentence(capfd, tmp_path, tracking_uri, uri, says):
    tracking_uri(uri.replace("{closed}", str(free_port())))
    line = train_refuses(capfd, tmp_path)
    assert line.startswith("error: MLFLOW_TRACKING_URI ") and says in line, line


def test_a_tracking_database_that_does_not_exist_is_one_sentence(capfd, tmp_path, tracking_uri, pg_url):
    from sqlalchemy.engine import make_url

    tracking_uri(make_url(pg_url).set(database="emnist_no_such_db", password=SECRET).render_as_string(
        hide_password=False))
    line = train_refuses(capfd, tmp_path)
    assert "MLFLOW_TRACKING_URI" in line and 'database "emnist_no_such_db" does not exist' in line, line
    assert "Sekr3t" not in line and "***" in line


def test_a_tracking_store_in_a_missing_folder_is_refused_and_not_made(capfd, tmp_path, tracking_uri):
    """sqlite:////<missing>/dir/m.db: the folders are the user's to make, here at the root of the file system."""
    from emnist_exp import stores

    top = Path(f"/emnist-no-such-{uuid.uuid4().hex[:8]}")
    tracking_uri(f"sqlite:///{top / 'dir' / 'm.db'}")
    line = train_refuses(capfd, tmp_path)
    assert f"MLFLOW_TRACKING_URI sqlite:///{top}/dir/m.db is in the folder {top}/dir, which does not exist" in line
    assert stores.main(["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]) == 2
    assert "which does not exist" in one_error_line(capfd)
    assert not top.exists()


@pytest.mark.slow  # MLflow creates its tables in a fresh PostgreSQL database: seconds, not the fast tier's
def test_a_password_in_the_tracking_uri_is_never_printed(capfd, tmp_path, tracking_uri, pg_url):
    """The stores' "ready" line and ensemble's sentences name the tracking store, with its password hidden."""
    from sqlalchemy.engine import make_url

    from emnist_exp import ensemble, stores

    name = f"emnist_ci_{uuid.uuid4().hex[:10]}"
    admin_sql(pg_url, f'CREATE DATABASE "{name}"')
    try:
        tracking_uri(make_url(pg_url).set(database=name, password=SECRET).render_as_string(hide_password=False))
        assert stores.main(["--storage", f"sqlite:///{tmp_path / 'optuna.db'}"]) == 0
        out, err = capfd.readouterr()
        assert "are ready" in out and f"postgres:***@127.0.0.1:5432/{name}" in out, out + err
        assert "Sekr3t" not in out + err
        for args, says in [(["--runs", "garbage"], "there is no run garbage in the tracking store"),
                           (["--experiment", "nosuch"], "there is no experiment 'nosuch' in the tracking store")]:
            assert ensemble.main([*args, "--no-register"]) == 2
            line = one_error_line(capfd)
            assert says in line and "postgres:***@" in line and "Sekr3t" not in line, line
    finally:
        admin_sql(pg_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_redact_hides_the_password_of_every_kind_of_url():
    from emnist_exp.redaction import redact

    for url in [f"http://user:{SECRET.replace('@', '%40')}@mlflow.example:5000",
                "https://user:Sekr3t@mlflow.example/#/experiments/1",
                "https://mlflow.example/api?token=Sekr3t&x=1",
                "postgresql://postgres:Sekr3t@127.0.0.1/mlflow"]:
        assert "Sekr3t" not in redact(url) and "***" in redact(url), redact(url)
    shown = redact("https://user:Sekr3t@mlflow.example/#/experiments/1")
    assert shown == "https://user:***@mlflow.example/#/experiments/1"
    assert redact("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
