"""A line of separate handwritten characters to one 28x28 model input per character, left to right."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from emnist_exp.errors import UserError
from emnist_exp.preprocess import NOISE, frame_character, page_ink

SPECK = 0.04  # a blob under 4% of the line's height on both sides is dust (an i's dot is ~15%)
JOIN = 0.12  # blank columns narrower than 12% of the line's height lie inside one character (broken strokes)
SPACE = 1.0  # a blank wider than the median character is a space between words
FRAGMENT = 0.15  # a run with under 15% of the median run's ink is a stray mark or a stroke's broken-off
                 # piece, not a character (a narrow 1 or l holds ~40%): it joins its nearer neighbour


@dataclass(frozen=True)
class Segment:
    """One character of a line: its columns in the (shrunk) page, and whether a word gap precedes it."""

    left: int
    right: int  # exclusive
    space_before: bool


def line_characters(image: Image.Image) -> tuple[list[Segment], list[np.ndarray]]:
    """The line's characters left to right, and each framed as the models see it (28x28 uint8)."""
    ink = line_ink(image)
    segments = find_segments(ink)
    return segments, [frame_character(ink[:, s.left : s.right]) for s in segments]


def line_ink(image: Image.Image) -> np.ndarray:
    """The page's ink with faint noise and dust specks zeroed; specks are judged by size, not mass,
    because on a line an i's dot holds far less than 1% of the ink."""
    ink = page_ink(image)
    ink = np.where(ink >= NOISE * ink.max(), ink, 0.0) if ink.max() > 0 else ink
    labels, count = ndimage.label(ink > 0, structure=np.ones((3, 3)))
    if count == 0:
        raise UserError("no character found: the image is blank or has no contrast.")
    boxes = ndimage.find_objects(labels)
    rows = np.nonzero(ink.any(axis=1))[0]
    limit = SPECK * (rows.max() - rows.min() + 1)
    keep = np.array([False] + [(b[0].stop - b[0].start) >= limit or (b[1].stop - b[1].start) >= limit
                               for b in boxes])
    return np.where(keep[labels], ink, 0.0)


def find_segments(ink: np.ndarray) -> list[Segment]:
    """Runs of inked columns, joined across blanks narrower than JOIN x the line's height.

    Columns, not connected blobs, so that a dot above its stem and the pieces of a broken stroke
    stay with their character; touching (cursive) characters are one run and are not split.
    """
    rows = np.nonzero(ink.any(axis=1))[0]
    if len(rows) == 0:
        raise UserError("no character found: the image is blank or has no contrast.")
    join = JOIN * (rows.max() - rows.min() + 1)
    inked = ink.any(axis=0)
    runs, start = [], None
    for x, on in enumerate(np.append(inked, False)):
        if on and start is None:
            start = x
        elif not on and start is not None:
            if runs and start - runs[-1][1] < join:
                runs[-1] = (runs[-1][0], x)
            else:
                runs.append((start, x))
            start = None
    runs = join_fragments(runs, ink.sum(axis=0))
    widths = np.median([right - left for left, right in runs])
    return [Segment(left, right, i > 0 and left - runs[i - 1][1] > SPACE * widths)
            for i, (left, right) in enumerate(runs)]


def join_fragments(runs: list[tuple[int, int]], column_ink: np.ndarray) -> list[tuple[int, int]]:
    """Runs holding under FRAGMENT of the median run's ink merged into the neighbour across the
    narrower blank, lightest first, so that a speck beside a character or a detached piece of
    its stroke does not become a character of its own."""
    runs = list(runs)
    while len(runs) > 1:
        mass = np.array([column_ink[left:right].sum() for left, right in runs])
        light = int(mass.argmin())
        if mass[light] >= FRAGMENT * np.median(mass):
            break
        gap_left = runs[light][0] - runs[light - 1][1] if light > 0 else np.inf
        gap_right = runs[light + 1][0] - runs[light][1] if light + 1 < len(runs) else np.inf
        other = light - 1 if gap_left <= gap_right else light + 1
        a, b = sorted((light, other))
        runs[a : b + 1] = [(runs[a][0], runs[b][1])]
    return runs


def text(segments: list[Segment], characters: list[str]) -> str:
    """The line as a string: the characters in order, a space where a word gap was found."""
    return "".join((" " if s.space_before else "") + c for s, c in zip(segments, characters))
