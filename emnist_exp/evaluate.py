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


def predicted_classes(output) -> np.ndarray:
    """Class indices from a pyfunc output: the ensemble's DataFrame or a Keras model's probabilities."""
    if hasattr(output, "columns") and "class_index" in output.columns:
        return output["class_index"].to_numpy()
    return np.asarray(output).argmax(axis=1)


def load_model(uri: str):
    import mlflow  # noqa: PLC0415

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as exc:  # noqa: BLE001 (MlflowException, OSError, ...: all mean "no such model")
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load model {uri}: {first}") from None


def input_shape(model) -> tuple[int, ...]:
    """Per-image input shape from the model's signature: (28, 28, 1) for Keras, (28, 28) for the ensemble."""
    schema = model.metadata.get_input_schema()
    if schema is None or not schema.is_tensor_spec():
        return (28, 28, 1)
    return tuple(schema.inputs[0].shape[1:])


def predict(model, images: np.ndarray):
    try:
        return model.predict(images)
    except Exception as exc:  # noqa: BLE001 (schema and shape errors from a foreign model)
        first = str(exc).strip().splitlines()[0][:300]
        raise UserError(f"the model rejected a batch of 28x28 images: {first}") from None


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from emnist_exp import console  # noqa: PLC0415

    console.quiet()
    from emnist_exp import data, tracking  # noqa: PLC0415

    data.check_split_spec(args.split)
    source = data.open_source(args.dataset, args.data_dir)
    model = load_model(args.model)
    classes = tracking.model_classes(args.model)
    if classes is not None and classes != source.classes:
        raise UserError(f"the model knows {len(classes)} classes and {args.dataset} has {len(source.classes)} "
                        "different ones; evaluate it on a dataset with the same class list.")
    source.num_examples(args.split.split("[")[0])  # a clear error for a missing split
    shape = input_shape(model)
    correct = total = 0
    for images, labels in data.read_split(source, args.split).batch(BATCH).as_numpy_iterator():
        predicted = predicted_classes(predict(model, images.astype(np.float32).reshape((-1, *shape))))
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
