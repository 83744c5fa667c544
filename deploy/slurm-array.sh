#!/bin/bash
# Workers of one Optuna study as a Slurm job array: one array task per worker, each its own seed.
# PostgreSQL holds the study, an MLflow tracking server the runs (README, "Scaling out").
#
#   sbatch deploy/slurm-array.sh          (from the project root, with the project's venv active)
#
# Stopping: on preemption, scancel or the time limit, Slurm sends SIGTERM, waits KillWait (30 s by
# default), then SIGKILL. The train worker handles SIGTERM itself (emnist_exp/signals.py): its
# trial ends as FAIL and is queued again, and the next worker to take a trial resumes it from its
# last epoch's checkpoint (README, "Preemption and time limits"); a task killed outright has its
# trial resumed the same way once grace_period has passed. --requeue puts a preempted task back in the queue.
#SBATCH --job-name=emnist-train
#SBATCH --array=0-3%4
#SBATCH --cpus-per-task=4
#SBATCH --mem=3G
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --output=emnist-train-%A_%a.log
set -euo pipefail

: "${MLFLOW_TRACKING_URI:=http://tracking-host:5000}"
export MLFLOW_TRACKING_URI
# One prepared copy per node, on local disk: the idx: folder itself is read-only and shared.
export TFDS_DATA_DIR="${TMPDIR:-/tmp}/emnist-tfds-${SLURM_ARRAY_JOB_ID}"

# exec: the worker replaces the shell, so Slurm's SIGTERM reaches it and not a shell that ignores it.
exec srun --kill-on-bad-exit=1 python -m emnist_exp.train \
    --dataset "idx:${EMNIST_DIR:-$HOME/emnist/gzip}" \
    --study bymerge-slurm \
    --preset bymerge \
    --storage "postgresql://emnist@db-host:5432/emnist_optuna" \
    --total_trials 40 \
    --n_trials 100 \
    --seed "${SLURM_ARRAY_TASK_ID}"
