"""Per-image transforms of streamed datasets, run in the DataLoader workers with Pillow.

Three transforms turn a file into a uint8 image of the run's ``data.image_size``
``(H, W)``, as an array ``[H, W, C]``:

* ``train`` — the ImageNet recipe: a random-resized crop (torchvision's algorithm:
  up to ten attempts at an area fraction drawn from ``scale`` and a log-uniform aspect
  ratio from ``ratio``, then the centre crop of the largest allowed ratio), bilinear
  (antialiased) resampling to ``(H, W)``, and a horizontal flip with probability 1/2;
* ``eval`` — resize the shorter side to ``resize`` (``data.resize_size``, by default
  ``floor(max(H, W) / data.crop_fraction)``) and take the centre ``(H, W)`` crop;
* ``raw`` — the same with the shorter side resized to ``max(H, W)``: the whole
  centred image at the storage size, for methods that build their own views on the
  device (the SSL bases).

Crop and resize are one Pillow ``resize(size, box=...)`` call: only the crop is
resampled, with the sample positions and filter of resizing the whole image and then
cropping (the pixels agree up to the rounding of Pillow's intermediate pass). The random numbers are not drawn here: :func:`random_resized_crop_box` and
the flip read a row of uniforms that the caller derives from (seed, step, stream,
slot), so a sample's augmentation never depends on the worker that decodes it.
Normalisation happens later, batched, on the training device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Uniforms each training sample reads: 10 attempts x (area, ratio, top, left), then the flip.
ATTEMPTS = 10
UNIFORMS_PER_SAMPLE = 4 * ATTEMPTS + 1

GRAY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F")


def random_resized_crop_box(width: int, height: int, scale, ratio, u) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random-resized crop of a ``width x height`` image.

    torchvision's ``RandomResizedCrop.get_params`` with its draws read from ``u`` (at
    least ``4 * ATTEMPTS`` uniforms in ``[0, 1)``): attempt ``k`` takes the area fraction
    ``scale[0] + u[k] (scale[1] - scale[0])``, the aspect ratio
    ``exp(log ratio[0] + u[10 + k] (log ratio[1] - log ratio[0]))``, ``w = round(sqrt(A r))``,
    ``h = round(sqrt(A / r))``, and if the crop fits, top ``floor(u[20 + k] (height - h + 1))``
    and left ``floor(u[30 + k] (width - w + 1))``. When no attempt fits, the centre crop of
    the whole image clamped to the ratio range.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for k in range(ATTEMPTS):
        target = area * (scale[0] + float(u[k]) * (scale[1] - scale[0]))
        aspect = math.exp(log_lo + float(u[ATTEMPTS + k]) * (log_hi - log_lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(float(u[2 * ATTEMPTS + k]) * (height - h + 1))
            left = int(float(u[3 * ATTEMPTS + k]) * (width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, resize: int, out_h: int, out_w: int) -> tuple[float, float, float, float]:
    """The source box of "resize the shorter side to ``resize``, then centre-crop ``out_h x out_w``".

    The resized image is ``new_w x new_h`` (torchvision's rounding: the longer side
    ``int(resize * long / short)``); the crop starts at ``round((new - out) / 2)``. A crop
    larger than the resized image reaches outside it (Pillow's resampling then only
    reads the image's own pixels). In source pixels the box is the crop times
    ``width / new_w`` (and ``height / new_h``), so resampling the box gives the same
    pixel centres as resizing the whole image and cropping.
    """
    if width <= height:
        new_w, new_h = resize, int(resize * height / width)
    else:
        new_w, new_h = int(resize * width / height), resize
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy


@dataclass(frozen=True)
class ImageTransform:
    """One of the transforms of the module docstring, for images of ``mode`` ("L" or "RGB").

    ``size`` is the output ``(H, W)``; ``resize`` the eval transform's shorter side;
    ``scale`` and ``ratio`` the random-resized crop's ranges; ``hflip`` whether the
    training transform flips.
    """

    kind: str  # "train", "eval" or "raw"
    mode: str
    size: tuple[int, int]
    resize: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True

    def __post_init__(self):
        if self.kind not in ("train", "eval", "raw"):
            raise ValueError(f"transform kind must be train, eval or raw; got {self.kind!r}")

    @property
    def random(self) -> bool:
        return self.kind == "train"

    def __call__(self, image, u=None) -> np.ndarray:
        """The transformed uint8 array ``[H, W, C]`` of a Pillow image (``u``: the sample's
        ``UNIFORMS_PER_SAMPLE`` uniforms, for the training transform)."""
        from PIL import Image

        if image.mode != self.mode:
            image = image.convert(self.mode)
        h, w = self.size
        flip = False
        if self.kind == "train":
            left, top, cw, ch = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, u)
            box = (left, top, left + cw, top + ch)
            flip = self.hflip and float(u[4 * ATTEMPTS]) < 0.5
        else:
            resize = self.resize if self.kind == "eval" else max(h, w)
            box = center_crop_box(image.width, image.height, resize, h, w)
        out = image.resize((w, h), Image.BILINEAR, box=box)
        if flip:  # Pillow's transpose: several times faster than copying a reversed numpy view
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(out, dtype=np.uint8)
        return arr[:, :, None] if arr.ndim == 2 else arr


def open_image(path):
    """The decoded Pillow image at ``path``, fully loaded (a truncated or corrupt file fails
    here, not later); Pillow closes a single-frame file once it is loaded."""
    from PIL import Image

    image = Image.open(path)
    try:
        image.load()
    except BaseException:
        image.close()
        raise
    return image


def channels_of(mode: str) -> int:
    """1 for grayscale Pillow modes, 3 for every other (converted to RGB)."""
    return 1 if mode in GRAY_MODES else 3
