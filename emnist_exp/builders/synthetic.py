"""tfds builder for an offline, procedurally rendered EMNIST-like set of the 47 bymerge classes."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator

import matplotlib
import numpy as np
import tensorflow_datasets as tfds
from matplotlib.ft2font import FT2Font
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from emnist_exp.builders.idx import IMAGE_NOTE, image_feature
from emnist_exp.classes import BYMERGE_CLASSES
from emnist_exp.errors import UserError
from emnist_exp.preprocess import frame_character

# Fonts that matplotlib ships (mpl-data/fonts/ttf) and that draw plain letters and digits.
# Left out: the *Display, STIXNonUni and STIXSiz* subsets, the TeX symbol fonts (cmmi10, cmsy10,
# cmex10) and LastResort, which draws a placeholder box for every character.
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
    "cmti10.ttf", "cmb10.ttf",
)

# Base glyphs: drawn once per (font, class) at a large size, then shrunk with a good filter, so
# the per-example warp samples them at about 1:1 and needs no anti-aliasing of its own.
DRAW_FONT_PX = 96
GLYPH_PX = 20  # longer side of a base glyph
TILE = GLYPH_PX + 4  # tile of the glyph atlas; its zero border is what the warp reads off-glyph
WORK_PX = 32  # canvas of the per-example warp: room for a glyph rotated, sheared and scaled by 1.2

# Per-example distortions
MAX_ROTATION_DEG = 15.0
MAX_SHEAR = 0.3  # column shift per row, like a slanted hand
SCALE_RANGE = (0.8, 1.2)  # row and column scales drawn apart, so glyphs get taller or wider
ELASTIC_GRID = 9  # coarse grid of the elastic field: nodes 4 work px apart
ELASTIC_GRID_SIGMA = 1.0  # in grid nodes, so 4 work px: the sigma of Simard et al. 2003 at 28 px
ELASTIC_STD = 0.8  # std of the displacement, in work px
STROKE_SIZES = (1, 2, 3)  # max-filter sizes on the work canvas; 1 keeps the font's own stroke
STROKE_WEIGHTS = (0.2, 0.5, 0.3)  # EMNIST strokes are 2-3 px wide, most fonts 1-2 px at this size
NOISE_STD = 4.0  # grey levels, on visible ink only, so the background stays exactly 0

CHUNK = 500  # examples drawn from one RNG stream, seeded by (seed, split, chunk): no shared state
TEST_FRACTION = 6  # the test split has size // 6 examples
SPLIT_IDS = {"train": 0, "test": 1}


@dataclasses.dataclass(eq=False, kw_only=True)
class EmnistSyntheticConfig(tfds.core.BuilderConfig):
    """A synthetic set of `size` train examples (and size // 6 test ones) drawn from `seed`."""

    size: int = 12000
    seed: int = 0


class EmnistSynthetic(tfds.core.GeneratorBasedBuilder):
    """Printed glyphs from matplotlib's fonts, warped to look handwritten, framed like EMNIST."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {"1.0.0": "First release.", "1.1.0": IMAGE_NOTE,
                     "1.2.0": "Framed like EMNIST (preprocess.frame_character), not fitted to 20 px by centre of mass.",
                     "1.3.0": "Blurred in proportion to the stroke width, as EMNIST's small characters are softer."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "EMNIST-like synthetic characters of the 47 bymerge classes, rendered offline from "
                "matplotlib's fonts with random affine, stroke-width and elastic distortions, "
                "then framed in 28x28 as EMNIST framed NIST's scans (blur, bounding box, border, bicubic), "
                "white on black. "
                "Images are stored UPRIGHT, unlike the official EMNIST files and tfds `emnist`, "
                "whose images are transposed."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": image_feature(),
                    "label": tfds.features.ClassLabel(names=list(BYMERGE_CLASSES)),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,  # examples come in random class order already
            metadata=tfds.core.MetadataDict(orientation="upright"),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        size = self.builder_config.size
        counts = {"train": size, "test": size // TEST_FRACTION}
        return {split: self._generate_examples(split, n) for split, n in counts.items() if n}

    def _generate_examples(self, split: str, count: int) -> Iterator[tuple[int, dict]]:
        for start in range(0, count, CHUNK):
            seed = (self.builder_config.seed, SPLIT_IDS[split], start // CHUNK)
            rng = np.random.default_rng(seed)
            # Each chunk holds the classes in turn, shuffled: balanced, and all 47 from 47 examples.
            indices = np.arange(start, min(start + CHUNK, count))
            labels = rng.permutation(indices % len(BYMERGE_CLASSES))
            for offset, (image, label) in enumerate(zip(render_batch(labels, rng), labels)):
                yield start + offset, {"image": image[..., None], "label": int(label)}


def synthetic_builder(
    size: int = 12000, data_dir: str | None = None, seed: int = 0
) -> tfds.core.DatasetBuilder:
    """Return a prepared EmnistSynthetic builder with `size` train examples and size//6 test examples."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise UserError(f"The synthetic dataset size must be a positive integer, not {size!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UserError(f"The synthetic dataset seed must be a non-negative integer, not {seed!r}.")
    config = EmnistSyntheticConfig(
        name=f"n{size}_s{seed}",
        description=f"{size} train and {size // TEST_FRACTION} test examples from seed {seed}.",
        size=size,
        seed=seed,
    )
    builder = EmnistSynthetic(config=config, data_dir=data_dir or os.environ.get("TFDS_DATA_DIR"))
    builder.download_and_prepare()
    return builder


def render_batch(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one (len(labels), 28, 28) uint8 batch: a random font per example, warped and framed."""
    atlas = glyph_atlas()
    n_fonts = len(atlas) // len(BYMERGE_CLASSES)
    glyph_ids = labels * n_fonts + rng.integers(n_fonts, size=len(labels))
    return frame(thicken(warp(atlas, glyph_ids, rng), rng), rng)


def font_paths() -> list[str]:
    """Paths of the FONT_FILES that this matplotlib ships and that draw all 47 characters."""
    folder = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = [os.path.join(folder, name) for name in FONT_FILES]
    return [path for path in paths if os.path.exists(path) and draws_all_classes(path)]


def draws_all_classes(font_path: str) -> bool:
    """Whether the font has a glyph for each of the 47 characters (else Pillow draws a box)."""
    charmap = FT2Font(font_path).get_charmap()
    return all(ord(char) in charmap for char in BYMERGE_CLASSES)


@functools.lru_cache(maxsize=1)
def glyph_atlas() -> np.ndarray:
    """(classes * fonts, TILE, TILE) float32 glyphs in [0, 1]; class c, font f is c * fonts + f."""
    fonts = [ImageFont.truetype(path, DRAW_FONT_PX) for path in font_paths()]
    if not fonts:
        raise UserError("This matplotlib ships none of the fonts the synthetic set is drawn from.")
    return np.stack([base_glyph(font, char) for char in BYMERGE_CLASSES for font in fonts])


def base_glyph(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    """Draw `char` large, crop it to its ink, shrink it to GLYPH_PX, centre it in a tile."""
    canvas = Image.new("L", (2 * DRAW_FONT_PX, 2 * DRAW_FONT_PX), 0)
    middle = (DRAW_FONT_PX, DRAW_FONT_PX)
    ImageDraw.Draw(canvas).text(middle, char, fill=255, font=font, anchor="mm")
    ink = canvas.crop(canvas.getbbox())
    fit = GLYPH_PX / max(ink.size)
    size = (max(1, round(ink.width * fit)), max(1, round(ink.height * fit)))
    ink = ink.resize(size, Image.Resampling.LANCZOS)
    tile = Image.new("L", (TILE, TILE), 0)
    tile.paste(ink, ((TILE - ink.width) // 2, (TILE - ink.height) // 2))
    return np.asarray(tile, dtype=np.float32) / 255.0


def warp(atlas: np.ndarray, glyph_ids: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Sample each glyph onto a WORK_PX canvas through a random affine map plus an elastic field."""
    n = len(glyph_ids)
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, n))
    cos, sin, zero, one = np.cos(angle), np.sin(angle), np.zeros(n), np.ones(n)
    rotate = np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], -2)
    slant = rng.uniform(-MAX_SHEAR, MAX_SHEAR, n)
    shear = np.stack([np.stack([one, zero], -1), np.stack([slant, one], -1)], -2)
    scale = rng.uniform(*SCALE_RANGE, (n, 2))[:, :, None] * np.eye(2)
    canvas_to_glyph = np.linalg.inv(rotate @ shear @ scale).astype(np.float32)

    centre = (WORK_PX - 1) / 2
    points = np.mgrid[0:WORK_PX, 0:WORK_PX].astype(np.float32) - centre + elastic_field(n, rng)
    source = np.einsum("nij,njhw->inhw", canvas_to_glyph, points) + (TILE - 1) / 2
    source = np.clip(source, 0, TILE - 1)  # off-glyph points land on the tile's zero border
    source[0] += (glyph_ids * TILE)[:, None, None]  # row in the atlas seen as one tall image
    flat_atlas = atlas.reshape(-1, TILE)
    ink = ndimage.map_coordinates(flat_atlas, source.reshape(2, -1), order=1)
    return ink.reshape(n, WORK_PX, WORK_PX)


