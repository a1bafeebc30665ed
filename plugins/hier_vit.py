"""``vit_hier``: a small hierarchical vision transformer, for DRLoc's multi-scale variant.

Registered as a model by :mod:`batchkin.plugins.drloc` (``model.name = "vit_hier"``);
its ``forward_features`` returns every stage's token grid (``"grids"``) for DRLoc's
"very dense" variant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from batchkin.backbones.swin import PatchMerging as SwinPatchMerging
from batchkin.errors import ConfigError
from batchkin.models import Block, Classifier


@dataclass
class HierViTOptions:
    dim: int = field(default=32, metadata={"ge": 8, "help": "token width of the first stage (doubled per stage)"})
    depths: list[int] = field(default_factory=lambda: [2, 2, 2],
                              metadata={"ge": 1, "help": "transformer blocks per stage (its length: the stages)"})
    heads: int = field(default=2, metadata={"ge": 1, "help": "attention heads of the first stage (doubled per stage)"})
    mlp_ratio: float = field(default=2.0, metadata={"gt": 0, "help": "MLP width / token width"})
    patch: int = field(default=1, metadata={"ge": 1, "help": "stride of the convolutional stem"})
    stem_channels: int = field(default=32, metadata={"ge": 1, "help": "channels of the stem's first convolution"})

    def validate(self):
        if not self.depths:
            raise ConfigError("depths must list at least one stage")
        if self.dim % self.heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")


class PatchMerging(SwinPatchMerging):
    """Swin's patch merging (:class:`batchkin.backbones.swin.PatchMerging`: odd sizes padded
    at the bottom/right, 2x2 neighbourhoods concatenated, normalised, projected to twice
    the width) on a token sequence ``[B, h * w, C]``; returns ``(tokens, h', w')``."""

    def forward(self, t: torch.Tensor, h: int, w: int):
        b, _, c = t.shape
        x = super().forward(t.view(b, h, w, c))
        h2, w2 = x.shape[1], x.shape[2]
        return x.reshape(b, h2 * w2, -1), h2, w2


class HierViT(Classifier):
    """A hierarchical vision transformer for small images, for DRLoc's multi-scale variant.

    The convolutional stem of :class:`batchkin.models.SmallViT` (stride ``patch``) makes an
    ``H x W`` token grid with learned position embeddings; stage ``s`` runs ``depths[s]``
    pre-norm blocks with global attention at width ``dim * 2**s`` and ``heads * 2**s``
    heads on an ``ceil(H / 2**s) x ceil(W / 2**s)`` grid, patch merging between stages.
    ``forward_features`` returns every stage's tokens as a grid view ``[B, C_s, H_s, W_s]``
    (``"grids"``, before any norm) and the last one as ``"grid"``; the features are the mean
    of the last stage's tokens after a final LayerNorm.
    """

    def __init__(self, o: HierViTOptions, num_classes: int, in_channels: int, image_size):
        super().__init__()
        h, w = image_size
        if h % o.patch or w % o.patch:
            raise ConfigError(f"model.patch ({o.patch}) must divide the image size {h}x{w}")
        h, w = h // o.patch, w // o.patch
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, o.stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(o.stem_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(o.stem_channels, o.dim, o.patch, o.patch),
        )
        self.pos = nn.Parameter(torch.zeros(1, h * w, o.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        self.grid_sizes = []
        dim = o.dim
        for s, depth in enumerate(o.depths):
            if s > 0:
                self.merges.append(PatchMerging(dim))
                dim, h, w = 2 * dim, (h + 1) // 2, (w + 1) // 2
            self.stages.append(nn.ModuleList(Block(dim, o.heads * 2**s, o.mlp_ratio) for _ in range(depth)))
            self.grid_sizes.append((h, w))
        self.norm = nn.LayerNorm(dim)
        self.feature_dim, self.num_classes = dim, num_classes
        self.classifier = nn.Linear(dim, num_classes)

    def forward_features(self, x):
        t = self.stem(x)
        b, _, h, w = t.shape
        t = t.flatten(2).transpose(1, 2) + self.pos
        grids = []
        for s, blocks in enumerate(self.stages):
            if s > 0:
                t, h, w = self.merges[s - 1](t, h, w)
            for blk in blocks:
                t = blk(t)
            grids.append(t.transpose(1, 2).unflatten(2, (h, w)))  # a view of the tokens: no copy
        feats = self.norm(t).mean(1)
        return {"features": feats, "grid": grids[-1], "grids": grids}


def hier_vit_builder(options: HierViTOptions, *, num_classes, in_channels, image_size):
    """The registered builder of ``vit_hier``."""
    return HierViT(options, num_classes, in_channels, image_size)
