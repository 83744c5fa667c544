"""Smoke versions of the benchmark scripts: they run and print a table of real numbers."""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import mlflow
import numpy as np
import pytest

from conftest import TINY_ENSEMBLE_RUN
from emnist_exp.tracking import students

pytestmark = pytest.mark.slow  # each test here trains a study, starts a server or runs a script
ROOT = Path(__file__).resolve().parent.parent


def run_script(name: str, *args: str) -> str:
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                         timeout=600, env=os.environ.copy())
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_pipeline_benchmark_smoke(workdir):
    out = run_script("pipeline.py", "--smoke", "--dataset", "synthetic:600")
    rows = re.findall(r"^(\S.*?)\s{2,}([\d,]+) images/s\s+([\d.]+)x$", out, flags=re.M)
    assert len(rows) == 4, out
    rates = {name: float(rate.replace(",", "")) for name, rate, _ in rows}
    assert all(v > 0 for v in rates.values())
    # Ratios within one run, never absolute timings: the pipeline outpaces the model it feeds.
    training = rates["training (seed CNN, batch 128)"]
    assert rates["pipeline, augmentation off"] > training
    assert rates["pipeline, augmentation off"] > rates["pipeline, augmentation on + elastic 0.3"]


def table(text: str) -> dict[str, str]:
    return dict(re.findall(r"^(\S.*?)\s{2,}(\S.*)$", text, flags=re.M))


def test_accuracy_benchmark_smoke(workdir, tmp_path):
    """The protocol's two commands for real (mlflow run, then the ensemble), cut to two tiny trials."""
    rows = table(run_script("accuracy.py", "--smoke", "--workdir", str(tmp_path)))
    assert rows["members (strategy soft)"] == "2"
    percent = {k: float(v.rstrip("%")) for k, v in rows.items() if v.endswith("%")}
    # The table's numbers are those of the ensemble run the protocol logged in its own store.
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    (logged,) = client.search_runs(experiments, "tags.`emnist.role` = 'ensemble' and params.n_members = '2'",
                                   order_by=["attributes.start_time ASC"], max_results=1)
    m = logged.data.metrics
    best = max(range(2), key=lambda i: m[f"member_{i}_val_accuracy"])
    assert percent["ensemble test accuracy"] == round(100 * m["test_accuracy"], 2)
    assert percent["best member by validation: test accuracy"] == round(100 * m[f"member_{best}_test_accuracy"], 2)
    assert percent["best member test accuracy (any member)"] == round(
        100 * max(m["member_0_test_accuracy"], m["member_1_test_accuracy"]), 2)
    # Ratios within one run: the logged predictions assemble faster than re-inference
    assert float(rows["assembly with --reinfer"].split()[0]) > float(rows["assembly from logged predictions"].split()[0])
    assert (tmp_path / "mlflow.db").exists() and (tmp_path / "optuna.db").exists()


def test_memory_benchmark_smoke(workdir, tmp_path):
    """The user's path at toy size: official-layout folders built by repeating a source, then damaged copies."""
    from idxfiles import random_split, write_idx_folder

    splits = {"train": random_split(600, seed=1), "test": random_split(60, seed=2)}
    source = write_idx_folder(tmp_path / "source", splits=splits)
    out = run_script("memory.py", "--smoke", "--sample", str(source))
    rows = re.findall(r"^(\S.*?)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d.]+)x$", out, flags=re.M)
    assert [r[0] for r in rows] == ["300 images", "the source x3"], out
    assert [int(r[1].replace(",", "")) for r in rows] == [270, 1620]  # train after carving validation
    assert all(float(cell.replace(",", "")) > 100 for r in rows for cell in r[2:5])  # a real process's RSS, in MB
    epoch_mb = [float(r[4].replace(",", "")) for r in rows]
    assert all(abs(float(r[5]) - mb / epoch_mb[0]) < 0.01 for r, mb in zip(rows, epoch_mb))  # each against the first
    growth = re.findall(r"^(\S.*?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)x\s+([\d.]+)\s+([\d.]+)x$",
                        out, flags=re.M)
    assert [float(g[1]) for g in growth] == [1.0, 6.0], out
    sentences = dict(re.findall(r"^(truncated images file|wrong count|label out of range)\s+(.*)$", out, flags=re.M))
    images, labels = "emnist-bymerge-train-images-idx3-ubyte.gz", "emnist-bymerge-train-labels-idx1-ubyte.gz"
    assert sentences == {
        "truncated images file": f"{images} is truncated: its gzip stream ends early.",
        "wrong count": f"{images} holds 300 images but {labels} holds 299 labels.",
        "label out of range": f"{labels} holds label 47, which emnist-bymerge-mapping.txt does not list.",
    }, out


