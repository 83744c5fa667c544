"""Entry point: one worker of an Optuna study; every trial a nested MLflow run (`mlflow run . -e train`)."""

from __future__ import annotations

import argparse
import sys

from emnist_exp import console
from emnist_exp.errors import cli_main

OPTIONS = [  # (flag, help) — one flag per MLproject parameter of the `train` entry point; defaults come from Config
    ("dataset", "emnist/bymerge (tfds), idx:<folder> of official EMNIST gzip files, or synthetic[:N]"),
    ("study", "Optuna study name; rerunning with the same name continues it"),
    ("n_trials", "trials this worker runs"),
    ("epochs", "maximum epochs per trial; early stopping on validation may end sooner"),
    ("timeout", "seconds this worker runs: its trial then stops (at an epoch's end when the next epoch would not "
     "fit) and goes back to the study, for another worker to resume from its checkpoint; 0 = none"),
    ("max_examples", "cap on training examples, validation included; 0 = all"),
    ("seed", "seeds Keras, tf.data shuffling and the TPE sampler"),
    ("storage", "Optuna storage URL, e.g. postgresql://user@host/db; empty = sqlite:///optuna.db"),
    ("preset", "a preset in experiments/ (quick, sample, bymerge) or a .toml path; flags override it"),
    ("data_dir", "tfds data dir for prepared datasets; empty = TFDS_DATA_DIR or ~/tensorflow_datasets"),
    ("val_fraction", "share of train carved off for validation"),
    ("space", "search space: full (everything), tuned (narrow, strong on CPU) or kaggle (the Kaggle recipe)"),
    ("pruner", "median, hyperband or none"),
    ("total_trials", "COMPLETE trials the study needs across all workers; each worker stops once they are "
     "done or running elsewhere; 0 = no cap"),
    ("heartbeat_interval", "seconds between a running trial's heartbeats"),
    ("grace_period", "seconds without heartbeat after which another worker fails and retries the trial"),
    ("patience", "early-stopping patience in epochs"),
    ("shuffle_buffer", "tf.data shuffle buffer in examples"),
    ("precision", "number format for training: auto (mixed_float16 on a GPU with tensor cores, else float32), "
     "float32, mixed_bfloat16 or mixed_float16; logged models are float32 whatever trained them"),
]


def build_parser() -> argparse.ArgumentParser:
    from emnist_exp.config import Config  # noqa: PLC0415

    defaults = Config()
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.train",
        description="Run one worker of an Optuna study of CNN variants on EMNIST, logging each trial as a "
        "nested MLflow run. Values come from the defaults, then --preset, then these flags.",
    )
    for name, text in OPTIONS:
        flags = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
        default = getattr(defaults, name)
        shown = f" (default: {default})" if default not in ("", None) else ""
        parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=text + shown)
    console.add_verbose_flag(parser)
    return parser


def parse_args(argv: list[str] | None = None) -> dict:
    """The Config overrides the flags give; --verbose is a console setting, not one of them."""
    args = vars(build_parser().parse_args(argv))
    args.pop("verbose")
    return args


@cli_main
def main(argv: list[str] | None = None) -> int:
    from emnist_exp import signals  # noqa: PLC0415

    with signals.stop_on_signals():  # SIGTERM takes Ctrl-C's clean path: trial FAIL, runs KILLED
        return run(argv)


def run(argv: list[str] | None = None) -> int:
    from emnist_exp.config import resolve  # noqa: PLC0415 (keep --help free of TensorFlow)

    args = vars(build_parser().parse_args(argv))
    console.quiet(verbose=bool(args.pop("verbose")))
    cfg = resolve(args)
    from emnist_exp import data, precision, signals, storage, study as studies  # noqa: PLC0415
    from emnist_exp.tracking import experiments, results, runs, store  # noqa: PLC0415
    from emnist_exp.objective import Objective  # noqa: PLC0415

    console.quiet_libraries()
    store.check_store()  # both stores before anything is made in either, or any data is read
    precision.share_gpus()  # before TensorFlow's first op maps a whole GPU to this worker
    policy = precision.resolve(cfg.precision)
    study = studies.open_study(cfg)
    callbacks, cap = studies.worker_callbacks(cfg, study)
    if cap and not cap.has_room(study, hold=False):  # before the data: a late worker leaves at once
        print(f"study {cfg.study} already has {cfg.total_trials} complete trials: nothing to do", file=sys.stderr)
        return 0
    splits = data.load_splits(cfg.dataset, val_fraction=cfg.val_fraction, max_examples=cfg.max_examples,
                              data_dir=cfg.data_dir, seed=cfg.seed)
    counts = ", ".join(f"{k} {v:,}" for k, v in splits.counts.items())
    chosen = f"{policy} (auto)" if cfg.precision == "auto" else policy
    print(f"dataset {cfg.dataset}: {len(splits.classes)} classes; {counts}; precision {chosen}", file=sys.stderr)
    logged = {**cfg.to_dict(), "storage": storage.redact(cfg.storage)}  # never a password in the run
    url = cfg.storage or storage.DEFAULT_STORAGE
    objective = Objective(cfg, splits, policy=policy, on_start=cap.claimed if cap else None)
    with runs.study_run(logged, storage=storage.redact(url), sampler=str(study.sampler), policy=policy) as run:
        try:
            if cap is None or cap.has_room(study):  # holds the study's lock until the first trial is claimed
                # TimeLimit: the trial was stopped and queued again, and the study stopped for this worker
                study.optimize(objective, n_trials=cfg.n_trials, timeout=cfg.timeout or None, callbacks=callbacks,
                               gc_after_trial=True, catch=(signals.TimeLimit,))
        except BaseException as error:
            summary_after_error(study, error)
            raise
        finally:
            if cap:
                cap.lock.release()  # still held if this worker stopped (timeout, error) before claiming a trial
        studies.end_abandoned_runs(study)  # those whose trial ended within the grace period before this worker's start
        results.log_study_summary(study)
    print(f"runs: {experiments.experiment_url(run.info.experiment_id)} (`mlflow ui` for a local store)", file=sys.stderr)
    return 0


def summary_after_error(study, error: BaseException) -> None:
    """The study's summary, if it can still be logged; a failure here must not hide the error that stopped the study.
    After a store went away, none is tried: each write would wait out MLflow's retries first."""
    from emnist_exp.tracking import endings, results  # noqa: PLC0415

    if endings.lost_store(error):
        return
    try:
        results.log_study_summary(study)
    except Exception as exc:  # noqa: BLE001 (e.g. the same unwritable artifact store)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"note: the study summary was not logged ({type(exc).__name__}: {first})", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
