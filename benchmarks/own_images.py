"""Own images: test images of the sample saved as a user's files, read back through `predict`'s conversion.

    python benchmarks/own_images.py --model runs:/<trial run id>/model [--images 3000] [--lines 300]
    python benchmarks/own_images.py --geometry      # EMNIST's measured geometry against the conversion's
    python benchmarks/own_images.py --smoke --model ...

Each condition renders the same test images (stored 28x28, upright) as a page: enlarged, dark ink on
paper, then degraded as named. The files go through preprocess.load_image and to_emnist, exactly as
`predict` reads them, and one model classifies both the stored and the converted images. Lines put
3-10 test characters side by side with random gaps and go through segment.line_characters, as
`predict --line` does. The stand-in: these "scans" are enlarged EMNIST images, not new handwriting.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from emnist_exp import preprocess, segment  # noqa: E402
from emnist_exp.builders.idx import IdxStream, read_labels  # noqa: E402

SAMPLE = "../shared/data/emnist-bymerge-sample"
PAPER, INK = 235, 25  # a white page and a dark pen
CHAR_PX = 64  # a line's characters: a 5 mm character scanned at 300 dpi

# name -> (field side in px, how the page is degraded)
CONDITIONS = {
    "clean scan, 60 px": (60, None),
    "clean scan, 128 px": (128, None),
    "clean scan, 300 px": (300, None),
    "thin pen (eroded 4 px at 300 px)": (300, "thin"),
    "fine pen (6 px strokes at 300 px)": (300, "fine"),
    "thick pen (dilated 8 px at 300 px)": (300, "thick"),
    "binarised like NIST (128 px)": (128, "binary"),
    "JPEG quality 70 (128 px)": (128, "jpeg"),
    "grey paper, shadow gradient (128 px)": (128, "shadow"),
    "off-centre on a 1000x700 page (128 px)": (128, "page"),
    "rotated +5 degrees (128 px)": (128, "rotate+"),
    "rotated -5 degrees (128 px)": (128, "rotate-"),
}
PEN_RADIUS = 8  # px at 300 px: an EMNIST stroke there is ~28 px wide, a thick pen's ~44 px
THIN_RADIUS = 4  # px at 300 px: ~20 px strokes; EMNIST's thinnest (~20 px) keep ~12 px, none vanishes
FINE_PEN = 6  # px at 300 px: a fineliner, a fifth of EMNIST's median stroke, every stroke alike


def read_images(path: str) -> np.ndarray:
    """All images of one gzip IDX3 file, as stored (transposed)."""
    return np.concatenate(list(IdxStream(path, "images").blocks()))


def load_test(folder: str, count: int, seed: int, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """`count` images of `split` (upright uint8) and their labels, a seeded random choice."""
    images = read_images(str(Path(folder) / f"emnist-bymerge-{split}-images-idx3-ubyte.gz"))
    labels = read_labels(str(Path(folder) / f"emnist-bymerge-{split}-labels-idx1-ubyte.gz"))
    pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return np.ascontiguousarray(images[pick].transpose(0, 2, 1)), labels[pick].astype(np.int64)


def page(ink: np.ndarray) -> np.ndarray:
    """White-on-black ink (0..1) as dark ink on paper, uint8."""
    return np.clip(np.rint(PAPER - (PAPER - INK) * ink), 0, 255).astype(np.uint8)


def enlarge(image: np.ndarray, side: int) -> np.ndarray:
    """A stored 28x28 image as ink 0..1 in a side x side field (bicubic, as a scanner's optics blur)."""
    big = Image.fromarray(image.astype(np.float32) / 255.0, "F").resize((side, side), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big), 0.0, 1.0)


