"""The SSL bases' view pipeline: augmented views built batched on the images' device.

Two views of every image from the raw uint8 images (:func:`make_views`, options
:class:`ViewOptions`): random resized crop (bilinear), horizontal flip (when the
dataset allows it), colour jitter (brightness, contrast, saturation, hue; in that
fixed order) and grayscale when the images have 3 channels, Gaussian blur and
solarize — BYOL's asymmetric pair (blur always / 10%, solarize never / 20%). The
result is uint8 ``[2, B, C, H, W]``: a mixing method (``transform_views``) mixes those
bytes, and :func:`normalize_views` then normalises with the training split's mean and
std. DINO's multi-crop local views (:func:`make_local_views`, :class:`LocalCrops`) go
through the same per-view pipeline with their own area range, output size, blur and
solarize probabilities, drawn after the global views from the same generator: uint8
``[L, B, C, h, w]``. Every draw is made for the global batch and sliced per rank, so a
sample is augmented the same way whatever the number of processes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchkin.errors import ConfigError


@dataclass
class ViewOptions:
    """The view pipeline's options (a nested table of each SSL base: ``[moco.views]``)."""

    crop_scale: list[float] = field(
        default_factory=lambda: [0.2, 1.0],
        metadata={"gt": 0.0, "le": 1.0, "help": "random resized crop: range of the crop's area fraction"},
    )
    crop_ratio: list[float] = field(
        default_factory=lambda: [3 / 4, 4 / 3], metadata={"gt": 0.0, "help": "random resized crop: aspect-ratio range"}
    )
    hflip: bool | None = field(default=None, metadata={"help": "random horizontal flip (default: the dataset's choice)"})
    jitter_prob: float = field(default=0.8, metadata={"ge": 0.0, "le": 1.0, "help": "colour-jitter probability (3 channels)"})
    jitter: list[float] = field(
        default_factory=lambda: [0.4, 0.4, 0.2, 0.1],
        metadata={"ge": 0.0, "help": "colour-jitter strengths: brightness, contrast, saturation, hue"},
    )
    grayscale_prob: float = field(default=0.2, metadata={"ge": 0.0, "le": 1.0, "help": "grayscale probability (3 channels)"})
    blur_prob: list[float] = field(
        default_factory=lambda: [1.0, 0.1], metadata={"ge": 0.0, "le": 1.0, "help": "Gaussian-blur probability per view"}
    )
    blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0], metadata={"gt": 0.0, "help": "Gaussian-blur sigma range, in pixels"}
    )
    solarize_prob: list[float] = field(
        default_factory=lambda: [0.0, 0.2], metadata={"ge": 0.0, "le": 1.0, "help": "solarize probability per view"}
    )

    def validate(self):
        for name, n in (("crop_scale", 2), ("crop_ratio", 2), ("jitter", 4), ("blur_prob", 2), ("blur_sigma", 2),
                        ("solarize_prob", 2)):
            value = getattr(self, name)
            if len(value) != n:
                raise ConfigError(f"{name} must have {n} values; got {value}")
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ConfigError(f"{name} must be [low, high] with low <= high; got {getattr(self, name)}")
        if self.jitter[3] > 0.5:
            raise ConfigError(f"jitter's hue strength must be <= 0.5; got {self.jitter[3]}")


class _Draws:
    """Uniform draws for a batch sharded over ranks: every draw is made for the global
    batch (``world`` shards of ``b``) and this rank keeps its slice, so a sample is
    augmented the same way whatever the number of processes."""

    def __init__(self, generator: torch.Generator, b: int, device, shard=(0, 1)):
        self.gen, self.b, self.device = generator, b, device
        self.rank, self.world = shard

    def uniform(self, *shape) -> torch.Tensor:
        u = torch.rand((self.b * self.world, *shape), generator=self.gen, device=self.device)
        return u[self.rank * self.b : (self.rank + 1) * self.b]