def test_tfds_emnist_benchmark_smoke(workdir):
    """On tfds.testing.mock_data (said so in its table): read_split outpaces tfds' per-record path."""
    out = run_script("tfds_emnist.py", "--smoke")
    assert "tfds.testing.mock_data" in out.splitlines()[0]
    rates = {name: float(rate.replace(",", "")) for name, rate in
             re.findall(r"^(\S.*?)\s{2,}([\d,]+)\s+[\d.]+x$", out, flags=re.M)}
    assert set(rates) == {"training (seed CNN, batch 128), before", "training (seed CNN, batch 128), after",
                          "pipeline, tfds as_dataset", "pipeline, read_split"}, out
    assert rates["pipeline, read_split"] > rates["pipeline, tfds as_dataset"]


def test_strategies_benchmark_cross_fits_on_validation(tiny_study):
    out = run_script("strategies.py", "--study", tiny_study["study"], "--top", "3", "--pool", "3")
    names = r"best member|soft|hard|weighted|greedy|oracle \(any member\)"
    found = re.findall(rf"^({names})\s+([\d.]+)\s+([\d.]+)$", out, flags=re.M)
    rows = {name: (float(val), float(test)) for name, val, test in found}
    assert set(rows) == {"best member", "soft", "hard", "weighted", "greedy", "oracle (any member)"}, out
    # Test columns recomputed here from the members' logged predictions.
    from emnist_exp import voting
    from emnist_exp.tracking import queries, results

    runs = queries.finished_trials(study=tiny_study["study"])  # 3, or more when test_train added one
    assert f"{len(runs)} finished trials" in out and "2-fold cross-fitted" in out
    preds = [results.load_predictions(r.info.run_id) for r in runs[:3]]
    (val, val_labels), (test, labels) = voting.stack(preds, "val"), voting.stack(preds, "test")
    best = int(np.argmax([voting.accuracy(p, val_labels) for p in val]))
    oracle = (test.argmax(axis=2) == labels).any(axis=0).mean()
    expected = {"best member": voting.accuracy(test[best], labels), "oracle (any member)": oracle,
                "soft": voting.accuracy(voting.soft_vote(test), labels)}
    assert {name: rows[name][1] for name in expected} == {k: round(v, 4) for k, v in expected.items()}, out


def test_time_to_accuracy_benchmark_smoke(workdir):
    """Both recipes train, in one run, with a clock that stops while they are evaluated."""
    out = run_script("time_to_accuracy.py", "--smoke")
    target = float(re.search(r"^target: the seed recipe's final val accuracy ([\d.]+)$", out, flags=re.M).group(1))
    rows = {m[0]: m[1:] for m in re.findall(r"^\s+(seed recipe|best recipe)\s+([\d,]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)"
                                             r"\s+([\d.]+)\s+([\d.]+)\s+([\d.]+|not reached)", out, flags=re.M)}
    assert set(rows) == {"seed recipe", "best recipe"}, out
    seed = rows["seed recipe"]
    assert float(seed[3]) == target  # the target is the seed recipe's own final validation accuracy
    assert seed[6] != "not reached" and float(seed[6]) <= float(seed[5])  # reached within its training time
    assert re.search(r"^speed-up to target: ([\d.]+x|not reached by the best recipe)$", out, flags=re.M), out
    assert "best recipe: vgg5-32, onecycle" in out
    rates = re.search(r"^training rate \(seed CNN, batch 128\): ([\d,]+) / ([\d,]+) / ([\d,]+) images/s", out, re.M)
    assert rates and all(float(r.replace(",", "")) > 0 for r in rates.groups())


