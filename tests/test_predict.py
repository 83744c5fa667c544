"""Own images to model input (geometry, modes, bad files) and `python -m emnist_exp.predict` end to end."""

from __future__ import annotations

import struct
from pathlib import Path
import zlib

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from emnist_exp import preprocess
from emnist_exp.classes import BYMERGE_CLASSES
from emnist_exp.errors import UserError

PAPER, INK = 225, 30  # a grey-ish page and a dark pen, as a photo or scan gives them


def draw_l(size=(320, 200), left=210, top=40, paper=PAPER, ink=INK, mode="L") -> Image.Image:
    """A dark 'L' (120 px tall, 60 px wide, strokes 12 px) off-centre on a light, non-square page."""
    if mode == "RGB" and isinstance(paper, int):
        paper, ink = (paper,) * 3, (ink,) * 3
    image = Image.new(mode, size, paper)
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, left + 11, top + 119], fill=ink)
    draw.rectangle([left, top + 108, left + 59, top + 119], fill=ink)
    return image


def assert_model_input(out: np.ndarray) -> None:
    """28x28 uint8, white on black, framed like EMNIST (box centred, ink >127 22 px long), upright, aspect kept."""
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255
    assert not np.concatenate([out[0], out[-1], out[:, 0], out[:, -1]]).any(), "the background must be black"
    assert (out > 127).mean() < 0.35, "mostly background: white ink on black, not inverted"
    shape = preprocess.geometry(out)
    assert 20 <= shape["longer side >127"] <= 24 and 9 <= shape["shorter side >127"] <= 13, shape
    assert abs(shape["box centre row"] - 13.5) <= 0.5 and abs(shape["box centre column"] - 13.5) <= 0.5, shape
    rows, cols = out.sum(axis=1), out.sum(axis=0)
    assert rows.argmax() > 14 and cols.argmax() < 14, "an upright L: its heaviest row is low, its column left"


def rgba_on_transparent() -> Image.Image:
    """Dark ink on fully transparent BLACK: flattening without the alpha would lose the character."""
    image = Image.new("RGBA", (320, 200), (0, 0, 0, 0))
    ink = draw_l(paper=0, ink=255).point(lambda v: 255 if v else 0)
    image.paste(Image.new("RGBA", image.size, (20, 20, 60, 255)), mask=ink)
    return image


def sixteen_bit() -> Image.Image:
    return Image.fromarray((np.asarray(draw_l(), np.uint16) * 257).astype(np.uint16))  # mode I;16


def noisy_photo() -> Image.Image:
    """Uneven paper, faint grain and a dust speck far from the character."""
    rng = np.random.default_rng(3)
    page = np.asarray(draw_l(), np.float32) + rng.normal(0, 6, (200, 320)) + np.linspace(-15, 15, 320)
    page[20:23, 20:23] = INK  # the speck: dark, but far too small to be a stroke
    return Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)).convert("RGB")


VARIANTS = {
    "L": draw_l,
    "RGB": lambda: draw_l(mode="RGB", paper=(230, 225, 210), ink=(20, 30, 90)),
    "RGBA": rgba_on_transparent,
    "P": lambda: draw_l(mode="RGB").convert("P"),
    "I;16": sixteen_bit,
    "white-on-black": lambda: draw_l(paper=0, ink=255),
    "noisy": noisy_photo,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_character_becomes_centred_white_on_black_28x28(variant):
    assert_model_input(preprocess.to_emnist(VARIANTS[variant]()))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp"])
def test_files_of_each_format_load_and_convert(tmp_path, suffix):
    path = tmp_path / f"l{suffix}"
    draw_l(mode="RGB").save(path)
    assert_model_input(preprocess.to_emnist(preprocess.load_image(path)))


def test_sixteen_bit_png_file_keeps_its_mode(tmp_path):
    sixteen_bit().save(tmp_path / "deep.png")
    image = preprocess.load_image(tmp_path / "deep.png")
    assert image.mode.startswith("I")
    assert_model_input(preprocess.to_emnist(image))


def test_a_tiny_character_is_scaled_up():
    small = draw_l().resize((32, 20), Image.Resampling.BOX)  # the L is now ~12x6 px
    assert_model_input(preprocess.to_emnist(small))


def test_blank_image_is_a_user_error():
    with pytest.raises(UserError, match="no character"):
        preprocess.to_emnist(Image.new("RGB", (50, 40), "white"))


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and header for a huge grey image, with one tiny data chunk."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(
        b"IEND", b"")


