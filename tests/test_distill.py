"""Distillation: the tiny study's ensemble distilled into one student, logged, registered, served; bad input."""

from __future__ import annotations

import contextlib
import io
import json
import urllib.request

import mlflow
import numpy as np
import pytest
from PIL import Image

from emnist_exp import distill, evaluate, predict, serving
from test_serving import characters, mlflow_serve


# ---- the loss and the pipeline on hand-made numbers ----------------------------------------------


def test_the_loss_is_alpha_t2_kl_plus_cross_entropy_and_plain_ce_on_validation():
    from emnist_exp import soft_targets

    rng = np.random.default_rng(0)
    student_p, teacher_p = rng.dirichlet(np.ones(5), 8), rng.dirichlet(np.ones(5), 8)
    hot = np.eye(5)[rng.integers(0, 5, 8)]
    t, alpha = 3.0, 0.7

    def tempered(p):
        z = np.exp(np.log(p) / t)
        return z / z.sum(axis=1, keepdims=True)

    kl = np.sum(tempered(teacher_p) * np.log(tempered(teacher_p) / tempered(student_p)), axis=1)
    ce = -np.sum(hot * np.log(student_p), axis=1)
    loss = soft_targets.DistillationLoss(5, t, alpha)
    both = np.concatenate([hot, teacher_p], axis=1).astype(np.float32)
    assert float(loss(both, student_p.astype(np.float32))) == pytest.approx(np.mean(alpha * t * t * kl
                                                                                    + (1 - alpha) * ce), rel=1e-4)
    assert float(loss(hot.astype(np.float32), student_p.astype(np.float32))) == pytest.approx(np.mean(ce), rel=1e-4)


def test_each_soft_target_stays_with_its_image_through_shuffle_and_batches():
    import tensorflow as tf

    from emnist_exp import pipelines, soft_targets

    n = 40
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 28, 28, 1), np.uint8)
    labels = np.arange(n) % 5
    targets = np.eye(n, dtype=np.float16)  # example i's target names i
    train = tf.data.Dataset.from_tensor_slices((images, labels))
    paired = soft_targets.Teacher(targets).paired(train)
    for x, y in pipelines.training_pipeline(paired, num_classes=5, batch_size=8, seed=3, shuffle_buffer=40,
                                            epochs=range(2)).as_numpy_iterator():
        index = x[:, 0, 0, 0].astype(int)
        assert y.shape == (8, 5 + n)
        np.testing.assert_array_equal(y[:, :5].argmax(axis=1), labels[index])
        np.testing.assert_array_equal(y[:, 5:].argmax(axis=1), index)


# ---- on the tiny study's ensemble ---------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tiny_ensemble) -> dict:
    """The tiny study's latest ensemble distilled for one epoch; what it printed and the run it logged."""
    from emnist_exp.tracking import models, queries

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        # A small seed CNN, not the best member's recipe: any architecture will do, and it trains fastest.
        code = distill.main(["--study", "tiny", "--arch", "cnn", "--width", "16", "--epochs", "1",
                             "--precision", "float32"])
    assert code == 0
    (run,) = queries.study_runs("tiny", "distilled")
    version = models.latest_version("emnist-distilled")
    return {"stdout": out.getvalue(), "run": run, "version": version,
            "teacher": queries.latest_ensemble("tiny")}


@pytest.mark.slow
def test_the_student_is_logged_like_a_trial_and_registered(student):
    run, teacher = student["run"], student["teacher"]
    params = run.data.params
    assert run.info.run_name == f"distill-tiny {params['arch']}-{params['width']}"
    assert run.data.tags["distill.teacher"] == teacher.info.run_id
    assert run.info.experiment_id == teacher.info.experiment_id
    client = mlflow.MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"predictions.npz", "teacher_targets.npz", "plots", "graph"} <= files
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/learning_curve.png", "plots/confusion_matrix.png"} <= plots
    graph = {f.path for f in client.list_artifacts(run.info.run_id, "graph")}
    assert {"graph/student.keras", "graph/saved_model", "graph/classes.json"} <= graph
    with np.load(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="teacher_targets.npz")) as t:
        targets = t["train_probs"]
    assert targets.dtype == np.float16 and targets.shape == (int(params["n_train"]), 47)
    np.testing.assert_allclose(targets.astype(np.float64).sum(axis=1), 1.0, atol=0.03)
    version = client.get_model_version("emnist-distilled", student["version"])
    assert version.run_id == run.info.run_id
    (model,) = mlflow.search_logged_models(filter_string=f"source_run_id = '{run.info.run_id}'", output_format="list")
    assert {m.key for m in model.metrics} >= {"val_accuracy", "test_accuracy"}
    for key in ("teacher_val_accuracy", "best_member_val_accuracy", "student_images_per_second", "param_count"):
        assert key in run.data.metrics
    assert "student" in student["stdout"] and "models:/emnist-distilled/" in student["stdout"]


