"""`mlflow run`'s own run: used as it is in a named experiment, handed over in Default, its status set back after a stop."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import mlflow

from emnist_exp.tracking.experiments import (
    DEFAULT_EXPERIMENT_ID,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING,
    chosen_experiment,
    study_experiment,
    use_experiment,
)
from emnist_exp.tracking.tags import HANDED_OVER_TAG, MOVED_TAG
from emnist_exp.tracking.views import write_runs_view


def start_entry_run(*, run_name: str, tags: dict[str, str], experiment: str = "",
                    experiment_id: str = "") -> mlflow.ActiveRun:
    """An entry point's run: in the experiment the user named, else in `experiment` (a name) or `experiment_id`.

    `mlflow run` creates its run before this code starts and passes it as MLFLOW_RUN_ID. In an
    experiment the user named (--experiment-name/-id) that run is used as it is. In "Default",
    where `mlflow run` falls back when none is named, it is replaced: a new run in our experiment
    takes over its parameters and tags, and the original ends FINISHED, tagged with its
    replacement. `mlflow run` ends it once more when the command exits (and fails if it is
    deleted by then), so the next entry point's tidy_default deletes it.
    """
    client = mlflow.MlflowClient()
    tidy_default(client)
    launched = os.environ.pop("MLFLOW_RUN_ID", None)
    outer = client.get_run(launched) if launched else None
    if outer is not None:
        chosen = None if outer.info.experiment_id == DEFAULT_EXPERIMENT_ID else outer.info.experiment_id
    else:
        chosen = chosen_experiment()
    target = chosen or experiment_id or study_experiment(experiment)
    if EXPERIMENT_KIND_TAG not in client.get_experiment(target).tags:  # a user's experiment, or an older one
        client.set_experiment_tag(target, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    write_runs_view(target)  # what the address that train and ensemble print opens
    use_experiment(target)
    if outer is not None and chosen:
        return mlflow.start_run(run_id=launched, run_name=run_name, tags=tags)
    if outer is None:
        return mlflow.start_run(run_name=run_name, tags=tags)
    carried = {k: v for k, v in outer.data.tags.items() if k != "mlflow.runName"}
    run = mlflow.start_run(run_name=run_name, tags={**carried, **tags})
    mlflow.log_params(outer.data.params)
    handed_over = int(time.time() * 1000)
    client.set_tag(launched, MOVED_TAG, run.info.run_id)
    client.set_tag(launched, HANDED_OVER_TAG, str(handed_over))
    client.set_terminated(launched, "FINISHED", end_time=handed_over)
    return run


def tidy_default(client: mlflow.MlflowClient) -> list[str]:
    """Delete the runs start_entry_run replaced once their `mlflow run` has exited; returns their ids.

    `mlflow run` ends its run when its command exits, which moves the end time past the hand-over.
    The status it writes then says how the command ended (FAILED after a Ctrl-C or an error, KILLED),
    not how the study did: that is the replacement's. A placeholder goes whatever its end.
    """
    where = f"tags.`{MOVED_TAG}` LIKE '%' and attributes.status != 'RUNNING'"
    deleted = []
    for run in client.search_runs([DEFAULT_EXPERIMENT_ID], filter_string=where, max_results=1000):
        if (run.info.end_time or 0) > int(run.data.tags.get(HANDED_OVER_TAG, "0")):
            client.delete_run(run.info.run_id)
            deleted.append(run.info.run_id)
    return deleted


# `mlflow run` sets its run's status after its child exits unless the run is already terminated, but
# its check (projects._maybe_set_run_terminated in mlflow 3.17) hands RunStatus.is_terminated a
# string, so it always overwrites: a Ctrl-C'd study would end FAILED. This waits, detached from the
# terminal's Ctrl-C, for the CLI to exit and sets the status back.
_RESTORE = """
import os, sys, time
pid, run_id, status = int(sys.argv[1]), sys.argv[2], sys.argv[3]
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        break
    time.sleep(0.2)
import mlflow
mlflow.MlflowClient().set_terminated(run_id, status)
"""


def kept_after_launcher(run_id: str, status: str, launcher: int) -> None:
    subprocess.Popen([sys.executable, "-c", _RESTORE, str(launcher), run_id, status], start_new_session=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
