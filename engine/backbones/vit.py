"""ViT-S/16 and ViT-B/16 laid out as timm's ``VisionTransformer``.

Names and shapes are timm's: ``patch_embed.proj`` (the patch convolution),
``cls_token``, ``pos_embed`` (``[1, 1 + N, D]`` with a class token, its first row the
class token's), ``blocks.N.norm1`` / ``attn.qkv`` / ``attn.proj`` / ``norm2`` /
``mlp.fc1`` / ``mlp.fc2``, ``norm``, ``head``; so a state dict saved from
``timm.create_model("vit_small_patch16_224")`` loads with ``model.weights`` (its
position embeddings resampled bicubically when the token grid differs). LayerNorms
use ``eps = 1e-6`` and blocks are pre-norm, as timm's.

``forward_features`` returns, with the model protocol, ``"grid"``: the last block's
patch tokens before the final norm as ``[B, D, H/p, W/p]`` (class token removed; a
view, not a copy) and ``"grids" = [grid]``, which DRLoc reads; ``"features"`` is the
class token after the final norm (``pool = "cls"``) or the mean of the normed patch
tokens (``pool = "mean"``; timm's average-pooling models normalise after pooling
instead). An image whose sides are not multiples of the patch is zero-padded at the
bottom and right (as Swin's patch embedding); at a size other than the one the model
was built for (DINO's local crops), the position embeddings are interpolated
bicubically to the new grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import Classifier, drop_path, options_with_defaults
from .weights import WeightsOptions, load_weights


def init_linear(m: nn.Module) -> None:
    """timm's transformer init: truncated-normal (std 0.02) Linear weights, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PatchEmbed(nn.Module):
    """A ``patch x patch`` stride-``patch`` convolution (``proj``) and an optional LayerNorm
    (``norm``, Swin's); returns channels-last ``[B, H', W', D]``. Sides that are not a
    multiple of the patch are zero-padded at the bottom / right first."""

    def __init__(self, in_channels: int, dim: int, patch: int, norm: bool = False):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_channels, dim, patch, patch)
        self.norm = nn.LayerNorm(dim) if norm else nn.Identity()

    def forward(self, x):
        p = self.patch
        h, w = x.shape[-2:]
        if h % p or w % p:
            x = F.pad(x, (0, -w % p, 0, -h % p))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (timm's layout)."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``,
    each branch with stochastic depth ``drop_path``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        return x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)


def resample_grid(pos: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """Position embeddings ``[1, Ho * Wo, D]`` of an ``old`` grid resampled bicubically to ``new``."""
    if tuple(old) == tuple(new):
        return pos
    d = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], d).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new), mode="bicubic", align_corners=False).to(pos.dtype)
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], d)


@dataclass
class ViTOptions(WeightsOptions):
    """Options of ``vit_s16`` / ``vit_b16`` (defaults from the model name)."""

    dim: int = field(default=384, metadata={"ge": 8, "help": "token width"})
    depth: int = field(default=12, metadata={"ge": 1, "help": "transformer blocks"})
    heads: int = field(default=6, metadata={"ge": 1, "help": "attention heads"})
    mlp_ratio: float = field(default=4.0, metadata={"gt": 0, "help": "MLP width / token width"})
    patch: int = field(default=16, metadata={"ge": 1, "help": "patch side in pixels (token grid = image / patch)"})
    class_token: bool = field(default=True, metadata={"help": "prepend a learned class token"})
    pool: Literal["cls", "mean"] = field(default="cls", metadata={
        "help": "features: the normed class token (cls) or the mean of the normed patch tokens (mean)"})
    qkv_bias: bool = field(default=True, metadata={"help": "bias in the qkv projection"})
    drop_path: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0,
                                                    "help": "stochastic depth rate of the last block (linear in depth)"})

    def validate(self):
        if self.dim % self.heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("pool = 'cls' needs class_token = true (or set pool = 'mean')")


class VisionTransformer(Classifier):
    """A plain ViT (Dosovitskiy et al. 2021) with timm's names; see the module docstring."""

    input_conv = "patch_embed.proj.weight"

    def __init__(self, o: ViTOptions, num_classes: int, in_channels: int, image_size):
        super().__init__()
        h, w = image_size
        self.pos_grid = (math.ceil(h / o.patch), math.ceil(w / o.patch))
        self.num_prefix_tokens = int(o.class_token)
        self.pooling = o.pool
        self.patch_embed = PatchEmbed(in_channels, o.dim, o.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, o.dim)) if o.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + self.pos_grid[0] * self.pos_grid[1], o.dim))
        rates = [o.drop_path * i / max(o.depth - 1, 1) for i in range(o.depth)]
        self.blocks = nn.Sequential(*(Block(o.dim, o.heads, o.mlp_ratio, o.qkv_bias, r) for r in rates))
        self.norm = nn.LayerNorm(o.dim, eps=1e-6)
        self.feature_dim, self.num_classes = o.dim, num_classes
        self.head = nn.Linear(o.dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(init_linear)

    @property
    def classifier(self) -> nn.Module:
        return self.head

    def position_embeddings(self, grid: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` for a ``grid`` token grid (prefix rows first), interpolated when it
        is not the grid the model was built for."""
        k = self.num_prefix_tokens
        patch = resample_grid(self.pos_embed[:, k:], self.pos_grid, grid)
        return torch.cat([self.pos_embed[:, :k], patch], dim=1) if k else patch

    def forward_features(self, x):
        t = self.patch_embed(x)  # [B, h, w, D]
        b, h, w, d = t.shape
        t = t.reshape(b, h * w, d)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        t = self.blocks(t + self.position_embeddings((h, w)))
        k = self.num_prefix_tokens
        grid = t[:, k:].transpose(1, 2).reshape(b, d, h, w)  # a view of the tokens: no copy
        normed = self.norm(t)
        feats = normed[:, 0] if self.pooling == "cls" else normed[:, k:].mean(1)
        return {"features": feats, "grid": grid, "grids": [grid]}

    def adapt_state_dict(self, sd: dict) -> dict:
        """A file's ``pos_embed`` for another square grid is resampled to this model's grid;
        a file's class token is dropped when this model has none."""
        pos = sd.get("pos_embed")
        if pos is None or pos.dim() != 3 or pos.shape == self.pos_embed.shape:
            return sd
        k_file = 1 if "cls_token" in sd else 0
        n = pos.shape[1] - k_file
        side = math.isqrt(n)
        if side * side != n or pos.shape[-1] != self.pos_embed.shape[-1]:
            return sd  # reported as a shape mismatch
        patch = resample_grid(pos[:, k_file:], (side, side), self.pos_grid)
        if self.num_prefix_tokens and k_file:
            patch = torch.cat([pos[:, :k_file], patch], dim=1)
        elif k_file:
            sd.pop("cls_token")
        sd["pos_embed"] = patch
        return sd


VITS = {
    "vit_s16": {"dim": 384, "depth": 12, "heads": 6},
    "vit_b16": {"dim": 768, "depth": 12, "heads": 12},
}


def register(register):
    """Register ``vit_s16`` and ``vit_b16`` (called by batchkin.models' ``register_models``)."""
    for name, defaults in VITS.items():
        def build(o, *, num_classes, in_channels, image_size, _name=name):
            return load_weights(VisionTransformer(o, num_classes, in_channels, image_size), o, _name)

        register(name, build, options=options_with_defaults(ViTOptions, name, **defaults))