@pytest.mark.slow
def test_the_registered_student_is_evaluated_and_predicted_with(student, tmp_path, capsys):
    uri = f"models:/emnist-distilled/{student['version']}"
    assert evaluate.main(["--model", uri, "--dataset", "synthetic:1500"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"accuracy {student['run'].data.metrics['test_accuracy']:.4f}"
    path = tmp_path / "seven.png"
    Image.fromarray(255 - characters()[1]).resize((112, 112)).save(path)  # dark ink on white paper
    assert predict.main([str(path), "--model", uri]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert line.startswith(f"{path}  ") and "top 3:" in line


@pytest.mark.slow
def test_the_student_served_over_http_answers_like_the_model_in_process(student, tmp_path):
    uri = f"models:/emnist-distilled/{student['version']}"
    images = characters().astype(np.float32)[..., None]
    with mlflow_serve(uri, tmp_path / "serve.log") as url:
        body = json.dumps({"inputs": images.tolist()}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            served = np.asarray(json.loads(response.read())["predictions"])
    expected = serving.load_model(uri).class_scores(images)
    assert served.shape == (len(images), 47)
    np.testing.assert_allclose(served, expected, atol=1e-5)


@pytest.mark.slow
def test_the_report_shows_the_student_beside_its_teacher(student):
    from emnist_exp import reporting

    report = reporting.write_report("tiny")
    assert [s["run_id"] for s in report.students] == [student["run"].info.run_id]
    assert "## Distilled students" in report.text
    header, rows = reporting.distilled_table(report.students)
    assert header == ["model", "val_acc", "test_acc", "params", "images/s"]
    assert [r[0].split()[0] for r in rows] == ["teacher", "its", "student"]
    assert all(cell for cell in rows[2])  # the student has every number


FAKES: list[str] = []  # the hand-made runs of a test, deleted after it: other tests' queries must not find them


@pytest.fixture(autouse=True)
def delete_fake_runs():
    yield
    while FAKES:
        mlflow.MlflowClient().delete_run(FAKES.pop())


def fake_runs(experiment: str, study: str, dataset: str) -> str:
    """A COMPLETE trial run of `study` on `dataset` (tags and params only), as the queries see one."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    run = client.create_run(experiment_id, tags={"emnist.role": "trial", "optuna.study": study,
                                                 "optuna.state": "COMPLETE"})
    client.log_param(run.info.run_id, "dataset", dataset)
    client.log_metric(run.info.run_id, "val_accuracy", 0.5)
    client.set_terminated(run.info.run_id, "FINISHED")
    FAKES.append(run.info.run_id)
    return run.info.run_id


def fake_ensemble(member: str) -> str:
    client = mlflow.MlflowClient()
    experiment_id = client.get_run(member).info.experiment_id
    run = client.create_run(experiment_id, tags={"emnist.role": "ensemble", "ensemble.members": member})
    client.set_terminated(run.info.run_id, "FINISHED")
    FAKES.append(run.info.run_id)
    return run.info.run_id


def one_sentence(argv: list[str], capsys) -> str:
    assert distill.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.mark.parametrize("argv, sentence", [
    (["--arch", "transformer"], "error: unknown architecture 'transformer': use one of cnn, resnet, vgg5."),
    (["--temperature", "0"], "error: --temperature must be a positive number, got 0."),
    (["--temperature", "nan"], "error: --temperature must be a positive number, got nan."),
    (["--alpha", "1.5"], "error: --alpha must be between 0 and 1, got 1.5."),
    (["--alpha", "-0.1"], "error: --alpha must be between 0 and 1, got -0.1."),
    (["--precision", "int8"], "error: --precision must be one of auto, float32, mixed_bfloat16, mixed_float16, "
                              "got 'int8'."),
])
def test_bad_options_are_one_sentence_before_any_work(argv, sentence, capsys):
    assert one_sentence(argv, capsys) == sentence


def test_a_study_without_an_ensemble_is_one_sentence(workdir, capsys):
    fake_runs("distill-bad-input", "distill-unvoted", "synthetic:1500")
    assert one_sentence(["--study", "distill-unvoted"], capsys) == (
        "error: study 'distill-unvoted' has no ensemble yet: run `python -m emnist_exp.ensemble --study "
        "distill-unvoted` first.")


def test_an_ensemble_from_another_dataset_or_a_trial_run_is_one_sentence(workdir, capsys):
    # study names no other test uses: the session's store holds every test's studies (test_contract's "letters")
    fake_runs("distill-bad-input", "distill-here", "synthetic:1500")
    elsewhere = fake_ensemble(fake_runs("distill-bad-input", "distill-there", "synthetic:600"))
    assert one_sentence(["--study", "distill-here", "--ensemble", elsewhere], capsys) == (
        f"error: ensemble run {elsewhere} was trained on synthetic:600, but study 'distill-here' on synthetic:1500: "
        "pass an ensemble of this study, or leave out --study.")
    trial = fake_runs("distill-bad-input", "distill-here", "synthetic:1500")
    assert one_sentence(["--ensemble", trial], capsys).startswith(f"error: run {trial} is not an ensemble run")