def test_members_benchmark_smoke(workdir, tmp_path):
    """One member of each architecture through the train and ensemble commands, then the graph against the pyfunc."""
    out = run_script("members.py", "--smoke", "--workdir", str(tmp_path))
    members = re.findall(r"^(cnn|resnet|vgg5)-(\d+)\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)  ([\d. ]+)$", out, re.M)
    assert [m[0] for m in members] == ["cnn", "resnet", "vgg5"], out
    assert all(len(m[6].split()) == 1 for m in members)  # one epoch each in the smoke run
    assert re.search(r"^soft ensemble\s+[\d.]+\s+[\d.]+", out, re.M)
    graph = re.findall(r"^graph, (\.keras|SavedModel).*?([\d,]+) images/s\s+([\d.]+)x\s+max \|score - pyfunc\| "
                       r"([\d.e+-]+), same class ([\d.]+)%$", out, re.M)
    assert [g[0] for g in graph] == [".keras", "SavedModel"], out
    assert all(float(g[3]) <= 2.0**-11 for g in graph)  # float16's step below 1: the pyfunc's own rounding

def test_own_images_benchmark_smoke(tiny_study, sample_dir):
    """Every condition and the lines, on a few sample test images, with a tiny study's trial model."""
    from emnist_exp.tracking import queries

    run = queries.finished_trials(study=tiny_study["study"])[0]
    out = run_script("own_images.py", "--smoke", "--model", f"runs:/{run.info.run_id}/model",
                     "--sample", str(sample_dir))
    rows = re.findall(r"^(\S.*?)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+) points$", out, flags=re.M)
    assert len(rows) == 13, out  # 12 conditions and their mean
    assert all(0 <= float(stored) <= 1 and 0 <= float(converted) <= 1 for _, stored, converted, _ in rows)
    assert len({stored for _, stored, _, _ in rows}) == 1  # one as-stored accuracy, the same images throughout
    lines = table(out)
    found, total = lines["lines with every character found (none merged or split)"].split(" of ")
    assert int(total) == 4 and 0 <= int(found) <= 4
    assert re.match(r"^\d+ / \d+$", lines["characters in lines / segments found"])
    assert "EMNIST train" in out and "stroke width >127" in out


def test_own_images_ceiling_smoke(tiny_study, sample_dir):
    """The view-averaging and fine-tune probes run on a few images and print one row each, with real numbers."""
    from emnist_exp.tracking import queries

    run = queries.finished_trials(study=tiny_study["study"])[0]
    out = run_script("own_images_ceiling.py", "--smoke", "--model", f"runs:/{run.info.run_id}/model",
                     "--sample", str(sample_dir))
    rows = re.findall(r"^(\S.*?)\s+([\d.]+)\s+([\d.]+)\s+([+-][\d.]+)\s+([+-][\d.]+)\s+(\d+) of 12\s+([+-][\d.]+) (.+)$",
                      out, flags=re.M)
    assert [r[0] for r in rows] == [
        "the trial model, frame_character (own_images.py)",
        "scores averaged over 3 sizes at NIST scale (56 / 64 / 72 px)",
        "scores averaged over 3 rotations (-4 / 0 / +4 degrees)",
        "scores averaged over 3 blurs (sigma x0.8 / x1 / x1.25)",
        "fine-tuned 1 epoch on stored train images",
        "fine-tuned 1 epoch, half of them round trips",
    ], out
    for name, stored, converted, change, _, _, worst, condition in rows:
        assert 0 <= float(stored) <= 1 and 0 <= float(converted) <= 1
        assert abs(100 * (float(converted) - float(stored)) - float(change)) < 0.02  # the change is the two columns'
        assert float(worst) <= float(change) and condition in own_images_conditions()
    assert len({r[1] for r in rows[:4]}) == 1  # view averaging leaves the model, and its as-stored accuracy, alone


def own_images_conditions() -> set[str]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import own_images

    return set(own_images.CONDITIONS)


