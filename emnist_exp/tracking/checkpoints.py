"""A trial's checkpoint as an artifact of its run: uploaded each epoch, read back to resume, deleted once done.

Run artifacts reach every worker that reaches the tracking store, through a tracking server's
artifact proxy too, so a trial resumes on any machine.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

FOLDER = "checkpoint"  # in the trial's run: one file, epoch-NNN.npz, while the trial is unfinished


def log_checkpoint(path: Path) -> dict[str, str]:
    """Upload a checkpoint file into the active run's FOLDER; returns where it is (run_id, path)."""
    mlflow.log_artifact(str(path), FOLDER)
    return {"run_id": mlflow.active_run().info.run_id, "path": f"{FOLDER}/{path.name}"}


def download_checkpoint(pointer: dict, folder: str) -> Path:
    """The checkpoint file a pointer from log_checkpoint names, downloaded into `folder`."""
    return Path(mlflow.artifacts.download_artifacts(run_id=pointer["run_id"], artifact_path=pointer["path"],
                                                    dst_path=folder))


def delete_checkpoints(run_id: str, keep: str | None = None) -> list[str]:
    """Delete the run's checkpoint files except `keep` (one left by a worker killed between two steps too)."""
    repo = get_artifact_repository(mlflow.MlflowClient().get_run(run_id).info.artifact_uri)
    gone = [f.path for f in repo.list_artifacts(FOLDER) if not f.is_dir and f.path != keep]
    for path in gone:
        repo.delete_artifacts(path)
    return gone
