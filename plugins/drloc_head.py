"""DRLoc's heads and loss: predict the relative grid offset of sampled token pairs.

:class:`DRLocHead` (``l1``, ``ce``, ``cbr``; METHODS.md section 3, "Heads and losses")
runs its first layer through the op's ``drloc_first_layer``; :func:`drloc_loss` draws the
pairs and their targets with the op (:func:`batchkin.kernels.drloc_pairs.drloc_positions`,
:func:`~batchkin.kernels.drloc_pairs.drloc_targets`) and scores one head per grid.
:func:`drloc_l1_loss`, :func:`drloc_ce_loss` and :func:`drloc_cbr_loss` are the three
losses on given predictions. The method itself is :mod:`batchkin.plugins.drloc`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.kernels.drloc_pairs import drloc_first_layer, drloc_positions, drloc_targets
from batchkin.kernels.rng import derive_key

HEADS = ("l1", "ce", "cbr")
MODES = ("abs", "signed")
FIRST_LAYER = ("auto", "project", "gather", "unique")
#: ``var`` floor of the cbr loss and the weight of its ``log var`` term.
CBR_EPS = 1e-8
CBR_LOG_VAR_WEIGHT = 0.001


# ------------------------------------------------------------------------------ losses


def drloc_l1_loss(pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean absolute error between ``pred`` and ``targets`` (``[..., 2]`` each), in float32."""
    if pred.shape != targets.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and targets {tuple(targets.shape)} must have the same shape")
    return F.l1_loss(pred.float(), targets.float())


def _check_bins(logits: torch.Tensor, t: torch.Tensor, which: str) -> torch.Tensor:
    bins = logits.shape[-1]
    if logits.shape[:-1] != t.shape:
        raise ValueError(f"{which} logits {tuple(logits.shape)} do not match targets {tuple(t.shape)}")
    return bins


