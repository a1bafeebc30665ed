"""``drloc``: dense relative localization, an auxiliary loss for vision transformers on small data.

DRLoc (METHODS.md section 3) samples ``m`` pairs of tokens per image from a model's
token grid ``[B, C, H, W]`` (before the final norm, CLS token removed), asks a small
head to predict each pair's relative grid offset and adds that loss, weighted by a
schedule ``lambda(epoch)``, to the supervised loss: ``L = L_sup + lambda(e) L_drloc``.

Pairs and targets come from the op :mod:`batchkin.kernels.drloc_pairs`: positions are
drawn on the grid's device from a 32-bit key (no host synchronisation), each coordinate
in its own range (``H != W`` works everywhere), and the targets per coordinate, ordered
(row, col), with ``delta = a - b``, are ``|delta|`` (``mode = "abs"``, the paper's
setting) or ``delta + (size - 1)`` (``mode = "signed"``). Targets are raw grid
distances by default (as the released numbers); ``normalize = true`` divides them by
``size - 1``.

Heads (``[drloc] head``) and their losses:

* ``l1``: ``2C -> hidden -> ReLU -> hidden -> ReLU -> 2``; mean absolute error over
  the ``B * m * 2`` values;
* ``ce``: a trunk ``2C -> hidden -> ReLU -> hidden -> ReLU -> hidden`` (no ReLU after
  its last layer, as the released code), then a row head with ``H`` bins and a column
  head with ``W`` bins (``2H - 1`` and ``2W - 1`` in ``signed`` mode);
  ``CE(row) + CE(col)``, each the mean over the ``B * m`` pairs;
* ``cbr``: the same trunk and bins; ``beta = softmax(bins)``, ``mu = sum_k beta_k k``,
  ``var = sum_k beta_k (k - mu)^2 + 1e-8``, loss
  ``mean(exp(-log var) (mu - t)^2 + 0.001 log var)``, row plus column.

``normalize`` applies to the ``l1`` regression only: the classification heads predict
integer bins, so ``normalize = true`` with ``ce`` or ``cbr`` is refused
(``drloc.normalize``) instead of being silently ignored.

The head's first layer runs through the op's ``drloc_first_layer``, which equals the plain
``Linear(cat(e_a, e_b))`` for every ``first_layer``: ``"gather"`` gathers the pairs straight
into one ``[B, m, 2C]`` buffer; ``"project"`` uses ``W1 [e_a; e_b] = W1a e_a + W1b e_b`` to
project every token once and gather rows; ``"unique"`` (CPU) projects only the distinct
tokens each side uses; ``"auto"`` picks the cheapest by the op's cost model
(``choose_first_layer_strategy``: matrix-product FLOPs plus weighted memory traffic, from
``B``, ``C``, ``hidden``, ``m`` and ``H * W``).

Multi-scale (``multiscale = true``, "very dense" in the paper): one head per stage of
``outputs["grids"]`` (a hierarchical model, e.g. ``vit_hier`` below), the stages'
losses summed. Otherwise one head on ``outputs["grid"]`` (the last stage).

Schedule (``[drloc] schedule``; epochs ``e`` count from 1, ``E`` is the run's real
``epochs``, ``t = e - 1`` the epochs completed, ``Wu = min(warmup_epochs, E)``):

* ``warmup_decay`` (the released code's, with its end moved to the run's real length):
  ``lambda0 * t / Wu`` while ``t < Wu``, then ``lambda0 * (1 - (t - Wu) / (E - Wu))``:
  ``lambda0`` at ``t = Wu``, falling linearly to reach 0 at ``t = E``, the end of the
  run's last epoch (the last epoch trains with ``lambda0 / (E - Wu)``);
* ``constant``: ``lambda0`` (the paper's formula).

The epoch's value is logged as ``drloc/lambda`` and the epoch's mean unweighted DRLoc
loss as ``drloc/loss``; the loss term is ``drloc`` = ``lambda * L``.

Randomness: each step draws one 32-bit seed from the run's CPU generator ``"drloc"``
(saved in checkpoints, so ``--resume`` is exact) and folds in the step, the rank and
the stage (:func:`batchkin.kernels.rng.derive_key`); heads are initialised from a
local generator seeded from the run's seed. The global RNG is never read, seeded or
advanced. Heads are added to the model as ``model.drloc`` (a ``ModuleDict``): they are
checkpointed and optimised with the model, and they only run inside ``loss_terms``,
which fires in training only; evaluation never runs them.

Functional twins, usable without the engine: :func:`drloc_lambda`,
:func:`drloc_l1_loss`, :func:`drloc_ce_loss`, :func:`drloc_cbr_loss`,
:func:`drloc_loss` and :class:`DRLocHead`; :func:`token_grids` probes a model for its
grids. This module also registers the model ``vit_hier`` (:class:`HierViT`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.backbones.swin import PatchMerging as SwinPatchMerging
from batchkin.errors import ConfigError, RunError
from batchkin.hookspecs import hookimpl
from batchkin.kernels.drloc_pairs import drloc_first_layer, drloc_positions, drloc_targets
from batchkin.kernels.rng import derive_key
from batchkin.models import Block, Classifier
from batchkin.plugin import Method

HEADS = ("l1", "ce", "cbr")
MODES = ("abs", "signed")
SCHEDULES = ("warmup_decay", "constant")
FIRST_LAYER = ("auto", "project", "gather", "unique")
#: ``var`` floor of the cbr loss and the weight of its ``log var`` term.
CBR_EPS = 1e-8
CBR_LOG_VAR_WEIGHT = 0.001
#: Stream id folded into the run's seed for the heads' initialisation.
INIT_STREAM = 0x44524C6F  # "DRLo"


# ------------------------------------------------------------------------------ schedule


def drloc_lambda(epoch: int, epochs: int, schedule: str = "warmup_decay", *, lambda0: float = 0.1,
                 warmup_epochs: int = 20) -> float:
    """``lambda`` for epoch ``epoch`` (from 1) of a run of ``epochs`` epochs; see the module docstring."""
    for name, value in (("epoch", epoch), ("epochs", epochs), ("warmup_epochs", warmup_epochs)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if epochs < 1 or not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must lie in [1, epochs]; got epoch={epoch}, epochs={epochs}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0; got {warmup_epochs}")
    if not (isinstance(lambda0, (int, float)) and not isinstance(lambda0, bool)
            and math.isfinite(lambda0) and lambda0 >= 0):
        raise ValueError(f"lambda0 must be a finite number >= 0; got {lambda0!r}")
    if schedule == "constant":
        return float(lambda0)
    if schedule != "warmup_decay":
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    warm = min(warmup_epochs, epochs)
    t = epoch - 1
    if t < warm:
        return lambda0 * t / warm
    return lambda0 * (1 - (t - warm) / (epochs - warm))


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


# ------------------------------------------------------------------------------ models


def token_grids(model: nn.Module, image_shape) -> list[tuple[int, int, int]] | None:
    """``[(C, H, W), ...]`` of the grids ``model.forward_features`` returns for one image of
    ``image_shape`` (``"grids"``, else ``["grid"]``), or ``None`` if it returns no grid.

    Runs one forward pass in evaluation mode without gradients (BatchNorm statistics are not
    updated; the global RNG state is restored), then restores the model's mode.
    """
    forward_features = getattr(model, "forward_features", None)
    if not callable(forward_features):
        return None
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, *image_shape, device=device)
    was = model.training
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            out = forward_features(x)
        finally:
            model.train(was)
    if not isinstance(out, dict) or not isinstance(out.get("grid"), torch.Tensor):
        return None
    grids = out.get("grids") or [out["grid"]]
    if any(not isinstance(g, torch.Tensor) or g.dim() != 4 for g in grids) or out["grid"].dim() != 4:
        return None
    return [tuple(int(s) for s in g.shape[1:]) for g in grids]


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


def _hier_builder(options: HierViTOptions, *, num_classes, in_channels, image_size):
    return HierViT(options, num_classes, in_channels, image_size)


# ------------------------------------------------------------------------------ the method


class DRLoc(Method):
    """DRLoc as a batchkin method: a thin adapter over :func:`drloc_loss` and :func:`drloc_lambda`."""

    @dataclass
    class Options:
        head: Literal["l1", "ce", "cbr"] = field(
            default="l1", metadata={"help": "head and loss: l1 regression, ce (bins), cbr (regression on the bins)"})
        mode: Literal["abs", "signed"] = field(
            default="abs", metadata={"help": "targets: |a - b| (abs) or a - b + size - 1 (signed)"})
        normalize: bool = field(default=False, metadata={"help": "divide the targets by size - 1 (l1 head only)"})
        m: int = field(default=64, metadata={"ge": 1, "help": "pairs drawn per image (per stage)"})
        hidden: int = field(default=512, metadata={"ge": 1, "help": "hidden width of the heads"})
        multiscale: bool = field(default=False, metadata={"help": "one head per stage of outputs['grids'], summed"})
        schedule: Literal["warmup_decay", "constant"] = field(
            default="warmup_decay", metadata={"help": "lambda: linear warm-up then linear decay to 0 at the run's "
                                                      "end, or constant"})
        lambda0: float = field(default=0.1, metadata={"ge": 0.0, "help": "peak (or constant) weight of the loss"})
        warmup_epochs: int = field(default=20, metadata={"ge": 0, "help": "warm-up length (clipped to epochs)"})
        first_layer: Literal["auto", "project", "gather", "unique"] = field(
            default="auto", metadata={"help": "first head layer: project every token once, gather the pairs, "
                                              "project the distinct tokens (CPU), or auto (cost model)"})

        def validate(self):
            if self.normalize and self.head != "l1":
                raise ConfigError(
                    f"normalize = true applies to the l1 head only: the {self.head!r} head predicts integer bins "
                    f"(set drloc.normalize = false or drloc.head = 'l1')")

    def __init__(self, options=None):
        super().__init__(options)
        self.lam = 0.0
        self._loss_sum, self._loss_count = None, 0

    @hookimpl
    def wrap_model(self, state):
        o = self.options
        model = state.model
        name = state.config.model["name"]
        shapes = token_grids(model, state.splits.image_shape)
        if shapes is None:
            raise ConfigError(
                f"drloc needs a model whose forward_features returns a token grid 'grid' [B, C, H, W] "
                f"(e.g. model.name = 'vit' or 'vit_hier'); model.name = {name!r} does not")
        if hasattr(model, "drloc"):
            raise ConfigError(f"model.name = {name!r} already has an attribute 'drloc'; drloc adds its heads there")
        gen = torch.Generator().manual_seed(derive_key(state.config.seed, INIT_STREAM))
        keys = [str(s) for s in range(len(shapes))] if o.multiscale else ["grid"]
        used = shapes if o.multiscale else [shapes[-1]]
        heads = nn.ModuleDict({
            key: DRLocHead(c, o.head, o.mode, (h, w), o.hidden, generator=gen) for key, (c, h, w) in zip(keys, used)
        })
        model.add_module("drloc", heads)

    @hookimpl
    def on_epoch_start(self, state):
        o = self.options
        self.lam = drloc_lambda(state.epoch, state.epochs, o.schedule, lambda0=o.lambda0,
                                warmup_epochs=o.warmup_epochs)
        self._loss_sum, self._loss_count = None, 0
        state.epoch_metrics["drloc/lambda"] = self.lam

    @hookimpl
    def loss_terms(self, state, outputs):
        if not state.training:
            return None
        o = self.options
        if "grid" not in outputs:
            raise RunError("drloc: the forward pass returned no token grid (outputs['grid']); a method that owns "
                           "forward must keep forward_features' outputs")
        grids = list(outputs.get("grids") or [outputs["grid"]]) if o.multiscale else [outputs["grid"]]
        heads = state.unwrapped_model.drloc
        if len(grids) != len(heads):
            raise RunError(f"drloc: the forward pass returned {len(grids)} grids; the model has {len(heads)} heads")
        seed = int(torch.randint(0, 2**32, (1,), generator=state.generator("drloc", "cpu"), dtype=torch.int64))
        keys = [derive_key(seed, state.step, state.rank, s) for s in range(len(grids))]
        loss = drloc_loss(grids, heads, o.m, keys, o.mode, normalize=o.normalize, first_layer=o.first_layer)
        detached = loss.detach().float()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._loss_count += 1
        return {"drloc": self.lam * loss}

    @hookimpl
    def on_epoch_end(self, state):
        if self._loss_count:
            state.epoch_metrics["drloc/loss"] = float(self._loss_sum) / self._loss_count

    def state_dict(self) -> dict:
        return {"lambda": self.lam}

    def load_state_dict(self, state: dict) -> None:
        self.lam = float(state.get("lambda", 0.0))


@hookimpl
def register_methods(register):
    register("drloc", DRLoc)


@hookimpl
def register_models(register):
    register("vit_hier", _hier_builder, options=HierViTOptions)