def random_resized_crop_boxes(u_scale, u_ratio, u_y, u_x, H: int, W: int, scale, ratio):
    """Boxes ``(y0, x0, h, w)`` (int64 ``[B]`` each) of torchvision's RandomResizedCrop
    from uniforms: ``u_scale``/``u_ratio`` ``[B, A]`` (A attempts), ``u_y``/``u_x`` ``[B]``.

    Attempt ``a``: area fraction ``s = lo + (hi - lo) u``, ``log r`` uniform in
    ``log(ratio)``; ``w = round(sqrt(H W s r))``, ``h = round(sqrt(H W s / r))``; the
    first attempt with ``1 <= h <= H`` and ``1 <= w <= W`` is used, else the whole
    image. The corner is uniform among the positions that keep the box inside.
    """
    area = float(H * W)
    s = scale[0] + (scale[1] - scale[0]) * u_scale.double()
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio.double()
    r = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * s * r)).long()
    h = torch.round(torch.sqrt(area * s / r)).long()
    ok = (w >= 1) & (w <= W) & (h >= 1) & (h <= H)
    first = ok.int().argmax(dim=1, keepdim=True)
    any_ok = ok.any(dim=1)
    h = torch.where(any_ok, h.gather(1, first).squeeze(1), torch.full_like(any_ok, H, dtype=torch.long))
    w = torch.where(any_ok, w.gather(1, first).squeeze(1), torch.full_like(any_ok, W, dtype=torch.long))
    y0 = torch.minimum(torch.floor(u_y.double() * (H - h + 1)).long(), H - h)
    x0 = torch.minimum(torch.floor(u_x.double() * (W - w + 1)).long(), W - w)
    return y0, x0, h, w


def resized_crop(x: torch.Tensor, y0, x0, h, w, flip=None, size=None) -> torch.Tensor:
    """Crop box ``(y0, x0, h, w)`` of every image of ``x`` (float ``[B, C, H, W]``) and resize it
    bilinearly to ``size`` (default: the image size), exactly as
    ``F.interpolate(crop, size, mode="bilinear", align_corners=False)``; ``flip`` (bool
    ``[B]``) mirrors the result horizontally. One ``grid_sample`` call for the batch."""
    B, C, H, W = x.shape
    oh, ow = size if size is not None else (H, W)
    dev = x.device

    def source(pos0, length, n_out, n_in):
        # interpolate's source coordinate inside the crop, clamped into it, then shifted
        j = torch.arange(n_out, device=dev, dtype=torch.float64).view(1, n_out)
        L = length.to(dev, torch.float64).view(B, 1)
        src = ((j + 0.5) * L / n_out - 0.5).clamp(min=0.0)
        src = torch.minimum(src, L - 1)
        absolute = pos0.to(dev, torch.float64).view(B, 1) + src
        return ((2 * absolute + 1) / n_in - 1).to(torch.float32)  # grid_sample, align_corners=False

    gy = source(y0, h, oh, H)
    gx = source(x0, w, ow, W)
    if flip is not None:
        gx = torch.where(flip.to(dev).view(B, 1), gx.flip(1), gx)
    grid = torch.stack((gx.view(B, 1, ow).expand(B, oh, ow), gy.view(B, oh, 1).expand(B, oh, ow)), dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ``[B, 3, H, W]`` to HSV (hue in [0, 1)), as torchvision's tensor version."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    div = torch.where(eqc, ones, cr)
    rc, gc, bc = (maxc - r) / div, (maxc - g) / div, (maxc - b) / div
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p = (v * (1 - s)).clamp(0, 1)
    q = (v * (1 - s * f)).clamp(0, 1)
    t = (v * (1 - s * (1 - f))).clamp(0, 1)
    table = torch.stack([
        torch.stack((v, q, p, p, t, v), 1),
        torch.stack((t, v, v, q, p, p), 1),
        torch.stack((p, p, t, v, v, q), 1),
    ], 1)  # [B, 3, 6, H, W]
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def colour_jitter(x: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Brightness, contrast, saturation (multiplicative factors) and hue (a shift in turns),
    ``factors`` ``[B, 4]``, in that order, as torchvision's functional ops; ``x`` RGB in [0, 1]."""
    f = factors.to(x.dtype).view(-1, 4, 1, 1, 1).unbind(1)
    x = (x * f[0]).clamp(0, 1)
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    x = (f[1] * x + (1 - f[1]) * mean).clamp(0, 1)
    x = (f[2] * x + (1 - f[2]) * _gray(x)).clamp(0, 1)
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, :1] + f[3], 1.0)
    return hsv_to_rgb(torch.cat((hue, hsv[:, 1:]), dim=1))


