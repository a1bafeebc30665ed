"""Shared pieces of the self-supervised methods ``moco``, ``dino`` and ``sdmp``.

METHODS.md section 4 is the specification. This module holds what the two SSL bases
(:mod:`batchkin.plugins.moco`, :mod:`batchkin.plugins.dino`) and the SDMP plugin
(:mod:`batchkin.plugins.sdmp`) share; it registers no method itself.

* **The view pipeline** (:func:`make_views`, options :class:`ViewOptions`): two views of
  every image, built batched on the images' device from the raw uint8 images
  ``state.train_data.x[batch["idx"]]`` (the engine's own crop/flip in ``batch["x"]``
  is not used): random resized crop (bilinear), horizontal flip (when the dataset
  allows it), colour jitter (brightness, contrast, saturation, hue; in that fixed
  order) and grayscale when the images have 3 channels, Gaussian blur and solarize —
  BYOL's asymmetric pair (blur always / 10%, solarize never / 20%). The result is
  uint8 ``[2, B, C, H, W]``: SDMP mixes those bytes, and :func:`normalize_views`
  then normalises with the training split's mean and std. DINO's multi-crop local views
  (:func:`make_local_views`, :class:`LocalCrops`) go through the same per-view pipeline
  with their own area range, output size, blur and solarize probabilities, drawn after
  the global views from the same generator: uint8 ``[L, B, C, h, w]``.
* **The common part of the bases** (:class:`SSLOptions`, :class:`SSLBase`): the options
  both bases' schemas extend (``momentum``, ``knn_k``, ``knn_temperature``, the
  ``views`` table) and the base class holding the run checks, the kNN evaluator, the
  momentum update and its logging; each base adds its head, training forward and loss.
* **The SSL network** (:class:`SSLNet`): the registered model is the online encoder;
  the wrapper adds the head (MoCo's projector, DINO's head), MoCo's predictor and the
  momentum branch (a deep copy of encoder + head with ``requires_grad=False``) as
  submodules, so they are checkpointed with the model. Its ``forward`` keeps the
  classifier protocol, and with ``ssl_hook=`` runs the whole training pass (every
  view through the online branch, ``transform_features`` fired per view, the head on
  every feature stream; the momentum branch without gradients, on the global views
  only: local crops are seen by the online branch alone) inside the model's call, so
  DistributedDataParallel sees every trainable parameter.
* **Heads**: :func:`mlp` (MoCo v3's projector/predictor: Linear, BN, ReLU; last BN
  without affine for the projector) and :class:`DINOHead`.
* **Momentum**: :func:`cosine_momentum` (``1 - (1 - m0)(1 + cos(pi t / T)) / 2``) and
  :func:`ema_update_` (``theta_k <- m theta_k + (1 - m) theta_q``).
* **kNN evaluation** (:func:`knn_scores`): cosine similarity to a bank of training
  features, the ``k`` nearest, weights ``exp(sim / T)`` summed per class. During
  evaluation the SSL bases return these scores as ``outputs["logits"]``, so the
  engine's top-1 / balanced / per-class metrics of an SSL run ARE kNN metrics. The
  bank holds the encoder's features of the whole training split (no augmentation),
  computed at the first evaluation batch of every evaluation (a new training step).
  Training labels are used there and only there.
* **Linear probe** (:func:`linear_probe`): frozen features of a finished run's
  checkpoint, a linear classifier trained on them, test top-1 and friends.
* **The contract between a base and SDMP**: during training the base's ``forward``
  looks up ``state.hooks.methods.get("sdmp")``; when SDMP is enabled it calls
  ``sdmp.mix_views(state, views)`` on the uint8 global views (local crops are never
  mixed; both views in one pass of
  :func:`batchkin.kernels.batch_mix.batch_mix`), which returns a :class:`MixBatch`;
  the base runs the mixed views through the online and the momentum branch as well
  and stores an :class:`SSLStep` in ``outputs["ssl"]`` (clean and mixed outputs,
  keys (gathered across ranks for MoCo), ``lam_eff``, partners). SDMP adds its loss terms in
  ``loss_terms`` from that record alone.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.errors import ConfigError, RunError
from batchkin.hookspecs import hookimpl
from batchkin.models import Classifier
from batchkin.plugin import Method

# ------------------------------------------------------------------------------ options


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


@dataclass
class SSLOptions:
    """The options every SSL base has (``MoCo.Options`` and ``DINO.Options`` extend it):
    the momentum branch's schedule, kNN evaluation and the view pipeline."""

    momentum: float = field(default=0.99, metadata={"ge": 0.0, "le": 1.0, "help": "initial momentum m0 (cosine to 1)"})
    knn_k: int = field(default=20, metadata={"ge": 1, "help": "kNN evaluation: neighbours"})
    knn_temperature: float = field(default=0.07, metadata={"gt": 0.0, "help": "kNN evaluation: weight temperature"})
    views: ViewOptions = field(default_factory=ViewOptions, metadata={"help": "the view pipeline"})