def elastic_field(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 2, WORK_PX, WORK_PX) smooth random displacements: Gaussian-filtered white noise.

    The noise is drawn and filtered on a coarse grid, then upsampled bilinearly: the field is
    smooth at that scale anyway, and this is about 10x cheaper than filtering at full size.
    """
    noise = rng.standard_normal((n, 2, ELASTIC_GRID, ELASTIC_GRID), dtype=np.float32)
    smooth = ndimage.gaussian_filter(noise, sigma=(0, 0, ELASTIC_GRID_SIGMA, ELASTIC_GRID_SIGMA))
    smooth *= ELASTIC_STD / np.maximum(smooth.std(axis=(2, 3), keepdims=True), 1e-6)
    upsample = upsample_matrix()
    return upsample @ smooth @ upsample.T


@functools.lru_cache(maxsize=1)
def upsample_matrix() -> np.ndarray:
    """(WORK_PX, ELASTIC_GRID) float32 bilinear interpolation from the coarse grid to the canvas."""
    at = np.linspace(0, ELASTIC_GRID - 1, WORK_PX)
    nodes = np.arange(ELASTIC_GRID)
    columns = [np.interp(at, nodes, one_hot) for one_hot in np.eye(ELASTIC_GRID)]
    return np.stack(columns, axis=1).astype(np.float32)


def thicken(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Widen each example's strokes by a max filter of a random size."""
    sizes = rng.choice(STROKE_SIZES, p=STROKE_WEIGHTS, size=len(ink))
    for size in STROKE_SIZES[1:]:
        chosen = sizes == size
        ink[chosen] = ndimage.maximum_filter(ink[chosen], size=(1, size, size))
    return ink


def frame(ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Frame each canvas's ink as EMNIST framed its scans (the same function as `predict`), finish it: uint8."""
    framed = np.stack([frame_character(canvas) for canvas in ink]).astype(np.float32) / 255.0
    return finish(framed, rng)


def finish(out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Set each frame's peak to 217..255 and add noise on the ink: uint8 (the framing already blurred it)."""
    n = len(out)
    peak = np.maximum(out.max(axis=(1, 2), keepdims=True), 1e-6)
    out *= rng.uniform(0.85, 1.0, (n, 1, 1)) * 255.0 / peak
    visible = out > 25.0
    out[visible] += rng.normal(0.0, NOISE_STD, int(visible.sum()))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