def render(image: np.ndarray, side: int, how: str | None, rng: np.random.Generator) -> bytes:
    """One stored image as the bytes of a user's file in the named condition."""
    ink = enlarge(image, side)
    if how == "fine":
        ink = fine_pen(ink)
    if how in ("thin", "thick"):
        radius = THIN_RADIUS if how == "thin" else PEN_RADIUS
        disk = np.hypot(*np.mgrid[-radius : radius + 1, -radius : radius + 1]) <= radius
        ink = (ndimage.grey_erosion if how == "thin" else ndimage.grey_dilation)(ink, footprint=disk)
    if how == "binary":
        ink = (ink >= 0.5).astype(np.float32)
    paper = page(ink)
    if how == "shadow":  # grey paper darkening towards one corner, a weaker pen
        shade = np.linspace(0, 70, side)[None, :] + np.linspace(0, 40, side)[:, None]
        paper = np.clip(paper.astype(np.float32) * 0.8 - shade + 10, 0, 255).astype(np.uint8)
    picture = Image.fromarray(paper, "L")
    if how and how.startswith("rotate"):
        angle = 5.0 if how == "rotate+" else -5.0
        picture = picture.rotate(angle, Image.Resampling.BICUBIC, expand=True, fillcolor=PAPER)
    if how == "page":
        sheet = Image.new("L", (1000, 700), PAPER)
        sheet.paste(picture, (int(rng.integers(40, 1000 - side - 40)), int(rng.integers(40, 700 - side - 40))))
        picture = sheet
    buffer = io.BytesIO()
    if how == "jpeg":
        picture.convert("RGB").save(buffer, "JPEG", quality=70)
    else:
        picture.convert("RGB").save(buffer, "PNG")
    return buffer.getvalue()


def fine_pen(ink: np.ndarray) -> np.ndarray:
    """The strokes redrawn FINE_PEN px wide along their skeleton (eroding instead would wipe out
    EMNIST's thinnest strokes before its thickest got thin)."""
    return (ndimage.distance_transform_edt(~skeleton(ink >= 0.5)) <= FINE_PEN / 2).astype(np.float32)


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Zhang & Suen's thinning (CACM 1984): peel boundary pixels that keep the shape connected."""
    image = np.pad(mask, 1).astype(np.uint8)
    while True:
        changed = False
        for step in (0, 1):
            p = [np.roll(image, shift, (0, 1)) for shift in
                 ((1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1))]  # P2..P9, clockwise from north
            neighbours = sum(p)
            ring = p + p[:1]
            transitions = sum((ring[i] == 0) & (ring[i + 1] == 1) for i in range(8))
            if step == 0:
                clear = (p[0] * p[2] * p[4] == 0) & (p[2] * p[4] * p[6] == 0)
            else:
                clear = (p[0] * p[2] * p[6] == 0) & (p[0] * p[4] * p[6] == 0)
            peel = (image == 1) & (neighbours >= 2) & (neighbours <= 6) & (transitions == 1) & clear
            if peel.any():
                image[peel] = 0
                changed = True
        if not changed:
            return image[1:-1, 1:-1].astype(bool)


def read_back(data: bytes, folder: Path, name: str) -> Image.Image:
    """The file written to disk and read by predict's own loader."""
    path = folder / name
    path.write_bytes(data)
    return preprocess.load_image(path)


def accuracy(scores: np.ndarray, labels: np.ndarray) -> float:
    return float((scores.argmax(axis=1) == labels).mean())


# ---- lines ------------------------------------------------------------------------------------------


