"""Any image file of one character to what the models get: 28x28 uint8, upright, white on black, framed like EMNIST."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from emnist_exp.errors import UserError

SIZE = 28  # the models' input field
NOISE = 0.2  # ink fainter than 20% of the darkest stroke is paper texture, shadow or JPEG ringing
SPECK = 0.01  # a blob holding under 1% of the ink is dust, not a stroke (an i's dot holds ~5%)
WORK_SIDE = 1024  # camera photos are shrunk to this first: a 72 px NIST-scale character needs far less detail
MAX_PIXELS = 50_000_000  # larger images are refused: a 50 MP photo is plenty, a bomb is far bigger
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")  # plain raster decoders only (no EPS/Ghostscript)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# EMNIST's own conversion (Cohen et al. 2017, arXiv 1702.05373, Fig. 1): a binary NIST scan, blurred
# (sigma 1), cropped to the blurred character, centred in a square with a border, bicubic down to 28x28,
# stretched to 0..255. The sizes below are fitted to the sample's train images, whose geometry
# `python benchmarks/own_images.py --geometry` prints beside this conversion's (BENCHMARKS.md):
# ink (>0) 24-26 px on the longer side, ink >127 20-24 px, box centred at 13.5, strokes 1-4 px wide.
NIST_SIDE = 64  # the longer side of the character's ink at NIST scale, px: with BORDER, 22 px of 28 at >127
BLUR_SIGMA = 1.0  # NIST px (the paper)
BLUR_TRUNCATE = 2.0  # the blur's support in sigmas: where the stored images' faint edge stops
BORDER = 6  # NIST px on each side of the blurred character's square: 2 px at 28
STROKE_RANGE = (3.8, 11.9)  # stroke width in NIST px, 5th..95th percentile of the train images: pens
                            # outside it are dilated or eroded (normalise_stroke)
STROKE_TARGET = 6.6  # NIST px, the train images' median: what a pen thinner than the range is given
ERODE_PASSES = 3  # erode, measure again: enough for a stroke 3x EMNIST's widest
INK_LEVEL = 0.5  # a NIST scan is binary: ink is where the character is at least half its full strength


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise a UserError that says in one sentence what is wrong."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not an image file: name the images in it, e.g. {path}/*.png.")
    if not path.is_file():
        raise UserError(f"{path}: no such file." if not path.exists() else f"{path} is not a regular file.")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty.")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; here any oversized image is refused.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=FORMATS) as image:
                _check_size(path, image.size)
                image.load()  # decode now: a truncated file fails here, not later inside the model
                _check_finite(path, image)
                return image
    except Image.UnidentifiedImageError:
        raise UserError(f"{path} is not an image this tool reads ({', '.join(FORMATS)}).") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{path} claims more than {MAX_PIXELS:,} pixels and is refused as a possible "
                        "decompression bomb.") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # what PIL raises for broken data
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} is damaged or truncated ({reason}).") from None


def _check_finite(path: Path, image: Image.Image) -> None:
    """A float image (TIFF mode F) may hold NaN or inf, which have no brightness to stretch."""
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise UserError(f"{path} holds NaN or infinite pixel values, which no brightness can be read from.")


def _check_size(path: Path, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_PIXELS:
        raise UserError(f"{path} claims {width}x{height} pixels, more than the {MAX_PIXELS:,} this tool reads, "
                        "and is refused as a possible decompression bomb.")


def to_emnist(image: Image.Image) -> np.ndarray:
    """The character as the models see it: 28x28 uint8, white on black, framed as EMNIST framed NIST's scans.

    grayscale -> invert if the background is light -> drop faint noise and specks -> crop to the
    character -> `frame_character` (EMNIST's own steps, with its stroke width).
    """
    ink = clean(page_ink(image))
    if not ink.any():
        raise UserError("no character found: the image is blank or has no contrast.")
    return frame_character(ink)


def page_ink(image: Image.Image) -> np.ndarray:
    """Ink amount in 0..1 over a zero background, upright (EXIF), at most WORK_SIDE px on a side."""
    return ink_map(shrink(grayscale(ImageOps.exif_transpose(image))))


def grayscale(image: Image.Image) -> np.ndarray:
    """Brightness as float32 in 0..1 (1 = white) for any mode; transparent pixels become white paper."""
    if image.mode in HIGH_BIT_MODES:
        gray = np.asarray(image, dtype=np.float32)
    else:
        if "A" in image.getbands() or "transparency" in image.info:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")  # CMYK, YCbCr, 1, P, ...: one well-defined route to luma
        gray = np.asarray(image.convert("L"), dtype=np.float32)
    low, high = float(gray.min()), float(gray.max())
    if high - low < 1e-6 * max(abs(high), 1.0):
        raise UserError("no character found: the image is one flat colour.")
    return (gray - low) / (high - low)  # stretched: grey paper and faint pencil are judged alike


def shrink(gray: np.ndarray) -> np.ndarray:
    """At most WORK_SIDE pixels on the longer side, area-averaged, so that thin strokes survive."""
    height, width = gray.shape
    factor = WORK_SIDE / max(height, width)
    if factor >= 1:
        return gray
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(gray, "F").resize(size, Image.Resampling.BOX))


def ink_map(gray: np.ndarray) -> np.ndarray:
    """Ink amount in 0..1 over a zero background: inverted when the border (the paper) is light."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    ink = 1.0 - gray if np.median(border) > 0.5 else gray
    paper = float(np.median(np.concatenate([ink[0], ink[-1], ink[:, 0], ink[:, -1]])))
    return np.clip(ink - paper, 0.0, None)


def clean(ink: np.ndarray) -> np.ndarray:
    """Zero the faint pixels (relative to the darkest stroke) and the blobs too small to be strokes."""
    ink = np.where(ink >= NOISE * ink.max(), ink, 0.0) if ink.max() > 0 else ink
    labels, count = ndimage.label(ink > 0, structure=np.ones((3, 3)))
    if count > 1:
        mass = ndimage.sum(ink, labels, index=np.arange(1, count + 1))
        keep = np.concatenate([[False], mass >= SPECK * mass.sum()])
        ink = np.where(keep[labels], ink, 0.0)
    return ink


def crop(ink: np.ndarray) -> np.ndarray:
    """The smallest rectangle holding all the ink (an empty array has none: returned as is)."""
    ys, xs = np.nonzero(ink)
    if len(ys) == 0:
        return ink
    return ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]