def check_ssl_run(state, name: str) -> None:
    """Run-level checks shared by the SSL bases (raise ConfigError naming the key)."""
    cfg = state.config
    if cfg.data.batch_size < 2:
        raise ConfigError(f"data.batch_size must be >= 2 for {name} (a contrastive batch needs negatives; "
                          f"the projector's BatchNorm needs two samples); got {cfg.data.batch_size}")
    if state.world_size > 1 and not cfg.data.drop_last:
        raise ConfigError(f"data.drop_last must be true for {name} with several processes "
                          "(MoCo's key all-gather and DINO's centre, a sum all-reduced and divided by world size "
                          "x batch, need equal batches on every rank)")
    if "ce" in cfg.methods:
        raise ConfigError(f"methods lists both {name!r} and 'ce': self-supervised pretraining uses no labels; remove 'ce'")


def check_last_batch(state, name: str) -> None:
    """With ``data.drop_last = false`` the last batch of an epoch must hold two samples or more
    (the projector's BatchNorm cannot train on one); checked once the data is loaded."""
    cfg = state.config.data
    n, g = len(state.train_data), cfg.batch_size * state.world_size
    if not cfg.drop_last and n % g == 1:
        raise ConfigError(f"data.drop_last = false leaves a last batch of 1 image ({n} training images, "
                          f"batch {g}) which {name} cannot train on; set data.drop_last = true or change data.batch_size")


# ------------------------------------------------------------------------------ the view pipeline


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


# ------------------------------------------------------------------------------ heads and the SSL network


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: ``Linear(bias=False)`` layers; BN + ReLU after every hidden layer, and
    a BN without affine after the last one when ``last_bn`` (the projector)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO's head: MLP (GELU) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer ``W = g v / ||v||`` (``g = 1`` fixed when ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, bottleneck_dim: int = 64,
                 num_layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_g * F.normalize(self.last_v, dim=1))


class SSLNet(Classifier):
    """The registered model (``encoder``) with an SSL ``head``, an optional ``predictor`` and
    a ``momentum`` branch (deep copies of encoder and head, no gradients).

    ``forward(x)`` / ``forward(x, return_features=True)`` keep the classifier protocol
    (``classifier`` is the encoder's, frozen: SSL never trains it). The training pass is
    ``forward(views, ssl_hook=fire, local=crops)`` with normalised views ``[V, B, C, H, W]``
    and optional normalised local crops ``[L, B, C, h, w]`` (DINO's multi-crop, any
    smaller size): each view separately (BatchNorm sees one view at a time, as MoCo v3)
    goes through the encoder, ``fire(outputs)`` (``transform_features`` with ``outputs =
    {"features": f, "streams": [f]}``), then ``predictor(head(s))`` for every stream
    ``s``; the momentum branch gives ``head_m(encoder_m(view))`` under ``no_grad`` for the
    ``V`` views only (the local crops go through the online branch only). Returns
    ``{"features": [V + L, B, D], "q": [[stream outputs] per view, views then local
    crops], "keys": [V, B, d]}``.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        for attr in ("forward_features", "classifier", "feature_dim"):
            if not hasattr(encoder, attr):
                raise ConfigError(f"the SSL bases need a model with {attr} (the classifier protocol of batchkin.models)")
        encoder.classifier.requires_grad_(False)
        self.encoder = encoder
        self.head = head
        self.predictor = predictor if predictor is not None else nn.Identity()
        self.momentum = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(head)})
        self.momentum.requires_grad_(False)
        self.feature_dim = encoder.feature_dim
        self.num_classes = getattr(encoder, "num_classes", 0)

    @property
    def classifier(self) -> nn.Module:
        return self.encoder.classifier

    def forward_features(self, x):
        return self.encoder.forward_features(x)

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum parameters, online parameters), aligned."""
        online = list(self.encoder.parameters()) + list(self.head.parameters())
        target = list(self.momentum["encoder"].parameters()) + list(self.momentum["head"].parameters())
        if len(online) != len(target) or any(a.shape != b.shape for a, b in zip(online, target)):
            raise RunError("the momentum branch no longer matches the online encoder + head "
                           "(a module was added to the encoder after the SSL base wrapped it)")
        return target, online

    def forward(self, x, return_features: bool = False, *, ssl_hook=None, local=None):
        if ssl_hook is None:
            feats = self.forward_features(x)
            return feats if return_features else self.classifier(feats["features"])
        feats, q = [], []
        online = list(x.unbind(0)) + (list(local.unbind(0)) if local is not None else [])
        for view in online:
            f = self.forward_features(view)["features"]
            out = {"features": f, "streams": [f]}
            ssl_hook(out)
            feats.append(f)
            q.append([self.predictor(self.head(s)) for s in out["streams"]])
        with torch.no_grad():
            enc, head = self.momentum["encoder"], self.momentum["head"]
            keys = torch.stack([head(enc.forward_features(x[v])["features"]) for v in range(x.shape[0])])
        return {"features": torch.stack(feats), "q": q, "keys": keys}


