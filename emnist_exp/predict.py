"""Entry point: the character in each image file, by a logged model (`python -m emnist_exp.predict a.png`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from emnist_exp.errors import UserError, cli_main

TOP = 3  # candidates printed per file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m emnist_exp.predict",
        description="Predict the character in each image file (PNG, JPEG, BMP, ...; any size; RGB, RGBA, grey or "
        "16-bit). Each image is first made what EMNIST models get: grey, white on black, framed in 28x28 as "
        "EMNIST framed its scans. Prints file, character, confidence and the top 3, one line per file; with "
        "--line, the string read from each file and one line per character.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files, one character each (a line each "
                        "with --line)")
    parser.add_argument("--model", default=None, help="an MLflow model URI: models:/emnist-ensemble/<version>, "
                        "runs:/<id>/model, ... (default: the latest registered emnist-ensemble version)")
    parser.add_argument("--line", action="store_true", help="each image is a short line or word of separate "
                        "(not joined-up) characters: print the string, then each character with its top 3")
    parser.add_argument("--save-preprocessed", "--save_preprocessed", dest="save_preprocessed", metavar="DIR",
                        default=None, help="also write the 28x28 images given to the model into DIR")
    return parser.parse_args(argv)


def prepare(paths: list[str], convert=None) -> tuple[list[tuple[str, object]], list[str]]:
    """(file, convert(image)) for every readable file, and the files that failed (each told on stderr).

    `convert` is preprocess.to_emnist (one 28x28 image) unless given, e.g. segment.line_characters.
    """
    from emnist_exp.preprocess import load_image, to_emnist  # noqa: PLC0415

    images, failed = [], []
    for path in paths:
        try:
            image = load_image(path)  # its sentences name the file
            try:
                images.append((path, (convert or to_emnist)(image)))
            except UserError as exc:
                raise UserError(f"{path}: {exc}") from None
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed.append(path)
    return images, failed


def save_preprocessed(images: list[tuple[str, np.ndarray]], folder: str) -> None:
    """Each 28x28 input as <stem>.png in `folder` (<stem>-2.png, ... when two files share a stem)."""
    from PIL import Image  # noqa: PLC0415

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        used: set[str] = set()
        for path, image in images:
            stem, n = Path(path).stem, 1
            while (name := stem if n == 1 else f"{stem}-{n}") in used:
                n += 1
            used.add(name)
            Image.fromarray(image, "L").save(out / f"{name}.png")
    except OSError as exc:
        raise UserError(f"cannot write preprocessed images to {folder}: {exc.strerror or exc}.") from None


def default_model() -> str:
    """The latest registered version of the ensemble."""
    from emnist_exp.tracking import models  # noqa: PLC0415

    version = models.latest_version(models.ENSEMBLE_MODEL)
    if version is None:
        raise UserError(f"no {models.ENSEMBLE_MODEL} model is registered in this tracking store: run "
                        "`python -m emnist_exp.ensemble` first, or pass --model.")
    return f"models:/{models.ENSEMBLE_MODEL}/{version}"


def ranked(model, images: np.ndarray, k: int = TOP) -> list[list[tuple[str, float]]]:
    """The k best (class name, score) pairs for each image by a serving.ProjectModel, best first."""
    scores = model.class_scores(images)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[(model.classes[i], float(row[i])) for i in best] for row, best in zip(scores, order)]


def line(path: str, top: list[tuple[str, float]], width: int) -> str:
    character, confidence = top[0]
    others = ", ".join(f"{c} {p:.3f}" for c, p in top)
    return f"{path:<{width}}  {character}  {confidence:.3f}   top {len(top)}: {others}"


def read_lines(model, lines: list[tuple[str, tuple]]) -> None:
    """Print each file's string, then one row per character (its number, as in `line`)."""
    from emnist_exp.segment import text  # noqa: PLC0415

    for path, (segments, images) in lines:
        tops = ranked(model, np.stack(images))
        print(f"{path}  {text(segments, [top[0][0] for top in tops])}")
        for number, top in enumerate(tops, 1):
            print(line(f"  {number}", top, len(str(len(tops))) + 2))


def segment_images(lines: list[tuple[str, tuple]]) -> list[tuple[str, np.ndarray]]:
    """(<file>-<n>, 28x28) for each character of each line, as --save-preprocessed names them."""
    return [(f"{Path(path).stem}-{n:02d}", image) for path, (_, images) in lines for n, image in enumerate(images, 1)]


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from emnist_exp import console  # noqa: PLC0415

    console.quiet()
    if args.line:
        from emnist_exp.segment import line_characters  # noqa: PLC0415

        lines, failed = prepare(args.images, line_characters)
        images = segment_images(lines)
    else:
        images, failed = prepare(args.images)
    if images and args.save_preprocessed:
        save_preprocessed(images, args.save_preprocessed)
    if images:
        from emnist_exp import serving  # noqa: PLC0415

        uri = args.model or default_model()
        model = serving.load_model(uri)
        print(f"model {uri}", file=sys.stderr)
        if args.line:
            read_lines(model, lines)
            return 1 if failed else 0
        width = max(len(path) for path, _ in images)
        for (path, _), top in zip(images, ranked(model, np.stack([image for _, image in images]))):
            print(line(path, top, width))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
