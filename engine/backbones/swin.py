"""A Swin-T-like hierarchical vision transformer (Liu et al. 2021), laid out as timm's
``SwinTransformer``.

A ``patch x patch`` patch embedding with a LayerNorm makes a token grid; stage ``s``
(``layers.s``) first merges 2x2 patches (``downsample``, stages after the first: concat,
LayerNorm, linear ``4C -> 2C``) and then runs ``depths[s]`` pre-norm blocks of
``heads[s]``-head self-attention inside non-overlapping windows, every second block on
windows shifted by half a window (a cyclic shift and an attention mask that keeps the
wrapped-around regions apart), with a learned relative position bias per window
offset. Names: ``patch_embed.proj`` / ``patch_embed.norm``,
``layers.S.downsample.norm`` / ``.reduction``, ``layers.S.blocks.B.norm1`` /
``attn.qkv`` / ``attn.proj`` / ``attn.relative_position_bias_table`` / ``norm2`` /
``mlp.fc1`` / ``mlp.fc2``, ``norm``, ``head.fc`` — timm's since 0.9 (files in the older
layout, with ``downsample`` at the end of the stage before and ``head`` for the
classifier, are renamed on load), so Swin-T weights load with ``model.weights`` when
the window size is the same.

Grids of any size and shape work: a window side is clipped to the stage's grid side
at the size the model is built for (and that side is then not shifted, as in timm),
and a grid that is not a multiple of the window is zero-padded at the bottom / right,
the padded tokens masked out of every real token's attention (so padding never changes
a real token's output). The same applies at other input sizes (DINO's local crops).

``forward_features`` returns every stage's output before any norm as a channels-first
view ``[B, C_s, H_s, W_s]`` (``"grids"``, the last one also ``"grid"``), which DRLoc's
multi-scale variant reads, and ``"features"``: the mean of the last stage's tokens after
the final LayerNorm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import Classifier, drop_path
from .vit import Mlp, PatchEmbed, init_linear
from .weights import WeightsOptions, load_weights

MASKED = -100.0  # added to the attention logits of token pairs that may not attend (Swin's value)


def window_partition(x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
    """``[B, H, W, C]`` (H, W multiples of the window) -> ``[B * nW, wh * ww, C]``, windows in
    row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, wh * ww, c)


