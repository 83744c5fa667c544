"""Entry point: accuracy of any logged model (a trial's or the ensemble) on a dataset split."""

from __future__ import annotations

import argparse
import sys

import numpy as np

from emnist_exp.errors import UserError, cli_main

BATCH = 1024  # images per predict call: memory stays flat whatever the split's size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.evaluate",
        description="Evaluate a model URI (runs:/<id>/model, models:/emnist-ensemble/<version>, ...) on a "
        "dataset split. The last line printed is `accuracy X`.",
    )
    parser.add_argument("--model", required=True, help="an MLflow model URI")
    parser.add_argument("--dataset", default="emnist/bymerge", help="dataset SPEC (default: emnist/bymerge)")
    parser.add_argument("--split", default="test", help="tfds split, slicing allowed (default: test)")
    parser.add_argument("--data_dir", "--data-dir", default="", help="tfds data dir")
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from emnist_exp import console  # noqa: PLC0415

    console.quiet()
    from emnist_exp import data, serving  # noqa: PLC0415

    data.check_split_spec(args.split)  # before any data is read
    source = data.open_source(args.dataset, args.data_dir)
    source.check_split(args.split)  # every split it names, before the model loads
    model = serving.load_model(args.model)
    if model.classes != source.classes:
        raise UserError(f"the model knows {len(model.classes)} classes and {args.dataset} has "
                        f"{len(source.classes)} different ones; evaluate it on a dataset with the same class list.")
    correct = total = 0
    for images, labels in data.read_split(source, args.split).batch(BATCH).as_numpy_iterator():
        predicted = model.class_scores(images).argmax(axis=1)
        correct += int(np.sum(predicted == labels))
        total += len(labels)
        print(f"\r{total:,} images, running accuracy {correct / total:.4f}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    if total == 0:
        raise UserError(f"split {args.split} of {args.dataset} is empty.")
    print(f"model {args.model} on {args.dataset} [{args.split}]: {correct:,} of {total:,} correct")
    print(f"accuracy {correct / total:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