def bad_files(folder) -> dict[str, str]:
    """name -> a word its one-line error must contain."""
    (folder / "notes.png").write_text("this is a text file, not a picture\n")
    (folder / "empty.png").write_bytes(b"")
    draw_l().save(folder / "whole.png")
    whole = (folder / "whole.png").read_bytes()
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    return {"notes.png": "not an image", "empty.png": "empty", "truncated.png": "truncated",
            "bomb.png": "decompression bomb", "missing.png": "no such file"}


def test_bad_files_each_give_one_sentence(tmp_path):
    for name, words in bad_files(tmp_path).items():
        with pytest.raises(UserError) as caught:
            preprocess.load_image(tmp_path / name)
        message = str(caught.value)
        assert words in message and name in message and "\n" not in message, message


def test_images_over_the_pixel_limit_are_refused(tmp_path, monkeypatch):
    draw_l().save(tmp_path / "big.png")
    monkeypatch.setattr(preprocess, "MAX_PIXELS", 320 * 200 - 1)
    with pytest.raises(UserError, match="decompression bomb"):
        preprocess.load_image(tmp_path / "big.png")


# ---- the entry point, on the tiny study's registered ensemble -------------------------------------


def good_files(folder) -> list[str]:
    draw_l(mode="RGB").save(folder / "ell.png")
    rgba_on_transparent().save(folder / "ell-rgba.png")
    return [str(folder / "ell.png"), str(folder / "ell-rgba.png")]


def parse_line(text: str) -> tuple[str, str, float, list[tuple[str, float]]]:
    head, top = text.split("   top ")
    path, character, confidence = head.split()
    pairs = [p.split() for p in top.split(": ", 1)[1].split(", ")]
    return path, character, float(confidence), [(c, float(p)) for c, p in pairs]


@pytest.mark.slow
def test_predict_prints_each_good_file_and_one_error_line_per_bad_one(tiny_ensemble, tmp_path, capsys):
    import mlflow

    from emnist_exp import predict

    good = good_files(tmp_path)
    bad = [str(tmp_path / name) for name in bad_files(tmp_path)]
    saved = tmp_path / "seen"
    code = predict.main([good[0], *bad, good[1], "--save-preprocessed", str(saved)])
    out, err = capsys.readouterr()
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) and all(any(b in e for e in errors) for b in bad), err
    lines = out.splitlines()
    assert [parse_line(line)[0] for line in lines] == good
    # Without --model, predict takes the latest registered version (other tests may register more).
    model = mlflow.pyfunc.load_model(predict.default_model())
    inputs = np.stack([preprocess.to_emnist(preprocess.load_image(p)) for p in good])
    expected = model.predict(inputs.astype(np.float32))
    for line, (_, row) in zip(lines, expected.iterrows()):
        _, character, confidence, top = parse_line(line)
        assert character == row["character"] and character in BYMERGE_CLASSES
        assert confidence == pytest.approx(row["probability"], abs=5e-4)
        assert len(top) == 3 and top[0] == (character, confidence)
        assert [p for _, p in top] == sorted((p for _, p in top), reverse=True)
    for name, image in zip(["ell", "ell-rgba"], inputs):
        assert np.array_equal(np.asarray(Image.open(saved / f"{name}.png")), image)