def window_reverse(windows: torch.Tensor, wh: int, ww: int, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`window_partition`: ``[B * nW, wh * ww, C]`` -> ``[B, H, W, C]``."""
    c = windows.shape[-1]
    x = windows.view(-1, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def relative_position_index(wh: int, ww: int) -> torch.Tensor:
    """``[N, N]`` (``N = wh * ww``) index into the ``(2 wh - 1)(2 ww - 1)`` relative offsets."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1)


def attention_mask(h: int, w: int, window: tuple[int, int], shift: tuple[int, int],
                   device=None) -> torch.Tensor | None:
    """``[nW, N, N]`` additive mask for the windows of an ``h x w`` grid padded to multiples of
    ``window`` and cyclically shifted by ``-shift``: 0 where two tokens may attend, ``MASKED``
    where they come from different regions of the shifted grid or one is padding. ``None``
    when nothing is masked (no shift, no padding)."""
    (wh, ww), (sh, sw) = window, shift
    hp, wp = h + (-h % wh), w + (-w % ww)
    if not (sh or sw) and (hp, wp) == (h, w):
        return None

    def regions(n, win, s):  # Swin's three bands of the shifted frame: [0, n-win), [n-win, n-s), [n-s, n)
        r = torch.zeros(n, dtype=torch.long, device=device)
        if s:
            r[n - win:n - s] = 1
            r[n - s:] = 2
        return r

    labels = regions(hp, wh, sh)[:, None] * 3 + regions(wp, ww, sw)[None, :]
    pad = torch.zeros(hp, wp, dtype=torch.bool, device=device)
    pad[h:, :] = True
    pad[:, w:] = True
    labels = labels.masked_fill(torch.roll(pad, (-sh, -sw), (0, 1)), -1)
    win = window_partition(labels[None, :, :, None], wh, ww).squeeze(-1)  # [nW, N]
    return (win[:, :, None] != win[:, None, :]).float() * MASKED


class WindowAttention(nn.Module):
    """Multi-head self-attention inside each window, plus a learned relative position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], qkv_bias: bool = True):
        super().__init__()
        self.heads, self.window = heads, tuple(window)
        self.scale = (dim // heads) ** -0.5
        wh, ww = self.window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        self.register_buffer("relative_position_index", relative_position_index(wh, ww), persistent=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def bias(self) -> torch.Tensor:
        """``[heads, N, N]`` relative position bias."""
        n = self.window[0] * self.window[1]
        return self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1) + self.bias()
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]).view(bw, self.heads, n, n)
        x = attn.softmax(-1) @ v
        return self.proj(x.transpose(1, 2).reshape(bw, n, c))


class SwinBlock(nn.Module):
    """``x + attn(norm1(x))`` on (shifted) windows, then ``x + mlp(norm2(x))``; channels-last
    ``[B, H, W, C]`` in and out."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int], shift: tuple[int, int],
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.window, self.shift = tuple(window), tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        wh, ww = self.window
        # a side no longer than the window is one window: nothing to shift
        shift = (self.shift[0] if h > wh else 0, self.shift[1] if w > ww else 0)
        x = F.pad(x, (0, 0, 0, -w % ww, 0, -h % wh))
        hp, wp = x.shape[1], x.shape[2]
        if any(shift):
            x = torch.roll(x, (-shift[0], -shift[1]), (1, 2))
        mask = attention_mask(h, w, self.window, shift, x.device)
        x = window_reverse(self.attn(window_partition(x, wh, ww), mask), wh, ww, hp, wp)
        if any(shift):
            x = torch.roll(x, shift, (1, 2))
        return x[:, :h, :w]

    def forward(self, x):
        x = x + drop_path(self._attend(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


class PatchMerging(nn.Module):
    """Halve the grid (odd sides zero-padded at the bottom / right) and map the width ``C``
    to ``out_dim`` (default ``2C``): each 2x2 neighbourhood's four tokens, in the order
    (0,0), (1,0), (0,1), (1,1), are concatenated, normalised (``norm``) and projected
    (``reduction``, no bias), as Swin. Channels-last ``[B, H, W, C]`` in and out."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
            h, w = h + h % 2, w + w % 2
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 4, 2, 5).flatten(3)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, heads: int, window: tuple[int, int],
                 shift: tuple[int, int], downsample: bool, mlp_ratio: float, qkv_bias: bool, rates: list[float]):
        super().__init__()
        self.downsample = PatchMerging(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*(
            SwinBlock(dim, heads, window, shift if i % 2 else (0, 0), mlp_ratio, qkv_bias, rates[i])
            for i in range(depth)))

    def forward(self, x):
        return self.blocks(self.downsample(x))


class SwinHead(nn.Module):
    """timm's classifier head: ``fc`` (pooling happens in ``forward_features``)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.fc(x)


@dataclass
class SwinOptions(WeightsOptions):
    """Options of ``swin_t`` (defaults: Swin-T; shrink ``dim``, ``depths``, ``heads``,
    ``window`` and ``patch`` for small images)."""

    dim: int = field(default=96, metadata={"ge": 1, "help": "token width of the first stage (doubled per stage)"})
    depths: list[int] = field(default_factory=lambda: [2, 2, 6, 2],
                              metadata={"ge": 1, "help": "blocks per stage (its length: the stages)"})
    heads: list[int] = field(default_factory=lambda: [3, 6, 12, 24],
                             metadata={"ge": 1, "help": "attention heads per stage"})
    window: int = field(default=7, metadata={"ge": 1, "help": "window side in tokens (clipped to small grids)"})
    patch: int = field(default=4, metadata={"ge": 1, "help": "patch side in pixels of the first stage's tokens"})
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0, "help": "MLP width / token width"})
    qkv_bias: bool = field(default=True, metadata={"help": "bias in the qkv projections"})
    drop_path: float = field(default=0.2, metadata={"ge": 0.0, "lt": 1.0,
                                                    "help": "stochastic depth rate of the last block (linear in depth)"})

    def validate(self):
        if not self.depths:
            raise ConfigError("depths must list at least one stage")
        if len(self.heads) != len(self.depths):
            raise ConfigError(f"heads ({self.heads}) must give one count per stage of depths ({self.depths})")
        for s, heads in enumerate(self.heads):
            if (self.dim * 2**s) % heads:
                raise ConfigError(f"heads[{s}] = {heads} must divide stage {s}'s width {self.dim * 2**s}")


class SwinTransformer(Classifier):
    """Swin (see the module docstring) with the model protocol; ``grid_sizes`` lists each
    stage's grid at the image size it was built for."""

    input_conv = "patch_embed.proj.weight"

    def __init__(self, o: SwinOptions, num_classes: int, in_channels: int, image_size):
        super().__init__()
        h, w = math.ceil(image_size[0] / o.patch), math.ceil(image_size[1] / o.patch)
        self.patch_embed = PatchEmbed(in_channels, o.dim, o.patch, norm=True)
        total = sum(o.depths)
        rates = [o.drop_path * i / max(total - 1, 1) for i in range(total)]
        stages, self.grid_sizes, dim = [], [], o.dim
        for s, depth in enumerate(o.depths):
            in_dim = dim
            if s > 0:
                dim, h, w = 2 * dim, (h + 1) // 2, (w + 1) // 2
            window = (min(o.window, h), min(o.window, w))
            shift = (o.window // 2 if h > o.window else 0, o.window // 2 if w > o.window else 0)
            stages.append(SwinStage(in_dim, dim, depth, o.heads[s], window, shift, s > 0, o.mlp_ratio, o.qkv_bias,
                                    rates[sum(o.depths[:s]):sum(o.depths[:s + 1])]))
            self.grid_sizes.append((h, w))
        self.layers = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dim)
        self.feature_dim, self.num_classes = dim, num_classes
        self.head = SwinHead(dim, num_classes)
        self.apply(init_linear)

    @property
    def classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x):
        t = self.patch_embed(x)  # [B, H, W, C]
        grids = []
        for stage in self.layers:
            t = stage(t)
            grids.append(t.permute(0, 3, 1, 2))  # a channels-first view: no copy
        return {"features": self.norm(t).mean((1, 2)), "grid": grids[-1], "grids": grids}

    def adapt_state_dict(self, sd: dict) -> dict:
        """Drop the buffers older timm files store (``relative_position_index``, ``attn_mask``);
        rename the pre-0.9 layout (``layers.S.downsample`` at the end of stage S, ``head``)."""
        sd = {k: v for k, v in sd.items() if not k.endswith(("relative_position_index", "attn_mask"))}
        if any(k.startswith("layers.0.downsample.") for k in sd):
            sd = {re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample.", k): v
                  for k, v in sd.items()}
        if "head.weight" in sd and "head.fc.weight" not in sd:
            sd = {("head.fc." + k[len("head."):] if k.startswith("head.") else k): v for k, v in sd.items()}
        return sd


def register(register):
    """Register ``swin_t`` (called by batchkin.models' ``register_models``)."""
    def build(o, *, num_classes, in_channels, image_size):
        return load_weights(SwinTransformer(o, num_classes, in_channels, image_size), o, "swin_t")

    register("swin_t", build, options=SwinOptions)
