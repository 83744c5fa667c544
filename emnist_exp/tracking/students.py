"""A distilled student's run: tagged with its teacher, a trial's artifacts, its LoggedModel registered, its graph."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np

from emnist_exp.spec import TrialSpec
from emnist_exp.tracking import endings, models, results
from emnist_exp.tracking.launcher import start_entry_run
from emnist_exp.tracking.tags import PRECISION_TAG, ROLE_TAG, STUDY_TAG

DISTILLED_MODEL = "emnist-distilled"
ROLE = "distilled"  # the ROLE_TAG of a student's run, beside study, trial and ensemble
TEACHER_TAG = "distill.teacher"  # the ensemble run whose soft targets the student learnt from
TARGETS = "teacher_targets.npz"  # train_probs (float16) and classes, as predictions.npz holds them
GRAPH_FILE = "student.keras"


def run_name(study: str, spec: TrialSpec) -> str:
    return f"distill-{study} {spec.arch}-{spec.width}"


@contextlib.contextmanager
def student_run(*, experiment_id: str, study: str, teacher: str, spec: TrialSpec, seed: int, policy: str,
                params: dict[str, Any]) -> Iterator[mlflow.ActiveRun]:
    """The student's run in the study's experiment, ended as endings.outcome says (FINISHED, KILLED on Ctrl-C,
    FAILED), as a study's and a trial's runs are."""
    tags = {ROLE_TAG: ROLE, STUDY_TAG: study, TEACHER_TAG: teacher, "arch": spec.arch, PRECISION_TAG: policy,
            "aug": "on" if spec.augment else "off"}
    run = start_entry_run(run_name=run_name(study, spec), tags=tags, experiment_id=experiment_id)
    with endings.ending():
        mlflow.log_params({**spec.params(), "seed": seed, "precision_policy": policy, **params})
        yield run


def log_teacher_targets(targets: np.ndarray, classes: tuple[str, ...]) -> None:
    """The teacher's soft targets over the train split, float16, in the active run."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TARGETS
        results.save_predictions(path, classes, train_probs=targets)
        mlflow.log_artifact(str(path))


def log_student(result, spec: TrialSpec, classes: tuple[str, ...], *, example: np.ndarray, datasets: dict,
                test_images: np.ndarray | None, wrong_index: np.ndarray | None, metrics: dict[str, float]
                ) -> tuple[str, str]:
    """A trial's metrics, predictions and plots, the LoggedModel (registered as DISTILLED_MODEL) and the
    student as one graph; `metrics` (the teacher's, rates) go on the run. Returns the model id and version."""
    model_id = models.log_keras_model(result.model, classes, example, step=result.best_epoch)
    results.log_trial_result(result, spec, classes, param_count=result.model.count_params(), model_id=model_id,
                             datasets=datasets, test_images=test_images, wrong_index=wrong_index)
    mlflow.log_metrics(metrics)
    models.log_graph(result.model, classes, GRAPH_FILE)
    return model_id, models.register(model_id, DISTILLED_MODEL)