def frame_character(ink: np.ndarray) -> np.ndarray:
    """One character's ink (any size, 0 = background) framed like EMNIST: 28x28 uint8, peak 255.

    The character is scaled to NIST size and made binary, its stroke width brought into EMNIST's
    range (`nist_mask`), then EMNIST's steps: blur (`blur_sigma`), crop, centre in a square with a
    border, bicubic to 28, 0..255.
    """
    if not ink.any():
        raise UserError("no character found: the image is blank or has no contrast.")
    mask = nist_mask(crop(ink))
    return emnist_steps(mask, blur_sigma(mask))


def emnist_steps(mask: np.ndarray, sigma: float) -> np.ndarray:
    """EMNIST's own steps on a binary NIST-scale mask: blur by `sigma` px, crop, centre in a square with a
    border, bicubic to 28x28, stretch to 0..255."""
    pad = BORDER + int(np.ceil(BLUR_TRUNCATE * sigma))
    blurred = ndimage.gaussian_filter(np.pad(mask.astype(np.float32), pad), sigma, truncate=BLUR_TRUNCATE)
    square = centre_square(crop(np.where(blurred > 1e-3, blurred, 0.0)))
    field = np.clip(resize(square, (SIZE, SIZE), Image.Resampling.BICUBIC), 0.0, None)
    return np.round(field * (255.0 / field.max())).astype(np.uint8)


def blur_sigma(mask: np.ndarray) -> float:
    """The blur, in px of the NIST_SIDE mask, that EMNIST's sigma of 1 scan px amounts to for this character.

    NIST's writers used much the same pen on every character, so a stroke that is wide for the
    character's size marks a small character in the 128 px scan, on which the fixed 1 px blur is
    relatively wider: EMNIST's thick-stroked images are the softer ones, with a smaller box above
    127 (the sample's train images: stroke width and box side correlate at -0.66). The mask's
    stroke width against STROKE_TARGET gives the character's size in the scan, hence the blur.
    Against one sigma for all, this brought a 128 px scan round trip closer to the stored images
    (mean absolute difference 10.3 -> 9.1 grey levels on 300 train images).
    """
    width = float(np.clip(stroke_width(mask), *STROKE_RANGE))
    return BLUR_SIGMA * width / STROKE_TARGET


def resize(patch: np.ndarray, shape: tuple[int, int], method: Image.Resampling) -> np.ndarray:
    """`patch` (float) resampled to `shape` (rows, columns) by PIL, which widens its filter to shrink."""
    image = Image.fromarray(patch.astype(np.float32), "F")
    return np.asarray(image.resize((shape[1], shape[0]), method))