# ------------------------------------------------------------------------------ momentum


def cosine_momentum(step: int, total_steps: int, m0: float) -> float:
    """MoCo v3 / DINO's momentum at ``step`` of ``total_steps``: ``1 - (1 - m0)(1 + cos(pi step / total)) / 2``
    (``m0`` at the start, 1 at the end)."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - m0) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], source: list[torch.Tensor], m: float) -> None:
    """In place ``target <- m * target + (1 - m) * source`` for every pair."""
    if not target:
        return
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, [s.detach() for s in source], alpha=1.0 - m)


# ------------------------------------------------------------------------------ distributed helpers


@torch.no_grad()
def gather_rows(t: torch.Tensor, world_size: int, dim: int = 0) -> torch.Tensor:
    """All-gather ``t`` from every rank and concatenate along ``dim`` (no gradient)."""
    if world_size <= 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


@contextlib.contextmanager
def fp32(device_type: str):
    """Autocast off: losses are computed in float32 from whatever dtype came in."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


# ------------------------------------------------------------------------------ the base <-> SDMP contract


@dataclass
class MixBatch:
    """What ``sdmp.mix_views`` returns to a base.

    ``mixed``: uint8 views ``[V, B, C, H, W]``; ``lam``: ``lam_eff`` ``[V, B]`` (the weight of
    the sample's own image, from the boxes actually pasted); ``partner``: int64 ``[B]``,
    the row of each sample's partner among the gathered keys (rank-major, ``world * B``
    rows; in the :class:`SSLStep` of a base that keeps its keys local, the row among this
    rank's ``B`` keys); ``lam_partner``: ``lam_eff`` of that partner ``[V, B]``; ``op``: the batch's
    operator code.
    """

    mixed: torch.Tensor
    lam: torch.Tensor
    partner: torch.Tensor
    lam_partner: torch.Tensor
    op: int


@dataclass
class SSLStep:
    """What a base stores in ``outputs["ssl"]`` during training (read by its own and SDMP's
    ``loss_terms``).

    ``kind``: ``"moco"`` or ``"dino"``. ``q``: the online outputs of the clean views,
    ``q[v][s]`` ``[B, d]`` per view and feature stream (MoCo: predictor outputs; DINO:
    student head outputs): the ``V`` global views first, then DINO's local crops (the
    student sees every crop). ``keys``: momentum outputs of the clean global views only
    (the teacher never sees a local crop), gathered over ranks, ``[V, world * B, d]``
    (MoCo; DINO with SDMP's global flip), or this rank's own ``[V, B, d]`` (DINO otherwise:
    see :func:`ssl_train_forward`); ``q[v]`` and ``keys[v]`` are the same view for
    ``v < V``. ``labels``: ``[B]``, the row of each local sample in ``keys``.
    ``temperature``: MoCo's T, DINO's student temperature. DINO also sets
    ``teacher_temp`` and ``center``. With SDMP: ``q_mix`` / ``keys_mix`` (the same for
    the mixed global views) and ``mix`` (the :class:`MixBatch`).
    """

    kind: str
    q: list
    keys: torch.Tensor
    labels: torch.Tensor
    temperature: float
    teacher_temp: float = 0.0
    center: torch.Tensor | None = None
    q_mix: list | None = None
    keys_mix: torch.Tensor | None = None
    mix: MixBatch | None = None


