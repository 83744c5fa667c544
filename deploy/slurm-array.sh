#!/bin/bash
# Workers of one Optuna study as a Slurm job array: one array task per worker, each its own seed.
# PostgreSQL holds the study, an MLflow tracking server the runs (README, "Scaling out").
#
#   export EMNIST_STORAGE=postgresql://USER@DATABASE-SERVER/emnist_optuna
#   export MLFLOW_TRACKING_URI=http://TRACKING-SERVER:5000
#   sbatch deploy/slurm-array.sh [more train flags]      (from the project root, its venv active)
#
# Settings, read from the environment when each task starts (sbatch passes the submitting
# shell's environment on); the defaults in brackets:
#   EMNIST_STORAGE       Optuna storage URL, with no password in it: PostgreSQL's client reads it
#                        from ~/.pgpass or PGPASSWORD on the node.
#                        [postgresql:///emnist_optuna: the server that PGHOST, PGPORT and PGUSER name]
#   MLFLOW_TRACKING_URI  the MLflow tracking server.    [http://$SLURM_SUBMIT_HOST:5000, where you ran sbatch]
#   EMNIST_DATASET       dataset SPEC, a folder every node can read.     [idx:$HOME/emnist/gzip]
#   EMNIST_STUDY         Optuna study; resubmitting with the same name continues it.     [bymerge-slurm]
#   EMNIST_PRESET        preset in experiments/ (bymerge wants a GPU: see --gres below).   [bymerge]
#   EMNIST_TOTAL_TRIALS  COMPLETE trials the study needs across all tasks; every task stops then. [40]
#   TFDS_DATA_DIR        where a node prepares its copy of the dataset, on local disk.
#                        [$TMPDIR/emnist-tfds-$SLURM_ARRAY_JOB_ID; tasks on one node share it]
# Arguments after the script's name go to `python -m emnist_exp.train` after the flags above, so
# they override them (the last of a repeated flag counts): sbatch deploy/slurm-array.sh --epochs 5
#
# Stopping. On scancel, preemption or `scontrol requeue`, Slurm sends SIGTERM to every process of
# the task, waits KillWait (30 s by default), then SIGKILL. The train worker handles SIGTERM itself:
# its trial ends as FAIL and is queued
# again, its MLflow run as KILLED, and the next worker to take a trial resumes it from its last
# epoch's checkpoint (README, "Preemption and time limits"); a task killed outright has its trial
# resumed the same way once grace_period has passed. The time limit would do the
# same with no warning, so --signal asks for SIGUSR1 120 s before it (B: to this shell only; Slurm's
# timer may send it up to a minute earlier). This shell then stops the worker the same way and
# requeues its own task, which carries on the study. SIGUSR1 and not SIGTERM, so that a scancel
# (SIGTERM) still ends the task for good.
#SBATCH --job-name=emnist-train
#SBATCH --array=0-3%4
#SBATCH --cpus-per-task=4
#SBATCH --mem=3G
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=emnist-train-%A_%a.log
# append: a requeued task writes to the same log, after what its earlier runs wrote
#SBATCH --open-mode=append
# For the bymerge preset, one GPU per worker: delete the first '#' of the next line.
##SBATCH --gres=gpu:1
set -euo pipefail

: "${EMNIST_STORAGE:=postgresql:///emnist_optuna}"
: "${MLFLOW_TRACKING_URI:=http://${SLURM_SUBMIT_HOST}:5000}"
: "${EMNIST_DATASET:=idx:$HOME/emnist/gzip}"
: "${EMNIST_STUDY:=bymerge-slurm}"
: "${EMNIST_PRESET:=bymerge}"
: "${EMNIST_TOTAL_TRIALS:=40}"
# One prepared copy per node, on local disk: the idx: folder itself is read-only and shared.
: "${TFDS_DATA_DIR:=${TMPDIR:-/tmp}/emnist-tfds-${SLURM_ARRAY_JOB_ID}}"
export MLFLOW_TRACKING_URI TFDS_DATA_DIR

echo "emnist-train: task ${SLURM_ARRAY_TASK_ID} of job ${SLURM_ARRAY_JOB_ID}," \
     "run $((${SLURM_RESTART_COUNT:-0} + 1)) on $(hostname)" >&2

worker=""
time_up=""
stop_worker() {
    if [ -n "$worker" ]; then kill -TERM "$worker" 2>/dev/null || true; fi
}
on_time_limit() {
    echo "emnist-train: the time limit is near: stopping the worker, then requeueing this task" >&2
    time_up=1
    stop_worker
}
trap on_time_limit USR1
trap stop_worker TERM INT

# A child of this shell, not an srun step: srun answers a SIGTERM by killing its step's tasks
# outright, so the worker's cleanup would be cut short. In the background, so that this shell can
# take signals while the worker runs (bash runs a trap only once the foreground command is done).
python -m emnist_exp.train \
    --dataset "$EMNIST_DATASET" \
    --study "$EMNIST_STUDY" \
    --preset "$EMNIST_PRESET" \
    --storage "$EMNIST_STORAGE" \
    --total_trials "$EMNIST_TOTAL_TRIALS" \
    --n_trials 100 \
    --seed "$SLURM_ARRAY_TASK_ID" \
    "$@" &
worker=$!

status=0
wait "$worker" || status=$?
while kill -0 "$worker" 2>/dev/null; do  # a trap ended the wait, not the worker
    status=0
    wait "$worker" || status=$?
done

if [ -n "$time_up" ] && [ "$status" -ne 0 ]; then
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