def drloc_ce_loss(row_logits: torch.Tensor, col_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``CE(row) + CE(col)``: mean cross-entropy of each coordinate's bins against the integer
    targets ``targets[..., 0]`` (rows) and ``targets[..., 1]`` (columns)."""
    loss = 0
    for logits, t, which in ((row_logits, targets[..., 0], "row"), (col_logits, targets[..., 1], "col")):
        bins = _check_bins(logits, t, which)
        loss = loss + F.cross_entropy(logits.float().reshape(-1, bins), t.reshape(-1).long())
    return loss


def drloc_cbr_loss(row_logits: torch.Tensor, col_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Regression on the bin distribution, row plus column: ``beta = softmax``, ``mu = sum beta_k k``,
    ``var = sum beta_k (k - mu)^2 + 1e-8``, ``mean(exp(-log var) (mu - t)^2 + 0.001 log var)``."""
    loss = 0
    for logits, t, which in ((row_logits, targets[..., 0], "row"), (col_logits, targets[..., 1], "col")):
        bins = _check_bins(logits, t, which)
        beta = torch.softmax(logits.float(), dim=-1)
        k = torch.arange(bins, dtype=torch.float32, device=logits.device)
        mu = (beta * k).sum(-1)
        log_var = torch.log((beta * (k - mu.unsqueeze(-1)) ** 2).sum(-1) + CBR_EPS)
        err = (mu - t.float()) ** 2
        loss = loss + (torch.exp(-log_var) * err + CBR_LOG_VAR_WEIGHT * log_var).mean()
    return loss


# ------------------------------------------------------------------------------ heads


def _linear(n_in: int, n_out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(n_in, n_out)`` with PyTorch's default initialisation, drawn from ``generator``
    when one is given (the layer is built uninitialised, so the global RNG is not touched)."""
    if generator is None:
        return nn.Linear(n_in, n_out)
    layer = nn.utils.skip_init(nn.Linear, n_in, n_out)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(n_in)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class DRLocHead(nn.Module):
    """One DRLoc head: predicts the relative offset of token pairs of a ``[B, C, H, W]`` grid.

    ``kind`` ``l1`` predicts ``[B, m, 2]`` offsets; ``ce`` and ``cbr`` predict
    ``(row_logits [B, m, bins_h], col_logits [B, m, bins_w])`` with ``H`` and ``W`` bins in
    ``abs`` mode, ``2H - 1`` and ``2W - 1`` in ``signed`` mode, so they need the grid size.
    ``generator`` (a CPU ``torch.Generator``) initialises the layers without touching the
    global RNG; without it PyTorch's default initialisation draws from the global RNG.
    """

    def __init__(self, channels: int, kind: str = "l1", mode: str = "abs", grid_size: tuple[int, int] | None = None,
                 hidden: int = 512, generator: torch.Generator | None = None):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"kind must be one of {', '.join(HEADS)}; got {kind!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        for name, value in (("channels", channels), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        if grid_size is not None:
            grid_size = tuple(int(s) for s in grid_size)
            if len(grid_size) != 2 or min(grid_size) < 1:
                raise ValueError(f"grid_size must be (H, W) with H, W >= 1; got {grid_size!r}")
        elif kind != "l1":
            raise ValueError(f"a {kind!r} head needs grid_size (its bins depend on H and W)")
        self.kind, self.mode, self.channels, self.hidden = kind, mode, channels, hidden
        self.grid_size = grid_size
        g = generator
        self.fc1 = _linear(2 * channels, hidden, g)
        if kind == "l1":
            self.body = nn.Sequential(nn.ReLU(), _linear(hidden, hidden, g), nn.ReLU())
            self.out = _linear(hidden, 2, g)
            self.bins = None
        else:
            self.body = nn.Sequential(nn.ReLU(), _linear(hidden, hidden, g), nn.ReLU(), _linear(hidden, hidden, g))
            h, w = grid_size
            self.bins = (h, w) if mode == "abs" else (2 * h - 1, 2 * w - 1)
            self.row = _linear(hidden, self.bins[0], g)
            self.col = _linear(hidden, self.bins[1], g)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, mode={self.mode!r}, grid_size={self.grid_size}"

    def _rest(self, h: torch.Tensor):
        h = self.body(h)
        if self.kind == "l1":
            return self.out(h)
        return self.row(h), self.col(h)

    def predict(self, pairs: torch.Tensor):
        """The plain head on concatenated pairs ``cat(e_a, e_b, -1)`` (``[..., 2C]``)."""
        return self._rest(self.fc1(pairs))

    def forward(self, grid: torch.Tensor, pos: torch.Tensor, first_layer: str = "auto"):
        """Predictions for the pairs ``pos`` (``[B, m, 4]``, rows/cols of both members) of ``grid``.

        The first layer runs through ``drloc_first_layer`` (``first_layer``: ``auto``,
        ``project``, ``gather`` or ``unique``); the result equals ``predict(cat(e_a, e_b))``.
        """
        if grid.dim() != 4 or grid.shape[1] != self.channels:
            raise ValueError(f"grid must be [B, {self.channels}, H, W]; got {tuple(grid.shape)}")
        if self.grid_size is not None and self.kind != "l1" and tuple(grid.shape[2:]) != self.grid_size:
            raise ValueError(f"this {self.kind!r} head has bins for a {self.grid_size[0]}x{self.grid_size[1]} grid; "
                             f"got a {grid.shape[2]}x{grid.shape[3]} grid")
        if first_layer not in FIRST_LAYER:
            raise ValueError(f"first_layer must be one of {', '.join(FIRST_LAYER)}; got {first_layer!r}")
        weight, bias = self.fc1.weight, self.fc1.bias
        if weight.dtype != grid.dtype:  # e.g. a low-precision grid: the op wants one dtype
            weight, bias = weight.to(grid.dtype), bias.to(grid.dtype)
        h = drloc_first_layer(grid, pos, weight, bias, strategy=first_layer)
        return self._rest(h)

    def loss(self, pred, targets: torch.Tensor) -> torch.Tensor:
        """This head's loss of ``pred`` (from :meth:`forward`) against float ``[B, m, 2]`` targets."""
        if self.kind == "l1":
            return drloc_l1_loss(pred, targets)
        row, col = pred
        return drloc_ce_loss(row, col, targets) if self.kind == "ce" else drloc_cbr_loss(row, col, targets)


# ------------------------------------------------------------------------------ the loss


def _as_list(value, kind) -> list:
    if isinstance(value, nn.ModuleDict):
        return list(value.values())
    if isinstance(value, kind) and not isinstance(value, nn.ModuleList):
        return [value]
    return list(value)


def _keys(generator, n: int) -> list:
    """One key per grid: a CPU generator draws one each; an int is used as is (one grid) or folded
    with the grid's index (several); a sequence gives one per grid."""
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU torch.Generator (no device sync); got {generator.device}")
        return [int(torch.randint(0, 2**32, (1,), generator=generator, dtype=torch.int64)) for _ in range(n)]
    if isinstance(generator, int) and not isinstance(generator, bool):
        return [generator] if n == 1 else [derive_key(generator, s) for s in range(n)]
    if isinstance(generator, Sequence) and not isinstance(generator, (str, bytes)):
        keys = list(generator)
        if len(keys) != n:
            raise ValueError(f"got {len(keys)} keys for {n} grids")
        return keys
    raise TypeError(f"generator must be a CPU torch.Generator, a 32-bit int key or a list of keys; "
                    f"got {type(generator).__name__}")


def drloc_loss(grid, head, m: int = 64, generator=None, mode: str | None = None, *, normalize: bool = False,
               first_layer: str = "auto") -> torch.Tensor:
    """The unweighted DRLoc loss of one grid, or the sum over the stages of a hierarchical model.

    ``grid``: a ``[B, C, H, W]`` tensor (or a list, one per stage); ``head``: a
    :class:`DRLocHead` (or a list / ``ModuleList`` / ``ModuleDict``, one per grid).
    ``m`` pairs per image are drawn on the grid's device from ``generator``: a CPU
    ``torch.Generator`` (one 32-bit key drawn per grid), a 32-bit int key (folded with the
    grid's index when there are several grids) or a list of keys. ``mode`` defaults to
    each head's own; ``normalize`` (``l1`` heads only) divides the targets by ``size - 1``.
    The global RNG is never used.
    """
    grids = _as_list(grid, torch.Tensor)
    heads = _as_list(head, nn.Module)
    if not grids or len(grids) != len(heads):
        raise ValueError(f"got {len(grids)} grids and {len(heads)} heads; need one head per grid")
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an int >= 1; got {m!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    keys = _keys(generator, len(grids))
    total = 0
    for g, h, key in zip(grids, heads, keys):
        if not isinstance(h, DRLocHead):
            raise TypeError(f"head must be a DRLocHead, got {type(h).__name__}")
        md = h.mode if mode is None else mode
        if md not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {md!r}")
        if h.kind != "l1" and md != h.mode:
            raise ValueError(f"mode {md!r} does not match the {h.kind!r} head's bins (built for mode {h.mode!r})")
        if h.kind != "l1" and normalize:
            raise ValueError(f"normalize applies to the l1 head only; the {h.kind!r} head predicts integer bins")
        if not isinstance(g, torch.Tensor) or g.dim() != 4:
            raise ValueError(f"grid must be a [B, C, H, W] tensor; got {getattr(g, 'shape', type(g).__name__)}")
        B, _, H, W = g.shape
        pos = drloc_positions(B, m, H, W, key, device=g.device)
        targets = drloc_targets(pos, H, W, md, normalize)
        total = total + h.loss(h(g, pos, first_layer), targets)
    return total