def nist_mask(patch: np.ndarray, *, stroke: bool = True) -> np.ndarray:
    """The character scaled so that its ink (INK_LEVEL) spans NIST_SIDE (aspect kept), binary like a NIST
    scan, with its stroke width brought into EMNIST's range.

    The size is taken at INK_LEVEL, not from the faintest ink, so that a blurred or a crisp image of
    one character come out the same size. A large image is made binary and its strokes adjusted at
    full size, where a fine pen's line is still whole, and only then averaged down. `stroke=False`
    leaves the strokes as they are (to measure them).
    """
    adjust = normalise_stroke if stroke else lambda mask, scale=1.0: mask
    patch = crop(np.where(patch >= INK_LEVEL * patch.max(), patch, 0.0))
    height, width = patch.shape
    factor = NIST_SIDE / max(height, width)
    shape = (max(1, round(height * factor)), max(1, round(width * factor)))
    if factor < 1:
        mask = adjust(patch >= INK_LEVEL * patch.max(), 1 / factor)
        return resize(crop(mask).astype(np.float32), shape, Image.Resampling.BOX) >= 0.5
    scaled = resize(patch, shape, Image.Resampling.BICUBIC)  # enlarging interpolates: the binary edge is smooth
    return adjust(scaled >= INK_LEVEL * scaled.max())


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in px: from the distance to the background along the strokes' ridge.

    A stroke w px wide has its ridge (w + 1) / 2 px from the background (distances count to the
    nearest background pixel's centre), hence 2d - 1.
    """
    distance = ndimage.distance_transform_edt(np.pad(mask, 1))
    ridge = (distance > 0) & (distance >= ndimage.maximum_filter(distance, size=3))
    return float(2 * distance[ridge].mean() - 1) if ridge.any() else 0.0


def normalise_stroke(mask: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Dilate a thinner pen than EMNIST's to its median width, erode a thicker one to STROKE_RANGE's top.

    Thickening a fine pen to the median read better than to the range's bottom (its lines carry no
    width of their own); thinning a broad pen further than the top lost more than it gained, as its
    filled holes stay filled (benchmarks/own_images.py). `scale` is the mask's px per NIST px.
    """
    width = stroke_width(mask)
    low, high = STROKE_RANGE[0] * scale, STROKE_RANGE[1] * scale
    if low <= width <= high:
        return mask
    if width < low:
        radius = (STROKE_TARGET * scale - width) / 2 + 0.5  # whole pixels: round the radius, don't floor it
        padded = np.pad(mask, int(np.ceil(radius)) + 1)
        return ndimage.distance_transform_edt(~padded) <= radius
    for _ in range(ERODE_PASSES):  # the ridge's mean width falls slower than the erosion at corners and ends
        # Every ink pixel is >= 1 from the background: peel at least that one layer.
        eroded = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1] > max(1.0, (width - high) / 2)
        if not eroded.any():
            return mask  # a blob too thick to erode is kept whole
        mask, width = eroded, stroke_width(eroded)
        if width <= high:
            break
    return mask


def centre_square(patch: np.ndarray) -> np.ndarray:
    """`patch` in the middle of a square (its longer side plus BORDER each way), aspect kept."""
    height, width = patch.shape
    side = max(height, width) + 2 * BORDER
    top, left = (side - height + 1) // 2, (side - width + 1) // 2  # odd slack below/right, as EMNIST's sit
    square = np.zeros((side, side), np.float32)
    square[top : top + height, left : left + width] = patch
    return square


def geometry(image: np.ndarray) -> dict[str, float]:
    """What EMNIST's images share, of one 28x28 image: ink box sides, box centre, ink pixels, stroke width."""
    strong, faint = image > 127, image > 0
    ys, xs = np.nonzero(faint)
    sy, sx = np.nonzero(strong)
    if len(sy) == 0:
        raise ValueError("the image has no ink above 127")
    sides = sorted((int(np.ptp(sy)) + 1, int(np.ptp(sx)) + 1))
    return {
        "longer side >0": float(max(np.ptp(ys), np.ptp(xs)) + 1),
        "longer side >127": float(sides[1]),
        "shorter side >127": float(sides[0]),
        "box centre row": (sy.min() + sy.max()) / 2,
        "box centre column": (sx.min() + sx.max()) / 2,
        "ink pixels >127": float(strong.sum()),
        "stroke width >127": stroke_width(strong),
    }
