"""Entry point: one worker of an Optuna study; every trial a nested MLflow run (`mlflow run . -e train`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from emnist_exp.errors import cli_main

OPTIONS = [  # (flag, help) — one flag per MLproject parameter of the `train` entry point
    ("dataset", "emnist/bymerge (tfds, default), idx:<folder> of official EMNIST gzip files, or synthetic[:N]"),
    ("study", "Optuna study name; rerunning with the same name continues it (default: emnist)"),
    ("n_trials", "trials this worker runs (default: 10)"),
    ("epochs", "maximum epochs per trial; early stopping on validation may end sooner (default: 10)"),
    ("timeout", "seconds after which this worker starts no new trial; 0 = none"),
    ("max_examples", "cap on training examples, validation included; 0 = all"),
    ("seed", "seeds Keras, tf.data shuffling and the TPE sampler (default: 0)"),
    ("storage", "Optuna storage URL, e.g. postgresql://user@host/db (default: sqlite:///optuna.db)"),
    ("preset", "a preset in experiments/ (quick, sample, bymerge) or a .toml path; flags override it"),
    ("data_dir", "tfds data dir for prepared datasets (default: TFDS_DATA_DIR or ~/tensorflow_datasets)"),
    ("val_fraction", "share of train carved off for validation (default: 0.1)"),
    ("space", "search space: full (everything), tuned (narrow, strong on CPU) or seed (the seed recipe)"),
    ("pruner", "median (default), hyperband or none"),
    ("total_trials", "COMPLETE trials the study needs across all workers; each worker stops once they are "
     "done or running elsewhere; 0 = no cap (default)"),
    ("heartbeat_interval", "seconds between a running trial's heartbeats (default: 60)"),
    ("grace_period", "seconds without heartbeat after which another worker fails and retries the trial "
     "(default: 180)"),
    ("patience", "early-stopping patience in epochs (default: 3)"),
    ("shuffle_buffer", "tf.data shuffle buffer in examples (default: 10000)"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.train",
        description="Run one worker of an Optuna study of CNN variants on EMNIST, logging each trial as a "
        "nested MLflow run. Values come from the defaults, then --preset, then these flags.",
    )
    for name, text in OPTIONS:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=text)
    return parser


def parse_args(argv: list[str] | None = None) -> dict:
    return vars(build_parser().parse_args(argv))


@contextlib.contextmanager
def one_worker_at_a_time(data_dir: str):
    """A lock per tfds folder on this machine: local workers starting together would each prepare the dataset."""
    import fcntl  # noqa: PLC0415
    import hashlib  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    key = hashlib.sha1(os.path.realpath(os.path.expanduser(data_dir)).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"emnist_exp-prepare-{key}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@cli_main
def main(argv: list[str] | None = None) -> int:
    from emnist_exp.config import resolve  # noqa: PLC0415 (keep --help free of TensorFlow)

    cfg = resolve(parse_args(argv))
    from emnist_exp import data, study as studies, tracking  # noqa: PLC0415

    studies.quiet_libraries()

    url = cfg.storage or studies.DEFAULT_STORAGE
    storage = studies.open_storage(url, heartbeat_interval=cfg.heartbeat_interval, grace_period=cfg.grace_period)
    study = studies.make_study(cfg, storage)
    callbacks = studies.worker_callbacks(cfg, study)
    if callbacks is None:  # before the data: a late worker of a finished study leaves at once
        print(f"study {cfg.study} already has {cfg.total_trials} complete trials: nothing to do", file=sys.stderr)
        return 0
    with one_worker_at_a_time(cfg.data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"):
        splits = data.load_splits(cfg.dataset, val_fraction=cfg.val_fraction, max_examples=cfg.max_examples,
                                  data_dir=cfg.data_dir, seed=cfg.seed)
    counts = ", ".join(f"{k} {v:,}" for k, v in splits.counts.items())
    print(f"dataset {cfg.dataset}: {len(splits.classes)} classes; {counts}", file=sys.stderr)
    logged = {**cfg.to_dict(), "storage": studies.redact(cfg.storage)}  # never a password in the run
    with tracking.study_run(logged, storage=studies.redact(url), sampler=str(study.sampler)):
        try:
            study.optimize(studies.Objective(cfg, splits), n_trials=cfg.n_trials, timeout=cfg.timeout or None,
                           callbacks=callbacks, gc_after_trial=True)
        finally:
            tracking.log_study_summary(study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
