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

Functional twins, usable without the engine: :func:`drloc_lambda` (here) and, from
:mod:`batchkin.plugins.drloc_head` (names also importable from here),
:func:`drloc_l1_loss`, :func:`drloc_ce_loss`, :func:`drloc_cbr_loss`,
:func:`drloc_loss` and :class:`DRLocHead`; :func:`token_grids` probes a model for its
grids. This module also registers the model ``vit_hier`` (:class:`HierViT`, in
:mod:`batchkin.plugins.hier_vit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from batchkin.errors import ConfigError, RunError
from batchkin.hookspecs import hookimpl
from batchkin.kernels.rng import derive_key
from batchkin.plugin import Method
from batchkin.plugins.drloc_head import (  # noqa: F401  (public names of this module)
    CBR_EPS,
    CBR_LOG_VAR_WEIGHT,
    FIRST_LAYER,
    HEADS,
    MODES,
    DRLocHead,
    drloc_cbr_loss,
    drloc_ce_loss,
    drloc_l1_loss,
    drloc_loss,
)
from batchkin.plugins.hier_vit import HierViT, HierViTOptions, PatchMerging  # noqa: F401
from batchkin.plugins.hier_vit import hier_vit_builder as _hier_builder

SCHEDULES = ("warmup_decay", "constant")
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