def blur_kernel_size(H: int, W: int) -> int:
    """About 10% of the image side, odd, at least 3 (23 at 224 pixels, as BYOL)."""
    return max(3, 2 * int(0.05 * min(H, W)) + 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int | None = None) -> torch.Tensor:
    """Separable Gaussian blur with one ``sigma`` per image (``[B]``), reflect padding."""
    B, C, H, W = x.shape
    k = kernel_size or blur_kernel_size(H, W)
    r = k // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kern = torch.exp(-0.5 * (t.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)
    kern = kern / kern.sum(1, keepdim=True)  # [B, k]
    kern = kern.repeat_interleave(C, dim=0)  # [B*C, k]
    mode = "reflect" if r < min(H, W) else "replicate"
    y = F.pad(x.reshape(1, B * C, H, W), (r, r, r, r), mode=mode)
    y = F.conv2d(y, kern.view(B * C, 1, 1, k), groups=B * C)
    y = F.conv2d(y, kern.view(B * C, 1, k, 1), groups=B * C)
    return y.view(B, C, H, W)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to bytes, rounded half up."""
    return torch.floor(x * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)


def solarize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 solarize of the images where ``mask``: pixels ``>= 128`` become ``255 - v``."""
    inverted = torch.where(x >= 128, 255 - x, x)
    return torch.where(mask.view(-1, 1, 1, 1), inverted, x)


@dataclass(frozen=True)
class LocalCrops:
    """DINO's multi-crop local views (built by :func:`make_local_views`): ``n`` crops per image
    of ``size`` ``(h, w)`` pixels, area fraction uniform in ``scale``, Gaussian blur with
    probability ``blur_prob`` and solarize with ``solarize_prob`` (DINO: 0.5 and never)."""

    n: int
    size: tuple[int, int]
    scale: tuple[float, float] = (0.05, 0.4)
    blur_prob: float = 0.5
    solarize_prob: float = 0.0


def _augmented_view(xf: torch.Tensor, draw: _Draws, o: ViewOptions, *, scale, size, blur_prob: float,
                    solarize_prob: float, hflip: bool) -> torch.Tensor:
    """One augmented view (uint8) of every image of ``xf`` (float in [0, 1]); the draws are
    made in a fixed order whatever the channels and the probabilities."""
    B, C, H, W = xf.shape
    dev = xf.device
    u_scale, u_ratio = draw.uniform(10), draw.uniform(10)
    u_y, u_x = draw.uniform(), draw.uniform()
    flip = (draw.uniform() < 0.5) & hflip
    jitter_on = draw.uniform() < o.jitter_prob
    u_jitter = draw.uniform(4)
    gray_on = draw.uniform() < o.grayscale_prob
    blur_on = draw.uniform() < blur_prob
    u_sigma = draw.uniform()
    solar_on = draw.uniform() < solarize_prob

    y0, x0, h, w = random_resized_crop_boxes(u_scale, u_ratio, u_y, u_x, H, W, scale, o.crop_ratio)
    out = resized_crop(xf, y0, x0, h, w, flip, size)
    if C == 3:
        b, c, s, hue = o.jitter
        lo = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -hue], device=dev)
        hi = torch.tensor([1 + b, 1 + c, 1 + s, hue], device=dev)
        jittered = colour_jitter(out, lo + (hi - lo) * u_jitter)
        out = torch.where(jitter_on.view(-1, 1, 1, 1), jittered, out)
        out = torch.where(gray_on.view(-1, 1, 1, 1), _gray(out).expand_as(out), out)
    sigma = o.blur_sigma[0] + (o.blur_sigma[1] - o.blur_sigma[0]) * u_sigma
    out = torch.where(blur_on.view(-1, 1, 1, 1), gaussian_blur(out, sigma), out)
    return solarize(to_uint8(out), solar_on)


