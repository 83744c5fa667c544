"""What a finished trial or study leaves in its run: final metrics, compact predictions, plots, reports."""

from __future__ import annotations

import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna

from emnist_exp import plots
from emnist_exp.errors import UserError
from emnist_exp.spec import TrialSpec
from emnist_exp.tracking.datasets import SplitDataset

PREDICTIONS = "predictions.npz"


def save_predictions(path: Path, classes: tuple[str, ...], **arrays: np.ndarray | None) -> None:
    """Probabilities as float16 with uint8 labels: ~100 bytes an image for 47 classes."""
    packed = {k: (v.astype(np.float16) if k.endswith("_probs") else v.astype(np.uint8))
              for k, v in arrays.items() if v is not None}
    np.savez_compressed(path, classes=np.array(list(classes)), **packed)


def log_trial_result(result, spec: TrialSpec, classes: tuple[str, ...], *, param_count: int,
                     model_id: str | None = None, datasets: dict[str, SplitDataset] | None = None,
                     test_images: np.ndarray | None = None, wrong_index: np.ndarray | None = None) -> None:
    """Final metrics, compact predictions and the plots of one finished trial.

    The accuracies are linked to the trial's LoggedModel and to the split they were measured on,
    so `mlflow.search_logged_models(order_by=[{"field_name": "metrics.val_accuracy"}])` ranks the models.
    """
    datasets = datasets or {}
    mlflow.log_metrics({"epochs_run": result.epochs_run, "train_seconds": result.seconds, "param_count": param_count,
                        "seconds_per_epoch": result.seconds / max(1, result.epochs_run)})
    mlflow.log_metrics({"val_accuracy": result.val_accuracy}, model_id=model_id, dataset=datasets.get("validation"))
    if result.test_accuracy is not None:
        mlflow.log_metrics({"test_accuracy": result.test_accuracy}, model_id=model_id, dataset=datasets.get("test"))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / PREDICTIONS
        save_predictions(path, classes, val_probs=result.val_probs, val_labels=result.val_labels,
                         test_probs=result.test_probs, test_labels=result.test_labels)
        mlflow.log_artifact(str(path))
    log_figure(plots.learning_curve(result.history), "plots/learning_curve.png")
    if result.test_probs is not None:
        predicted = result.test_probs.argmax(axis=1)
        log_figure(plots.confusion(result.test_labels, predicted, classes), "plots/confusion_matrix.png")
        if test_images is not None and wrong_index is not None:
            log_figure(plots.misclassified(test_images, result.test_labels[wrong_index],
                                           predicted[wrong_index], classes), "plots/misclassified.png")


def artifact_write_error(exc: OSError) -> UserError:
    """One sentence for an artifact store that refuses a write."""
    where = f" ({exc.filename})" if exc.filename else ""
    return UserError(f"cannot write artifacts to {mlflow.get_artifact_uri()}: {exc.strerror or exc}{where}; "
                     "check the artifact store's space and permissions, then rerun to continue the study.")


def log_figure(fig, path: str) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    mlflow.log_figure(fig, path)
    plt.close(fig)


def log_study_summary(study: optuna.Study) -> None:
    """Best trial, a CSV of all trials, and Optuna's history and importance plots on the parent."""
    frame = study.trials_dataframe()
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    mlflow.log_text(buffer.getvalue(), "trials.csv")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    mlflow.log_metrics({"n_trials": len(study.trials), "n_complete": len(complete)})
    if not complete:
        return
    best = study.best_trial
    mlflow.log_dict({"number": best.number, "value": best.value, "params": best.params,
                     "mlflow_run_id": best.user_attrs.get("mlflow_run_id")}, "best_trial.json")
    mlflow.log_metric("best_val_accuracy", best.value)
    mlflow.set_tag("best_trial", str(best.number))
    from optuna.visualization import matplotlib as ovm  # noqa: PLC0415

    log_figure(ovm.plot_optimization_history(study).figure, "plots/optimization_history.png")
    if len(complete) >= 2:
        try:
            # record=True keeps them off the console: a study whose parameters barely matter has nothing
            # to label, and Optuna's PED-ANOVA warns that a few trials rank parameters roughly (the plot shows it).
            with warnings.catch_warnings(record=True):
                figure = ovm.plot_param_importances(study).figure
            log_figure(figure, "plots/param_importances.png")
        except (ValueError, RuntimeError) as exc:  # e.g. every trial had the same parameters
            print(f"note: no parameter-importance plot ({exc})")


def load_predictions(run_id: str) -> dict[str, np.ndarray] | None:
    """A trial's logged predictions (float16 probabilities, uint8 labels), or None if it has none."""
    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PREDICTIONS)
    except Exception:  # noqa: BLE001 (missing artifact: the caller falls back to inference)
        return None
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


def log_to_run(run_id: str, texts: dict[str, str], figures: dict[str, Any]) -> str:
    """Text files and figures as artifacts of an existing run, finished or not; returns its artifact URI."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    client = mlflow.MlflowClient()
    for path, text in texts.items():
        client.log_text(run_id, text, path)
    for path, fig in figures.items():
        client.log_figure(run_id, fig, path)
        plt.close(fig)
    return client.get_run(run_id).info.artifact_uri