def compose_line(chars: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, list[bool], float]:
    """Ink of characters side by side at CHAR_PX, gaps of 0.25-0.75 median widths, some word gaps.

    Returns the ink, whether a word gap precedes each character, and the smallest gap in widths.
    """
    fields = [enlarge(c, CHAR_PX * 28 // 24) for c in chars]
    crops = [preprocess.crop(np.where(f > 0.02, f, 0.0)) for f in fields]  # bicubic's faint ringing is no ink
    width = float(np.median([c.shape[1] for c in crops]))
    spaces = [False] + [bool(rng.random() < 0.15) for _ in crops[1:]]
    gaps = [0.0] + [rng.uniform(1.5, 2.5) if s else rng.uniform(0.25, 0.75) for s in spaces[1:]]
    pad = CHAR_PX // 2
    height = max(c.shape[0] for c in crops) + 2 * pad
    total = sum(c.shape[1] for c in crops) + int(sum(np.ceil(g * width) for g in gaps)) + 2 * pad
    ink = np.zeros((height, total), np.float32)
    x = pad
    for crop, gap in zip(crops, gaps):
        x += int(np.ceil(gap * width))
        top = (height - crop.shape[0]) // 2
        ink[top : top + crop.shape[0], x : x + crop.shape[1]] = crop
        x += crop.shape[1]
    return ink, spaces, min(gaps[1:], default=0.0)


def line_rows(model, images, labels, n_lines: int, rng, folder: Path) -> list[tuple[str, str]]:
    """Character accuracy in lines against the same characters alone, and segmentation counts."""
    found = exact = chars = right_line = spaces_right = space_total = 0
    single_inputs, line_inputs, truth, stored = [], [], [], []
    start = 0
    for n in range(n_lines):
        k = int(rng.integers(3, 11))
        if start + k > len(images):
            start = 0
        chars_idx = range(start, start + k)
        start += k
        ink, spaces, _ = compose_line([images[i] for i in chars_idx], rng)
        picture = read_back(encode(page(ink)), folder, "line.png")
        segments, framed = segment.line_characters(picture)
        for i in chars_idx:  # the same character alone, as one file at the line's scale
            single_inputs.append(preprocess.to_emnist(read_back(render(images[i], CHAR_PX * 28 // 24, None, rng),
                                                                folder, "one.png")))
        truth.extend(labels[i] for i in chars_idx)
        stored.extend(images[i] for i in chars_idx)
        chars += k
        if len(segments) == k:
            exact += 1
            line_inputs.extend(framed)
            spaces_right += sum(s.space_before == w for s, w in zip(segments, spaces))
            space_total += k
        else:
            line_inputs.extend([None] * k)
        found += len(segments)
    truth = np.array(truth)
    single = model.class_scores(np.stack(single_inputs)).argmax(axis=1) == truth
    as_stored = model.class_scores(np.stack(stored)).argmax(axis=1) == truth
    have = [i for i, x in enumerate(line_inputs) if x is not None]
    in_line = np.zeros(len(truth), bool)
    if have:
        in_line[have] = model.class_scores(np.stack([line_inputs[i] for i in have])).argmax(axis=1) == truth[have]
    right_line = int(in_line.sum())
    return [
        ("lines (3-10 characters, gaps >= 0.25 median widths)", f"{n_lines}"),
        ("lines with every character found (none merged or split)", f"{exact} of {n_lines}"),
        ("characters in lines / segments found", f"{chars} / {found}"),
        ("word gaps read right (lines found whole)", f"{spaces_right} of {space_total}"),
        ("character accuracy, as stored", f"{as_stored.mean():.4f}"),
        ("character accuracy, one file per character", f"{single.mean():.4f}"),
        ("character accuracy, in lines (split lines count wrong)", f"{right_line / len(truth):.4f}"),
        ("in lines minus one at a time", f"{100 * (right_line / len(truth) - single.mean()):+.2f} points"),
    ]


def encode(paper: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(paper, "L").save(buffer, "PNG")
    return buffer.getvalue()


# ---- geometry ---------------------------------------------------------------------------------------


def train_images(folder: str, count: int, seed: int) -> np.ndarray:
    images = read_images(str(Path(folder) / "emnist-bymerge-train-images-idx3-ubyte.gz"))
    pick = np.random.default_rng(seed).choice(len(images), size=min(count, len(images)), replace=False)
    return np.ascontiguousarray(images[pick].transpose(0, 2, 1))


def geometry_table(folder: str, count: int, seed: int, work: Path) -> list[str]:
    """Percentiles (5, 50, 95) of EMNIST's geometry on train, and of the conversion after a 128 px scan."""
    images = train_images(folder, count, seed)
    rng = np.random.default_rng(seed)
    converted = [preprocess.to_emnist(read_back(render(im, 128, None, rng), work, "g.png")) for im in images]
    stored = [preprocess.geometry(im) for im in images]
    ours = [preprocess.geometry(im) for im in converted]
    nist = [preprocess.stroke_width(preprocess.nist_mask(im.astype(np.float32), stroke=False)) for im in images]
    out = [f"{'measure (5th / median / 95th percentile)':<34}  {'EMNIST train':>20}  {'after a 128 px scan':>20}"]
    for key in stored[0]:
        cells = [np.percentile([g[key] for g in rows], [5, 50, 95]) for rows in (stored, ours)]
        out.append(f"{key:<34}  " + "  ".join(f"{'%.1f / %.1f / %.1f' % tuple(c):>20}" for c in cells))
    out.append(f"{'stroke width at NIST scale':<34}  {'%.1f / %.1f / %.1f' % tuple(np.percentile(nist, [5, 50, 95])):>20}"
               f"  {'(STROKE_RANGE %.1f..%.1f)' % preprocess.STROKE_RANGE:>20}")
    profile = np.concatenate([im[im > 0] for im in images])
    ours_profile = np.concatenate([im[im > 0] for im in converted])
    bins = np.arange(0, 257, 64)
    out.append(f"{'ink levels 1-63/64-127/128-191/192+':<34}  "
               + "  ".join(f"{' / '.join(f'{v:.2f}' for v in np.histogram(p, bins)[0] / len(p)):>20}"
                           for p in (profile, ours_profile)))
    return out


def condition_rows(model, images, labels, rng, folder: Path) -> list[tuple[str, float, float]]:
    """(condition, accuracy as stored, after predict's conversion), each row printed as it is measured."""
    stored = accuracy(model.class_scores(images), labels)
    width = max(len(name) for name in CONDITIONS)
    print(f"{'condition':<{width}}  as stored  converted  change", flush=True)
    rows = []
    for name, (side, how) in CONDITIONS.items():
        converted = np.stack([preprocess.to_emnist(read_back(render(im, side, how, rng), folder, "c.png"))
                              for im in images])
        rows.append((name, stored, accuracy(model.class_scores(converted), labels)))
        print(f"{name:<{width}}  {stored:9.4f}  {rows[-1][2]:9.4f}  {100 * (rows[-1][2] - stored):+.2f} points",
              flush=True)
    mean = np.mean([c - s for _, s, c in rows])
    print(f"{'mean over conditions':<{width}}  {stored:9.4f}  {stored + mean:9.4f}  {100 * mean:+.2f} points")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model URI, e.g. runs:/<trial run id>/model")
    parser.add_argument("--sample", default=os.environ.get("EMNIST_SAMPLE_DIR", SAMPLE),
                        help="the EMNIST sample folder (default: EMNIST_SAMPLE_DIR, else " + SAMPLE + ")")
    parser.add_argument("--images", type=int, default=3000, help="test images per condition")
    parser.add_argument("--lines", type=int, default=300, help="composed lines")
    parser.add_argument("--train-images", type=int, default=3000, help="train images for the geometry table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--geometry", action="store_true", help="print only the geometry table (no model)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: a check that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.lines = 40, 4
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("\n".join(geometry_table(args.sample, 200 if args.smoke else args.train_images, args.seed, work)),
              flush=True)
        if args.geometry:
            return
        if not args.model:
            sys.exit("error: --model is needed for the accuracy tables.")
        from emnist_exp import serving

        model = serving.load_model(args.model)
        images, labels = load_test(args.sample, args.images, args.seed)
        rng = np.random.default_rng(args.seed)
        start = time.perf_counter()
        print(f"\nmodel {args.model}; {len(images)} test images of the sample; stand-in: enlarged EMNIST images")
        condition_rows(model, images, labels, rng, work)
        lines = line_rows(model, images, labels, args.lines, rng, work)
        width = max(len(r[0]) for r in lines)
        print()
        for name, value in lines:
            print(f"{name:<{width}}  {value}")
        print(f"\n{time.perf_counter() - start:.0f} s for conditions and lines")


if __name__ == "__main__":
    main()