def _check_images(x: torch.Tensor, who: str) -> None:
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"{who} expects uint8 images [B, C, H, W]; got {x.dtype} {tuple(x.shape)}")


def make_views(x: torch.Tensor, generator: torch.Generator, options: ViewOptions | None = None, *,
               hflip: bool = True, shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """Two augmented views of every image of ``x`` (uint8 ``[B, C, H, W]``), uint8 ``[2, B, C, H, W]``.

    Per view and image: random resized crop (``options.crop_scale``/``crop_ratio``,
    bilinear, 10 attempts then the whole image), horizontal flip with probability 0.5
    (if ``hflip``), colour jitter with ``jitter_prob`` and grayscale with
    ``grayscale_prob`` (3-channel images only), Gaussian blur with ``blur_prob[v]``
    (sigma uniform in ``blur_sigma``, kernel about 10% of the side), rounding to bytes,
    solarize with ``solarize_prob[v]``. All random numbers come from ``generator``
    (on ``x``'s device) in a fixed order, the same whatever the channels; with
    ``shard = (rank, world)`` they are drawn for the global batch and sliced.
    """
    o = options or ViewOptions()
    _check_images(x, "make_views")
    draw = _Draws(generator, x.shape[0], x.device, shard)
    xf = x.float() / 255.0
    views = [_augmented_view(xf, draw, o, scale=o.crop_scale, size=None, blur_prob=o.blur_prob[v],
                             solarize_prob=o.solarize_prob[v], hflip=hflip) for v in range(2)]
    return torch.stack(views).contiguous()


def make_local_views(x: torch.Tensor, generator: torch.Generator, crops: LocalCrops,
                     options: ViewOptions | None = None, *, hflip: bool = True,
                     shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """DINO's local crops of every image of ``x`` (uint8 ``[B, C, H, W]``): uint8
    ``[crops.n, B, C, h, w]`` with ``(h, w) = crops.size``.

    The pipeline of :func:`make_views` (same draws per view, same ``crop_ratio``, flip,
    jitter, grayscale and blur sigma from ``options``) with the crop's area fraction in
    ``crops.scale``, the crop resized to ``crops.size``, blur with ``crops.blur_prob`` and
    solarize with ``crops.solarize_prob``. Called after :func:`make_views` with the same
    generator, the global views are the same with or without local crops.
    """
    o = options or ViewOptions()
    _check_images(x, "make_local_views")
    H, W = x.shape[-2:]
    h, w = crops.size
    if crops.n < 0 or not (1 <= h <= H and 1 <= w <= W):
        raise ValueError(f"local crops: need n >= 0 and a size inside the {H}x{W} images; got n={crops.n}, "
                         f"size {h}x{w}")
    draw = _Draws(generator, x.shape[0], x.device, shard)
    xf = x.float() / 255.0
    views = [_augmented_view(xf, draw, o, scale=tuple(crops.scale), size=(h, w), blur_prob=crops.blur_prob,
                             solarize_prob=crops.solarize_prob, hflip=hflip) for _ in range(crops.n)]
    if not views:
        return torch.empty((0, *x.shape[:2], h, w), dtype=torch.uint8, device=x.device)
    return torch.stack(views).contiguous()


def normalize_views(views: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 ``[V, B, C, H, W]`` to normalised float ``(x / 255 - mean) / std`` (contiguous)."""
    c = views.shape[-3]
    return ((views.float() / 255.0 - mean.view(c, 1, 1)) / std.view(c, 1, 1)).contiguous()
