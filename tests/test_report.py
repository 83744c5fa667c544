"""`python -m emnist_exp.report`: the markdown and plots land in the study's parent run, the table on stdout."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow  # each test here trains a study, starts a server or runs a script
PLOTS = {"hyperparameters.png", "augmentation.png", "batch_norm.png", "ensemble_vs_members.png"}


@pytest.fixture(scope="module")
def report(tiny_ensemble, tmp_path_factory) -> dict:
    """Run the report once on the tiny study; hand back what it printed and what it logged."""
    import mlflow

    from emnist_exp import report as entry
    from emnist_exp.tracking import queries

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # capsys is per test; this fixture is per module
        code = entry.main(["--study", "tiny"])
    parent = queries.study_runs("tiny", "study")[0]
    folder = tmp_path_factory.mktemp("report")
    local = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="report", dst_path=str(folder))
    return {"code": code, "stdout": stdout.getvalue(), "folder": Path(local),
            "trials": queries.study_runs("tiny", "trial"), "ensembles": queries.study_runs("tiny", "ensemble")}


def test_report_and_plots_are_logged_to_the_parent_run(report):
    assert report["code"] == 0
    names = {p.name for p in report["folder"].iterdir()}
    assert names == PLOTS | {"report.md"}
    for name in PLOTS:
        with Image.open(report["folder"] / name) as image:
            assert image.format == "PNG" and image.width > 200 and image.height > 200
    markdown = (report["folder"] / "report.md").read_text()
    for name in PLOTS:
        assert f"]({name})" in markdown, f"report.md does not show {name}"


def test_markdown_lists_every_trial_with_its_accuracies(report):
    markdown = (report["folder"] / "report.md").read_text()
    assert markdown.startswith("# Study `tiny`")
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
    trials = report["trials"]
    assert len(trials) == 3
    for run in trials:
        number = run.data.tags["optuna.trial_number"]
        row = next(r for r in rows if r.startswith(f"| {number} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == run.data.tags["optuna.state"]
        assert cells[2] == run.data.tags["arch"]
        assert cells[3] == run.data.tags["aug"] and cells[4] == run.data.tags["bn"]
        assert cells[-2] == f"{run.data.metrics['val_accuracy']:.4f}"
        assert cells[-1] == f"{run.data.metrics['test_accuracy']:.4f}"


def test_markdown_and_stdout_show_the_ensemble_and_the_on_off_comparisons(report):
    markdown = (report["folder"] / "report.md").read_text()
    ensemble = report["ensembles"][0]
    for text in (markdown, report["stdout"]):
        assert ensemble.info.run_name in text
        assert f"{ensemble.data.metrics['test_accuracy']:.4f}" in text
    assert "## Augmentation: off against on" in markdown and "## Batch norm: off against on" in markdown
    complete = [r for r in report["trials"] if r.data.tags["optuna.state"] == "COMPLETE"]
    on = [r.data.metrics["val_accuracy"] for r in complete if r.data.tags["aug"] == "on"]
    if on:  # the group table's mean is the mean of the runs' own numbers
        assert f"| on | {len(on)} | {sum(on) / len(on):.4f} |" in markdown
    header = report["stdout"].splitlines()[0].split()
    assert header[:5] == ["trial", "state", "arch", "aug", "bn"] and header[-2:] == ["val_acc", "test_acc"]
    assert "report/report.md" in report["stdout"]


def test_unknown_study_is_one_sentence(tiny_study, capsys):
    from emnist_exp import report as entry

    assert entry.main(["--study", "no-such-study"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no-such-study" in err and len(err.splitlines()) == 1


def test_reporting_builds_the_tables_and_markdown_without_a_store():
    """The report's rows, tables and markdown are plain functions of the rows: a test calls them directly."""
    from emnist_exp import reporting

    trials = [{"trial": 0, "state": "COMPLETE", "arch": "cnn", "augment": False, "batch_norm": True, "dropout": 0.4,
               "val_accuracy": 0.81, "test_accuracy": 0.80},
              {"trial": 1, "state": "COMPLETE", "arch": "vgg5", "augment": True, "batch_norm": True, "dropout": 0.2,
               "val_accuracy": 0.85, "test_accuracy": 0.84},
              {"trial": 2, "state": "FAIL", "arch": "cnn", "augment": False, "batch_norm": False, "dropout": 0.1,
               "val_accuracy": float("nan"), "test_accuracy": float("nan")}]
    header, rows = reporting.summary(trials)
    assert header[0] == "trial" and len(rows) == 3 and rows[1][header.index("val_acc")] == "0.8500"
    assert [r["trial"] for r in reporting.complete(trials)] == [0, 1]
    assert set(reporting.varied(reporting.complete(trials))) == {"arch", "augment", "dropout"}
    grouped = reporting.groups(reporting.complete(trials), "augment")
    assert grouped["on"]["val"] == [0.85] and grouped["off"]["val"] == [0.81]
    text = reporting.markdown("s", trials, [], [], parents=1)
    assert "# Study `s`" in text and "2 complete, 1 fail" in text and "No ensemble yet" in text
