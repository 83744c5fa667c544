"""Any image file of one character to what the models get: 28x28 uint8, upright, white on black."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from scipy import ndimage

from emnist_exp.errors import UserError

SIZE = 28  # the models' input field
BOX = 20  # MNIST: the character's longer side fits a 20x20 box, then the field is padded to 28x28
NOISE = 0.2  # ink fainter than 20% of the darkest stroke is paper texture, shadow or JPEG ringing
SPECK = 0.01  # a blob holding under 1% of the ink is dust, not a stroke (an i's dot holds ~5%)
WORK_SIDE = 1024  # camera photos are shrunk to this first: a 20 px target needs far less detail
MAX_PIXELS = 50_000_000  # larger images are refused: a 50 MP photo is plenty, a bomb is far bigger
FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")  # plain raster decoders only (no EPS/Ghostscript)
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image file, or raise a UserError that says in one sentence what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file.")
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
    """The character as the models see it: 28x28 uint8, white on black, longer side 20 px, centred by mass.

    grayscale -> invert if the background is light -> drop faint noise and specks -> crop to the
    character -> scale the longer side to 20 px (aspect kept) -> paste so the centre of mass is the
    field's centre (LeCun et al., http://yann.lecun.com/exdb/mnist/).
    """
    ink = clean(ink_map(shrink(grayscale(ImageOps.exif_transpose(image)))))
    ys, xs = np.nonzero(ink)
    if len(ys) == 0:
        raise UserError("no character found: the image is blank or has no contrast.")
    return centre(scale(ink[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))


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


def scale(patch: np.ndarray) -> np.ndarray:
    """The cropped character with its longer side at BOX pixels, aspect ratio kept (Lanczos)."""
    height, width = patch.shape
    factor = BOX / max(height, width)
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    resized = np.asarray(Image.fromarray(patch.astype(np.float32), "F").resize(size, Image.Resampling.LANCZOS))
    return np.clip(resized, 0.0, None)  # Lanczos overshoots a little below zero next to strokes


def centre(patch: np.ndarray) -> np.ndarray:
    """Paste into the 28x28 field so that the centre of mass is at the middle, then scale to 0..255."""
    cy, cx = ndimage.center_of_mass(patch)
    middle = (SIZE - 1) / 2  # 13.5: the field's centre in pixel-index coordinates
    top = int(np.clip(round(middle - cy), 0, SIZE - patch.shape[0]))  # never push a stroke off the field
    left = int(np.clip(round(middle - cx), 0, SIZE - patch.shape[1]))
    field = np.zeros((SIZE, SIZE), np.float32)
    field[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return np.round(field * (255.0 / field.max())).astype(np.uint8)
