"""Entry point: create the local MLflow and Optuna stores once, before workers start (`python -m emnist_exp.stores`)."""

from __future__ import annotations

import argparse
import sys

from emnist_exp.errors import cli_main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.stores",
        description="Create the MLflow tracking store (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db) and the "
        "Optuna storage under a lock. `mlflow run` creates a fresh store's tables itself before the project's code "
        "runs, so workers started together with `mlflow run` need this step first.",
    )
    parser.add_argument("--storage", default="", help="Optuna storage URL (default: sqlite:///optuna.db)")
    parser.add_argument("--repair", action="store_true",
                        help="finish a SQLite tracking store's interrupted migration, keeping its runs")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from emnist_exp import console  # noqa: PLC0415

    console.quiet()
    from emnist_exp import storage  # noqa: PLC0415
    from emnist_exp.tracking import store  # noqa: PLC0415
    from emnist_exp.config import Config  # noqa: PLC0415
    from emnist_exp.redaction import redact  # noqa: PLC0415

    store.check_store()
    uri = store.prepare_local_store(repair=args.repair)
    defaults = Config()
    storage.open_storage(args.storage, heartbeat_interval=defaults.heartbeat_interval,
                         grace_period=defaults.grace_period)
    print(f"MLflow store {redact(uri)} and Optuna storage {redact(args.storage or storage.DEFAULT_STORAGE)} are ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