def test_precision_benchmark_smoke(workdir):
    """Both policies through the real pipeline code in one run, FLOP/s from layer shapes, paired test accuracy."""
    from emnist_exp import precision

    out = run_script("precision.py", "--smoke")
    rates = re.search(r"^cnn-32\s+32\s+([\d,]+) \[[\d,-]+\]\s+([\d,]+) \[[\d,-]+\]\s+([\d.]+) \[[\d.-]+\]x\s+not run$",
                      out, re.M)
    assert rates, out
    f32, bf16, ratio = (float(g.replace(",", "")) for g in rates.groups())
    assert f32 > 0 and bf16 > 0 and ratio > 0
    flops = re.search(r"^cnn-32\s+32\s+([\d.]+)\s+([\d.]+)\s+(\d+)%\s+([\d.]+)\s+(\d+)%$", out, re.M)
    assert flops and 80 < float(flops.group(1)) < 100, out  # the seed CNN: ~30 MFLOP forward, x3 to train
    assert re.search(r"^peak assumed: \d+ GFLOP/s float32 \(2 cores x [\d.]+ GHz x 32 FLOP/cycle", out, re.M), out
    accuracy = re.findall(r"^(cnn-32|vgg5-24)\s+([\d.]+) \+- ([\d.]+)\s+([\d.]+) \+- ([\d.]+)\s+([+-][\d.]+) \+- "
                          r"([\d.]+)\s+(yes|no)$", out, re.M)
    assert [a[0] for a in accuracy] == ["cnn-32", "vgg5-24"], out
    for _, a, _, b, _, diff, paired, within in accuracy:
        assert abs(float(b) - float(a) - float(diff)) < 2e-4  # the difference is the two columns'
        # The verdict is on unrounded values: where |diff| and the SE print alike (0.0200 and 0.0200), either is right.
        if abs(abs(float(diff)) - float(paired)) >= 1e-4:
            assert within == ("yes" if abs(float(diff)) <= float(paired) else "no")
    verdict = re.search(r"^bf16 / float32 over the members and batches: median ([\d.]+)x .*; pays \(>= 1.3x\): (yes|no)$",
                        out, re.M)
    assert verdict and verdict.group(2) == ("yes" if float(verdict.group(1)) >= precision.PAYS else "no"), out
    auto = precision.choose(precision.gpu_capabilities(), precision.cpu_flags())
    assert f"auto on this machine: {auto}" in out


def test_preemption_benchmark_smoke(workdir):
    """A trial stopped halfway by SIGTERM is resumed by a second worker, and the table says what it cost."""
    out = run_script("preemption.py", "--smoke")
    rows = table(out)
    assert "resumes from epoch 2 of 2" in out, out
    seconds = {k: float(v.removesuffix(" s")) for k, v in rows.items() if v.endswith(" s")}
    assert all(seconds[k] > 0 for k in ("uninterrupted worker, wall", "one epoch (uninterrupted, mean of epochs 2 on)",
                                        "restart: second worker's start to its resume line"))
    # Without augmentation the resumed fit repeats the uninterrupted one.
    assert abs(float(rows["val accuracy, uninterrupted"]) - float(rows["val accuracy, preempted and resumed"])) <= 0.005


def test_distill_benchmark_smoke(tiny_ensemble, workdir, tmp_path):
    """Distil the session's tiny ensemble for real, in a copy of the session's stores; the table says the data is a
    stand-in. The copy keeps this student out of the session's registry, which other tests count; the train and
    ensemble commands that the script runs before distilling are the ones the rest of the suite runs."""
    for name in ("mlflow.db", "optuna.db"):
        with closing(sqlite3.connect(workdir / name)) as source, closing(sqlite3.connect(tmp_path / name)) as copy:
            source.backup(copy)  # consistent even with the session's own connections open
    run_id = TINY_ENSEMBLE_RUN[tiny_ensemble]
    out = run_script("distill.py", "--smoke", "--workdir", str(tmp_path), "--ensemble", run_id)
    assert "synthetic: a stand-in, not EMNIST" in out, out
    assert f"teacher: ensemble run {run_id}, already in the stores" in out, out
    rows = re.findall(r"^(ensemble graph \(soft x3\)|best member by validation|student cnn-16)\s+([\d.]+)\s+([\d.]+)"
                      r"\s+([\d,]+)\s*([\d,]*)\s*([\d.]*)x?$", out, flags=re.M)
    assert [r[0] for r in rows] == ["ensemble graph (soft x3)", "best member by validation", "student cnn-16"], out
    ensemble, member, student = rows
    assert all(0 <= float(r[1]) <= 1 and 0 <= float(r[2]) <= 1 for r in rows)
    assert int(student[3].replace(",", "")) < int(ensemble[3].replace(",", ""))  # one net against three
    assert ensemble[5] == "1.00" and float(student[4].replace(",", "")) > 0  # rates measured in this run
    assert re.search(r"^student - ensemble \(test\): [+-][\d.]+ points; student - best member \(test\): "
                     r"[+-][\d.]+ points$", out, flags=re.M), out
    # The student went into the copy's registry, not the session's.
    def distilled_versions(folder: Path) -> int:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
        return len(client.search_model_versions(f"name = '{students.DISTILLED_MODEL}'"))

    assert distilled_versions(tmp_path) == distilled_versions(workdir) + 1