def ssl_train_forward(state, generator_name: str, view_options: ViewOptions, kind: str, temperature: float,
                      *, local: LocalCrops | None = None, gather_keys: bool = True, **extra) -> dict:
    """The SSL bases' training forward: views (and ``local`` crops, drawn after the views
    from the same generator), SDMP mixing of the global views (if enabled), the model's
    pass, keys gathered across ranks. Returns ``{"features": [B, D], "ssl": SSLStep}``.

    ``gather_keys = False`` (DINO: its loss reads only this rank's rows and its centre
    all-reduces a sum) keeps the keys local, ``[V, B, d]`` with ``labels = arange(B)``,
    and re-bases SDMP's partners to local rows; SDMP's ``flip = "global"`` pairs rows of
    other ranks, so with it the keys are gathered whatever ``gather_keys`` says."""
    data = state.train_data
    idx = state.batch["idx"].to(data.x.device)
    raw = data.x[idx]
    hflip = state.splits.hflip if view_options.hflip is None else view_options.hflip
    gen, shard = state.generator(generator_name), (state.rank, state.world_size)
    views = make_views(raw, gen, view_options, hflip=hflip, shard=shard)
    n_clean = views.shape[0]
    mixer = state.hooks.methods.get("sdmp")
    mix = mixer.mix_views(state, views) if mixer is not None else None
    images = views if mix is None else torch.cat([views, mix.mixed])
    mean, std = data.mean.view(-1), data.std.view(-1)
    x = normalize_views(images, mean, std)
    more = {}
    if local is not None and local.n > 0:
        crops = make_local_views(raw, gen, local, view_options, hflip=hflip, shard=shard)
        more["local"] = normalize_views(crops, mean, std)

    def fire(outputs):
        state.hooks.transform_features(state=state, outputs=outputs)

    out = state.model(x, ssl_hook=fire, **more)
    B, n_x = raw.shape[0], x.shape[0]
    if gather_keys or (mix is not None and mixer.options.flip == "global"):
        keys = gather_rows(out["keys"], state.world_size, dim=1)
        labels = torch.arange(B, device=keys.device) + state.rank * B
    else:
        keys = out["keys"]
        labels = torch.arange(B, device=keys.device)
        if mix is not None and state.rank:  # the partners are rows of this rank's batch: local rows
            mix = dataclasses.replace(mix, partner=mix.partner - state.rank * B)
    step = SSLStep(kind=kind, q=out["q"][:n_clean] + out["q"][n_x:], keys=keys[:n_clean], labels=labels,
                   temperature=temperature, **extra)
    if mix is not None:
        step.q_mix, step.keys_mix, step.mix = out["q"][n_clean:n_x], keys[n_clean:], mix
    return {"features": out["features"][0], "ssl": step}


# ------------------------------------------------------------------------------ kNN evaluation


def knn_scores(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, *, normalized_bank: bool = False) -> torch.Tensor:
    """Weighted kNN class scores ``[N, K]``: cosine similarity of each feature to the bank,
    the ``k`` most similar bank entries, each voting ``exp(sim / temperature)`` for its
    label. ``argmax`` of the scores is the kNN prediction."""
    with fp32(features.device.type):
        f = F.normalize(features.float(), dim=1)
        b = bank.float() if normalized_bank else F.normalize(bank.float(), dim=1)
        sim = f @ b.T
        k = min(k, b.shape[0])
        top, where = sim.topk(k, dim=1)
        weights = (top / temperature).exp()
        scores = torch.zeros(f.shape[0], num_classes, device=f.device)
        return scores.scatter_add_(1, bank_labels[where], weights)


@torch.no_grad()
def encode(model, data, batch_size: int) -> torch.Tensor:
    """Features of every image of ``data`` (a DeviceData; no augmentation), in order."""
    feats = []
    for x, _ in data.eval_batches(batch_size):
        feats.append(model.forward_features(x)["features"].float())
    return torch.cat(feats) if feats else torch.empty(0, getattr(model, "feature_dim", 0))


