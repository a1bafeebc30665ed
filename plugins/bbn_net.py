"""BBN's bilateral model: :class:`BilateralNet` and its combiner (:func:`bbn_features`, :func:`bbn_logits`).

The combiner weighs the conventional branch's features ``f_c`` by ``2 alpha`` and the
re-balancing branch's ``f_r`` by ``2 (1 - alpha)`` before the one ``Linear(2D, K)``
classifier; at ``alpha = 0.5`` it is the plain concatenation evaluation reads. The
method that schedules ``alpha`` and feeds the two streams is :mod:`batchkin.plugins.bbn`,
which re-exports these names.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.errors import ConfigError
from batchkin.models import Classifier

# ------------------------------------------------------------------------------ the combiner


def bbn_features(f_c: torch.Tensor, f_r: torch.Tensor, alpha) -> torch.Tensor:
    """The classifier's input ``cat(2 alpha f_c, 2 (1 - alpha) f_r)`` (``cat(f_c, f_r)`` at 0.5)."""
    if f_c.shape != f_r.shape:
        raise ValueError(f"f_c and f_r must have the same shape; got {tuple(f_c.shape)} and {tuple(f_r.shape)}")
    return torch.cat([f_c * (2 * alpha), f_r * (2 * (1 - alpha))], dim=1)


def bbn_logits(f_c: torch.Tensor, f_r: torch.Tensor, alpha, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``2 alpha W_c f_c + 2 (1 - alpha) W_r f_r + b`` with ``weight = [W_c | W_r]`` of shape ``[K, 2D]``."""
    return F.linear(bbn_features(f_c, f_r, alpha), weight, bias)



# ------------------------------------------------------------------------------ the bilateral model


class BilateralNet(Classifier):
    """BBN's two-branch network around a backbone that exposes ``trunk`` and ``last_block``.

    ``trunk`` is shared; ``cb_block`` and ``rb_block`` are deep copies of the
    backbone's ``last_block`` (equal at the start), each followed by ``pool`` (global
    average pooling); ``classifier`` is a new ``Linear(2D, K)``. Calls:

    * ``model(x, return_features=True)`` (evaluation, and the classifier protocol):
      one trunk pass, both blocks on the same image, ``{"features": cat(f_c, f_r),
      "f_c", "f_r"}`` — the training combiner at ``alpha = 0.5``;
      ``model(x)`` returns ``classifier(cat(f_c, f_r))``;
    * ``model(x, x_rev=x_rev, alpha=a, return_features=True)`` (training, one call so
      that DistributedDataParallel sees the whole pass): ``f_c`` from ``x`` through
      ``cb_block``, ``f_r`` from ``x_rev`` through ``rb_block``, ``"features" =
      cat(2a f_c, 2(1 - a) f_r)``.

    ``fused=False`` (the default, as upstream) runs the trunk twice, once per batch,
    so BatchNorm normalises each batch with its own statistics. ``fused=True`` runs
    the trunk once over ``cat(x, x_rev)``: faster, but the trunk's BatchNorm layers then
    normalise (and update running statistics with) both batches together, which
    changes training. In evaluation mode (running statistics) both give the same result.

    Other child modules that earlier methods attached to the backbone are kept.
    """

    supports_return_features = True

    def __init__(self, backbone: nn.Module, fused: bool = False):
        super().__init__()
        for name in ("trunk", "last_block"):
            if not isinstance(getattr(backbone, name, None), nn.Module):
                raise ConfigError(f"BilateralNet needs a backbone with a `{name}` module")
        self.trunk = backbone.trunk
        self.cb_block = copy.deepcopy(backbone.last_block)
        self.rb_block = copy.deepcopy(backbone.last_block)
        pool = getattr(backbone, "pool", None)
        self.pool = pool if isinstance(pool, nn.Module) else nn.AdaptiveAvgPool2d(1)
        old = getattr(backbone, "classifier", None)
        d = getattr(backbone, "feature_dim", None) or getattr(old, "in_features", None)
        k = getattr(backbone, "num_classes", None) or getattr(old, "out_features", None)
        if not d or not k:
            raise ConfigError("BilateralNet needs a backbone with feature_dim and num_classes (or a Linear classifier)")
        self.branch_dim, self.feature_dim, self.num_classes = int(d), 2 * int(d), int(k)
        self.classifier = nn.Linear(2 * int(d), int(k))
        self.fused = bool(fused)
        # the backbone's own modules (also under other names, e.g. torchvision's conv1 ... fc,
        # of which trunk / last_block / pool / classifier are views) are not carried over
        owned = {id(m) for part in (backbone.trunk, backbone.last_block, pool, old) if isinstance(part, nn.Module)
                 for m in part.modules()}
        for name, child in backbone.named_children():  # e.g. heads other methods attached
            if not any(id(m) in owned for m in child.modules()) and not hasattr(self, name):
                self.add_module(name, child)

    def _branch(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return self.pool(block(h)).flatten(1)

    def pair_features(self, x: torch.Tensor, x_rev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_c, f_r)``: ``x`` through the conventional branch, ``x_rev`` through the re-balancing one."""
        if self.fused:
            h = self.trunk(torch.cat([x, x_rev]))
            h_c, h_r = h[: len(x)], h[len(x):]
        else:
            h_c, h_r = self.trunk(x), self.trunk(x_rev)
        return self._branch(self.cb_block, h_c), self._branch(self.rb_block, h_r)

    def branch_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(f_c, f_r)`` of the same images (one trunk pass, both blocks)."""
        h = self.trunk(x)
        return self._branch(self.cb_block, h), self._branch(self.rb_block, h)

    def forward_features(self, x: torch.Tensor) -> dict:
        f_c, f_r = self.branch_features(x)
        return {"features": torch.cat([f_c, f_r], dim=1), "f_c": f_c, "f_r": f_r}

    def forward(self, x: torch.Tensor, x_rev: torch.Tensor | None = None, alpha=0.5, return_features: bool = False):
        if x_rev is None and alpha == 0.5:
            out = self.forward_features(x)
        else:
            f_c, f_r = self.branch_features(x) if x_rev is None else self.pair_features(x, x_rev)
            out = {"features": bbn_features(f_c, f_r, alpha), "f_c": f_c, "f_r": f_r}
        return out if return_features else self.classifier(out["features"])