@pytest.mark.slow
def test_predict_with_a_trial_keras_model(tiny_ensemble, tmp_path, capsys):
    import mlflow

    from emnist_exp import predict
    from emnist_exp.tracking import queries

    run = queries.finished_trials(study="tiny")[0]
    uri = f"runs:/{run.info.run_id}/model"
    good = good_files(tmp_path)
    assert predict.main([*good, "--model", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    inputs = np.stack([preprocess.to_emnist(preprocess.load_image(p)) for p in good])
    probs = mlflow.pyfunc.load_model(uri).predict(inputs[..., None].astype(np.float32))
    for line, row in zip(lines, probs):
        _, character, confidence, top = parse_line(line)
        assert character == BYMERGE_CLASSES[row.argmax()]
        assert confidence == pytest.approx(float(row.max()), abs=5e-4)
        assert [c for c, _ in top] == [BYMERGE_CLASSES[i] for i in np.argsort(-row)[:3]]


def test_predict_without_a_registered_ensemble_says_what_to_run(tmp_path, capsys, workdir):
    import mlflow

    from emnist_exp import predict

    draw_l().save(tmp_path / "ell.png")
    session_store = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        code = predict.main([str(tmp_path / "ell.png")])
    finally:
        mlflow.set_tracking_uri(session_store)
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and "python -m emnist_exp.ensemble" in errors[0], errors


# ---- EMNIST's geometry, on real sample images sent through a scan round trip -----------------------


def sample_images(folder, split: str, count: int) -> np.ndarray:
    from emnist_exp.builders.idx import IdxStream

    blocks = IdxStream(str(folder / f"emnist-bymerge-{split}-images-idx3-ubyte.gz"), "images").blocks(count)
    return np.ascontiguousarray(next(blocks).transpose(0, 2, 1))  # upright


def scan(image: np.ndarray, side: int = 128) -> Image.Image:
    """A stored image as a user's scan: enlarged, dark ink on light paper, in RGB."""
    big = Image.fromarray(image).resize((side, side), Image.Resampling.BICUBIC)
    return Image.fromarray((PAPER - (PAPER - INK) * (np.asarray(big) / 255.0)).astype(np.uint8)).convert("RGB")


def test_scanned_sample_images_come_back_within_emnists_measured_ranges(sample_dir):
    train = [preprocess.geometry(image) for image in sample_images(sample_dir, "train", 2000)]
    ranges = {key: np.percentile([g[key] for g in train], [0.5, 99.5]) for key in train[0]}  # 99% of EMNIST
    assert ranges["longer side >127"][1] - ranges["longer side >127"][0] >= 2, ranges  # a real spread measured
    for image in sample_images(sample_dir, "test", 12):
        shape = preprocess.geometry(preprocess.to_emnist(scan(image)))
        for key in ("longer side >0", "longer side >127", "box centre row", "box centre column",
                    "stroke width >127"):
            low, high = ranges[key]
            assert low <= shape[key] <= high, (key, shape[key], (low, high))


@pytest.mark.parametrize("pen", ["thin", "thick"])
def test_a_pen_far_from_nists_is_brought_into_emnists_stroke_range(pen, sample_dir):
    width = 2 if pen == "thin" else 40  # the L's strokes: 12 px of 121 in draw_l, so 2 and 40 are extreme
    image = Image.new("L", (200, 200), PAPER)
    draw = ImageDraw.Draw(image)
    draw.rectangle([40, 30, 40 + width - 1, 150], fill=INK)
    draw.rectangle([40, 150 - width + 1, 40 + 70, 150], fill=INK)
    before = width * preprocess.NIST_SIDE / 121  # the drawn stroke at NIST scale (the L is 121 px tall)
    low, high = preprocess.STROKE_RANGE
    assert (before < low) if pen == "thin" else (before > high), before
    train = [preprocess.geometry(image)["stroke width >127"] for image in sample_images(sample_dir, "train", 2000)]
    emnist = np.percentile(train, [0.5, 99.5])
    after = preprocess.geometry(preprocess.to_emnist(image))["stroke width >127"]
    assert emnist[0] <= after <= emnist[1], (after, emnist)


def test_synthetic_set_is_framed_by_the_same_function():
    from emnist_exp.builders import synthetic

    images = synthetic.render_batch(np.arange(47), np.random.default_rng(0))
    for image in images:
        shape = preprocess.geometry(image)
        # EMNIST's 0.5th..99.5th percentiles on 3,000 of the sample's train images
        assert 13.0 <= shape["box centre row"] <= 14.0 and 12.5 <= shape["box centre column"] <= 15.0, shape
        assert 24 <= shape["longer side >0"] <= 26, shape  # the frame's content side, as for predict's images


# ---- lines ------------------------------------------------------------------------------------------


def strokes(draw, left: int, kind: str) -> int:
    """Draw one 80 px tall character at `left` (ink 0..255 on black); return its right edge."""
    if kind == "l":
        draw.rectangle([left, 20, left + 9, 99], fill=255)
        return left + 10
    if kind == "i":  # stem and a separate dot above it
        draw.rectangle([left, 45, left + 9, 99], fill=255)
        draw.ellipse([left - 1, 22, left + 10, 33], fill=255)
        return left + 10
    if kind == "L-broken":  # an L whose upright has a 4 px break and whose foot is in two pieces
        draw.rectangle([left, 20, left + 9, 55], fill=255)
        draw.rectangle([left, 60, left + 9, 99], fill=255)
        draw.rectangle([left, 90, left + 24, 99], fill=255)
        draw.rectangle([left + 28, 90, left + 49, 99], fill=255)
        return left + 50
    draw.ellipse([left, 20, left + 59, 99], outline=255, width=10)  # "o"
    return left + 60


def line_page(kinds: list[str], gaps: list[int]) -> tuple[Image.Image, list[tuple[int, int]]]:
    image = Image.new("L", (40 + sum(gaps) + 60 * len(kinds) + 40, 120), 0)
    draw, x, spans = ImageDraw.Draw(image), 40, []
    for kind, gap in zip(kinds, [0, *gaps]):
        x += gap
        right = strokes(draw, x, kind)
        spans.append((x - 1, right + 1))  # the i's dot overhangs its stem by a pixel
        x = right
    return ImageOps.invert(image).convert("RGB"), spans


def test_a_line_is_cut_into_its_characters_left_to_right():
    from emnist_exp import segment

    kinds = ["L-broken", "i", "o", "l", "i", "o"]
    gaps = [14, 12, 16, 90, 13]  # 12 px is a quarter of the median width; 90 px is a word gap
    page, spans = line_page(kinds, gaps)
    segments, images = segment.line_characters(page)
    assert len(segments) == len(kinds) and len(images) == len(kinds), segments
    for s, (left, right) in zip(segments, spans):
        assert left <= s.left and s.right <= right + 1, (s, left, right)
    assert [s.space_before for s in segments] == [False, False, False, False, True, False]
    assert segment.text(segments, list("Lio1io")) == "Lio1 io"
    assert all(image.shape == (28, 28) and image.max() == 255 for image in images)


def test_a_stray_mark_between_characters_joins_one_instead_of_becoming_one():
    from emnist_exp import segment

    page, spans = line_page(["o", "o", "o"], [40, 40])
    draw = ImageDraw.Draw(page)
    mark = spans[0][1] + 10  # a 4x13 px mark in the first gap, nearer the first character
    draw.rectangle([mark, 40, mark + 3, 52], fill=0)
    segments, _ = segment.line_characters(page)
    assert len(segments) == 3, segments
    assert segments[0].right == mark + 4, segments  # the mark went to its nearer neighbour
    assert [s.left for s in segments[1:]] == [spans[1][0] + 1, spans[2][0] + 1], segments


def test_a_line_of_sample_characters_is_found_whole(sample_dir):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import own_images

    from emnist_exp import segment

    images = sample_images(sample_dir, "test", 60)
    rng = np.random.default_rng(5)
    for start in range(0, 60, 10):
        chars = list(images[start : start + int(rng.integers(3, 11))])
        ink, spaces, smallest = own_images.compose_line(chars, rng)
        assert smallest >= 0.25
        segments, _ = segment.line_characters(Image.fromarray(own_images.page(ink)))
        assert len(segments) == len(chars), (start, len(segments), len(chars))
        assert [s.left for s in segments] == sorted(s.left for s in segments)


@pytest.mark.slow
def test_predict_line_prints_the_string_and_each_character(tiny_ensemble, tmp_path, capsys):
    import mlflow

    from emnist_exp import predict, segment

    page, _ = line_page(["l", "o", "i", "o"], [15, 14, 80])
    page.save(tmp_path / "note.png")
    bad = [str(tmp_path / name) for name in bad_files(tmp_path)]
    saved = tmp_path / "seen"
    uri = f"models:/emnist-ensemble/{tiny_ensemble}"
    code = predict.main(["--line", str(tmp_path / "note.png"), *bad, "--save-preprocessed", str(saved),
                         "--model", uri])
    out, err = capsys.readouterr()
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(bad) and all(any(b in e for e in errors) for b in bad), err
    head, *rows = out.splitlines()
    segments, images = segment.line_characters(preprocess.load_image(tmp_path / "note.png"))
    model = mlflow.pyfunc.load_model(uri)
    expected = list(model.predict(np.stack(images).astype(np.float32))["character"])
    assert head == f"{tmp_path / 'note.png'}  {segment.text(segments, expected)}"
    assert len(expected) == 4 and " " in head.split("  ", 1)[1]
    assert [row.split()[:2] for row in rows] == [[str(n), c] for n, c in enumerate(expected, 1)]
    for n, image in enumerate(images, 1):
        assert np.array_equal(np.asarray(Image.open(saved / f"note-{n:02d}.png")), image)