class KNNEvaluator:
    """The eval-mode forward of the SSL bases: kNN scores as ``logits``.

    The bank (the training split's encoder features, L2-normalised) is rebuilt at the
    first evaluation batch after any training step (keyed by run and step), so the val
    and test evaluations of the same weights share it.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07):
        self.k, self.temperature = k, temperature
        self.key = None
        self.bank = self.labels = None

    def forward(self, state) -> dict:
        model = state.unwrapped_model
        key = (id(state), state.step, state.epoch)
        if self.key != key:
            was = model.training
            model.eval()
            bank = encode(model, state.train_data, state.config.data.eval_batch_size)
            model.train(was)
            self.bank, self.labels, self.key = F.normalize(bank, dim=1), state.train_data.y, key
        f = model.forward_features(state.batch["x"])["features"]
        logits = knn_scores(f, self.bank, self.labels, state.num_classes, self.k, self.temperature,
                            normalized_bank=True)
        return {"features": f, "logits": logits}


# ------------------------------------------------------------------------------ the SSL bases' common part


def encoder_input_error(encoder: nn.Module, in_channels: int, size: tuple[int, int]) -> str | None:
    """Why ``encoder.forward_features`` cannot encode images of ``size`` ``(h, w)``, or None when
    it can: one pass of two zero images in eval mode without gradient (no random draw, no
    BatchNorm statistics touched); the features must be ``[2, feature_dim]``."""
    h, w = size
    was = encoder.training
    param = next(encoder.parameters(), None)
    x = torch.zeros(2, in_channels, h, w, device=param.device if param is not None else "cpu")
    try:
        encoder.eval()
        with torch.no_grad():
            f = encoder.forward_features(x)["features"]
    except Exception as exc:  # the model's own error, reported as a config problem by the caller
        reason = f"{type(exc).__name__}: {exc}"
    else:
        expected = (2, encoder.feature_dim)
        reason = None if tuple(f.shape) == expected else f"features of shape {tuple(f.shape)}, not {expected}"
    finally:
        encoder.train(was)
    grid = getattr(encoder, "grid_size", None)
    if reason is not None and grid is not None:
        reason = (f"it is a token model with learned position embeddings for a fixed {grid[0]}x{grid[1]} token grid "
                  f"({reason})")
    return reason


class SSLBase(Method):
    """What the SSL bases ``moco`` and ``dino`` share; a subclass sets :attr:`name`, extends
    :class:`SSLOptions` in its ``Options`` and implements :meth:`build_model` and
    :meth:`train_forward`.

    * ``configure`` / ``wrap_model``: the run checks (:func:`check_ssl_run`,
      :func:`check_last_batch`), then ``state.model = build_model(state, encoder)``;
    * ``forward``: kNN scores (:class:`KNNEvaluator`, ``knn_k``, ``knn_temperature``) in
      evaluation, :meth:`train_forward` in training;
    * ``after_step``: the momentum branch's EMA with :func:`cosine_momentum` from
      ``momentum`` over the run's optimizer steps; ``on_epoch_end`` logs it as
      ``<name>/momentum``.
    """

    roles = frozenset({"ssl-base"})
    raw_images = True  # views are built from state.train_data.x[batch["idx"]] (streamed: the raw transform)
    name = "ssl"  # the method's registered name: its config table and metric prefix
    sync_batchnorm = True  # under DDP on CUDA, train.sync_bn = "auto" converts the model to SyncBatchNorm
    Options = SSLOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.knn = KNNEvaluator(self.options.knn_k, self.options.knn_temperature)
        self.momentum = self.options.momentum

    def build_model(self, state, encoder: nn.Module) -> SSLNet:  # pragma: no cover - abstract
        raise NotImplementedError

    def train_forward(self, state) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    @hookimpl
    def configure(self, state):
        check_ssl_run(state, self.name)

    @hookimpl
    def wrap_model(self, state):
        check_last_batch(state, self.name)
        state.model = self.build_model(state, state.model)

    @hookimpl
    def forward(self, state):
        if not state.training:
            return self.knn.forward(state)
        return self.train_forward(state)

    @hookimpl
    def after_step(self, state):
        m = cosine_momentum(state.step, state.epochs * state.steps_per_epoch, self.options.momentum)
        target, online = state.unwrapped_model.momentum_pairs()
        ema_update_(target, online, m)
        self.momentum = m

    @hookimpl
    def on_epoch_end(self, state):
        state.epoch_metrics[f"{self.name}/momentum"] = self.momentum


# ------------------------------------------------------------------------------ linear probe


def _standardize(train: torch.Tensor, *others: torch.Tensor):
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 100,
                 lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                 seed: int = 0) -> nn.Linear:
    """A linear classifier trained on fixed features: zero init, SGD with momentum, cosine lr,
    mini-batches shuffled by a local generator seeded with ``seed`` (the global RNG is untouched)."""
    n, d = features.shape
    clf = nn.utils.skip_init(nn.Linear, d, num_classes, device=features.device)  # no draw from the global RNG
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(math.ceil(n / batch_size), 1)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(features.device)
        for start in range(0, n, batch_size):
            sel = perm[start : start + batch_size]
            loss = F.cross_entropy(clf(features[sel]), labels[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def probe_state(state, *, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                seed: int = 0) -> dict:
    """The linear probe of a prepared run state (see :func:`linear_probe`)."""
    from batchkin.data import DeviceData
    from batchkin.metrics import classification_metrics, confusion_counts

    model = state.unwrapped_model
    model.eval()
    splits = state.splits
    bs = state.config.data.eval_batch_size
    with torch.no_grad():
        parts = {name: DeviceData(getattr(splits, name), splits, state.device) for name in ("train", "val", "test")}
        feats = {name: encode(model, d, bs) for name, d in parts.items()}
    names = [n for n in ("val", "test") if len(parts[n])]
    std = _standardize(feats["train"], *(feats[n] for n in names))
    train_f, others = std[0], dict(zip(names, std[1:]))
    k = state.num_classes
    with torch.enable_grad():
        clf = train_linear(train_f, parts["train"].y, k, epochs=epochs, lr=lr, batch_size=batch_size,
                           weight_decay=weight_decay, seed=seed)
    out = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
           "feature_dim": int(train_f.shape[1])}
    with torch.no_grad():
        pred = clf(train_f).argmax(1)
        out["train_top1"] = float((pred == parts["train"].y).float().mean())
        for name in names:
            c, t = confusion_counts(clf(others[name]).argmax(1), parts[name].y, k)
            metrics = classification_metrics(c.cpu(), t.cpu())
            if name == "test":
                out.update(metrics)
            else:
                out[f"{name}_top1"] = metrics["top1"]
                out[f"{name}_balanced_acc"] = metrics["balanced_acc"]
    return out


def linear_probe(run_dir, *, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0, checkpoint: str = "last.pt", plugins=None, device: str | None = None) -> dict:
    """Linear-probe accuracy of a run's encoder on frozen features.

    Loads ``run_dir/config.toml`` and ``run_dir/checkpoints/<checkpoint>`` (through
    :func:`batchkin.trainer.prepare` and ``restore``), extracts the encoder's features
    of the train, val and test splits (eval mode, no augmentation), standardises them
    with the training features' mean and std (a BatchNorm without affine, as MAE's
    probe), trains :func:`train_linear` on the training split and returns the test
    split's ``top1``, ``balanced_acc`` and ``per_class``, plus ``val_top1`` and
    ``train_top1``. ``plugins`` defaults to the loaded plugins plus the SSL modules.
    """
    from batchkin.config import load_raw
    from batchkin.plugin import Plugins
    from batchkin.rundir import load_checkpoint
    from batchkin.trainer import prepare, restore

    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise RunError(f"{run} is not a batchkin run folder (no config.toml)")
    ckpt_path = run / "checkpoints" / checkpoint
    if not ckpt_path.is_file():
        raise RunError(f"{run} has no checkpoints/{checkpoint}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"probe {name} must be an integer >= 1; got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"probe lr must be > 0; got {lr!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"probe weight_decay must be >= 0; got {weight_decay!r}")
    if plugins is None:
        from batchkin.plugins import dino, moco, sdmp

        plugins = Plugins(extra_modules=[moco, dino, sdmp])
    raw = load_raw(run / "config.toml")
    if device is not None:
        raw["device"] = device
    with torch.random.fork_rng(devices=[]):
        state = prepare(raw, plugins)
        restore(state, load_checkpoint(ckpt_path, map_location=state.device))
        out = probe_state(state, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    out.update({"run_dir": str(run), "checkpoint": checkpoint, "epoch": state.epoch})
    return out
