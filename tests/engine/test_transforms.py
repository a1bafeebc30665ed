"""The per-image transforms of streamed datasets (batchkin.transforms): hand-worked crop boxes,
the one-call crop + resize against resizing then cropping, the flip, the eval sizes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from batchkin.transforms import (
    ATTEMPTS,
    UNIFORMS_PER_SAMPLE,
    ImageTransform,
    center_crop_box,
    channels_of,
    open_image,
    random_resized_crop_box,
)


def _u(**at) -> np.ndarray:
    """Uniforms 0.5 everywhere except the given positions (``a3=0.1`` sets u[3])."""
    u = np.full(UNIFORMS_PER_SAMPLE, 0.5)
    for key, value in at.items():
        u[int(key[1:])] = value
    return u


def test_crop_box_first_attempt_hand_worked():
    # 100x50, area 5000; fraction 0.5 -> 2500; ratio 1 -> w = h = 50; fits;
    # top = floor(0.5 * (50 - 50 + 1)) = 0, left = floor(0.5 * (100 - 50 + 1)) = 25
    assert random_resized_crop_box(100, 50, (0.5, 0.5), (1.0, 1.0), _u()) == (25, 0, 50, 50)
    # area fraction 0.08 + 0.25 * 0.92 = 0.31 -> 1550; ratio exp(log(3/4) + 0.75 (log(4/3) - log(3/4)))
    u = _u(a0=0.25, a10=0.75, a20=0.9, a30=0.1)
    aspect = math.exp(math.log(3 / 4) + 0.75 * (math.log(4 / 3) - math.log(3 / 4)))
    w, h = round(math.sqrt(1550 * aspect)), round(math.sqrt(1550 / aspect))
    assert random_resized_crop_box(100, 50, (0.08, 1.0), (3 / 4, 4 / 3), u) == (
        int(0.1 * (100 - w + 1)), int(0.9 * (50 - h + 1)), w, h)


def test_crop_box_takes_the_first_attempt_that_fits():
    # 40x20 (area 800). Attempt 0: fraction ~1 -> w = h = 28 > 20, rejected.
    # Attempt 1: fraction 0.25 -> 200 -> w = h = round(14.14) = 14; top floor(0.5 * 7) = 3,
    # left floor(0.25 * 27) = 6 (attempt k reads u[k], u[10 + k], u[20 + k], u[30 + k])
    u = _u(a0=0.999999, a1=0.0, a21=0.5, a31=0.25)
    assert random_resized_crop_box(40, 20, (0.25, 1.0), (1.0, 1.0), u) == (6, 3, 14, 14)


@pytest.mark.parametrize("width,height,ratio,ratio_u,want", [
    # scale (1, 1) asks for the whole area: at ratio 1 a 71x71 crop of 100x50; too wide for
    # the widest ratio -> full height, w = round(50 * 1)
    (100, 50, (1.0, 1.0), 0.5, (25, 0, 50, 50)),
    # ratio 0.5 asks for 37x73 of 30x90; taller than the tallest ratio -> full width, h = round(30 / 0.5)
    (30, 90, (0.5, 2.0), 0.0, (0, 15, 30, 60)),
    # ratio 2 asks for 77x39 of 60x50; the image's own ratio 1.2 is inside the range -> the whole image
    (60, 50, (0.5, 2.0), 0.999999, (0, 0, 60, 50)),
])
def test_crop_box_falls_back_to_the_centre_after_ten_misses(width, height, ratio, ratio_u, want):
    u = _u(**{f"a{ATTEMPTS + k}": ratio_u for k in range(ATTEMPTS)})
    assert random_resized_crop_box(width, height, (1.0, 1.0), ratio, u) == want


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 300), st.integers(1, 300), st.lists(st.floats(0, 0.999999), min_size=41, max_size=41),
       st.floats(0.01, 1.0), st.floats(0.2, 1.0), st.floats(1.0, 5.0))
def test_crop_box_always_lies_inside_the_image(width, height, u, s0, r0, r1):
    left, top, w, h = random_resized_crop_box(width, height, (s0 * 0.5, s0), (r0, r1), u)
    assert 0 < w <= width and 0 < h <= height
    assert 0 <= left <= width - w and 0 <= top <= height - h


def test_centre_crop_box_matches_resizing_then_cropping():
    """One resize of the crop box gives the pixels of resizing the whole image and cropping
    (same sample positions and filter; Pillow's intermediate rounding differs by a level or two)."""
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(60):
        width, height = (int(v) for v in rng.integers(5, 60, 2))
        image = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
        resize = int(rng.integers(4, 40))
        out_h, out_w = int(rng.integers(2, resize + 1)), int(rng.integers(2, resize + 1))
        new_w, new_h = (resize, int(resize * height / width)) if width <= height else (int(resize * width / height), resize)
        top, left = int(round((new_h - out_h) / 2)), int(round((new_w - out_w) / 2))
        want = np.asarray(image.resize((new_w, new_h), Image.BILINEAR).crop((left, top, left + out_w, top + out_h)))
        got = np.asarray(image.resize((out_w, out_h), Image.BILINEAR, box=center_crop_box(width, height, resize, out_h, out_w)))
        diffs.append(np.abs(want.astype(int) - got))
    d = np.concatenate([x.ravel() for x in diffs])
    assert d.max() <= 2 and d.mean() < 0.2


def test_centre_crop_box_hand_worked():
    # 200x100 -> shorter side 50: 100x50; crop 40 high, 30 wide: top round(10 / 2) = 5,
    # left round(70 / 2) = 35; in source pixels (x2): (70, 10, 130, 90)
    assert center_crop_box(200, 100, 50, 40, 30) == (70.0, 10.0, 130.0, 90.0)


def _gradient(width=24, height=16) -> Image.Image:
    x = np.arange(width, dtype=np.uint8)[None, :, None] * 10
    y = np.arange(height, dtype=np.uint8)[:, None, None] * 15
    return Image.fromarray(np.broadcast_to(x + y, (height, width, 3)).astype(np.uint8).copy())


def test_the_flip_mirrors_the_same_crop():
    t = ImageTransform("train", "RGB", (8, 8), 9)
    u = np.random.default_rng(0).random(UNIFORMS_PER_SAMPLE)
    u[4 * ATTEMPTS] = 0.9
    plain = t(_gradient(), u)
    u[4 * ATTEMPTS] = 0.1
    flipped = t(_gradient(), u)
    assert plain.shape == (8, 8, 3) and plain.dtype == np.uint8
    assert np.array_equal(flipped, plain[:, ::-1])
    assert not np.array_equal(flipped, plain)
    no_flip = ImageTransform("train", "RGB", (8, 8), 9, hflip=False)
    assert np.array_equal(no_flip(_gradient(), u), plain)


def test_eval_and_raw_transforms_are_centred_and_deterministic():
    image = _gradient(24, 16)
    ev = ImageTransform("eval", "RGB", (8, 8), 9)(image)
    want = np.asarray(image.resize((8, 8), Image.BILINEAR, box=center_crop_box(24, 16, 9, 8, 8)))
    assert np.array_equal(ev, want)
    raw = ImageTransform("raw", "L", (8, 8), 9)(image)  # the shorter side resized to 8: the whole height
    assert raw.shape == (8, 8, 1)
    gray = image.convert("L")
    assert np.array_equal(raw[:, :, 0], np.asarray(gray.resize((8, 8), Image.BILINEAR, box=center_crop_box(24, 16, 8, 8, 8))))


def test_modes_and_files(tmp_path):
    assert channels_of("L") == 1 and channels_of("I;16") == 1 and channels_of("RGB") == 3 and channels_of("P") == 3
    path = tmp_path / "a.png"
    _gradient().save(path)
    assert open_image(path).size == (24, 16)
    (tmp_path / "b.png").write_bytes(path.read_bytes()[:60])
    with pytest.raises(OSError):
        open_image(tmp_path / "b.png")
    with pytest.raises(ValueError):
        ImageTransform("other", "RGB", (8, 8), 9)
