"""``bbn``: the Bilateral-Branch Network (BBN) for long-tailed recognition, with cumulative learning.

Two branches share a backbone's trunk; the last residual block is duplicated into a
*conventional* block (``cb_block``) fed by the uniform sampler and a *re-balancing*
block (``rb_block``) fed by a reversed class sampler. One ``Linear(2D, K)``
classifier reads the concatenated branch features. A schedule ``alpha`` moves the
training focus from the conventional to the re-balancing branch:

* training logits ``z = classifier(cat(2 alpha f_c, 2 (1 - alpha) f_r))
  = 2 alpha W_c f_c + 2 (1 - alpha) W_r f_r + b``;
* loss ``alpha CE(z, y_c) + (1 - alpha) CE(z, y_r)`` on the same logits;
* evaluation: both blocks on the same image, ``classifier(cat(f_c, f_r))``, which is
  exactly the training combiner at ``alpha = 0.5``.

Schedules (``[bbn] alpha_schedule``; epochs ``e`` count from 1, ``t = min((e - 1) / D, 1)``
with ``D`` = ``[bbn] alpha_epochs``, by default the run's ``epochs`` E):
``parabolic_decay`` ``1 - t ** 2`` (the default), ``linear_decay`` ``1 - t``,
``cosine_decay`` ``cos(t * pi / 2)``, ``parabolic_increment`` ``t ** 2``, ``fixed``
``0.5``, and ``beta``: a new ``alpha ~ Beta(b, b)`` (``b`` = ``[bbn] beta``, 0.2) for
every training batch, drawn from the run's ``"bbn"`` generator. ``alpha_epochs`` other
than E reproduces upstream's iNaturalist recipes, which divide by 100 (200) in 90-epoch
(180-epoch) runs (``alpha_epochs = 100``: the last epoch's alpha is 0.2079, not 0.0221);
a ``D`` below E holds ``t`` at 1 from epoch ``D + 1`` on. ``alpha`` is logged as
``bbn/alpha`` every epoch (for ``beta``, the mean of the epoch's draws) and saved in
checkpoints.

The reversed stream (``[bbn] sampler``): ``reversed`` (``P_c`` proportional to
``n_max / n_c``), ``balanced`` (``1 / C``) or ``instance`` (``n_c / N``); a class is
drawn from ``P``, then an instance of it uniformly, with replacement. It is drawn by
:func:`batchkin.kernels.reversed_sampler.sample_epoch` from ``(seed, epoch)``.

The method is used on its own (``methods = ["bbn"]``, not with ``ce``: its loss
replaces cross-entropy). It owns ``build_sampler`` and ``forward``. It composes
with methods that act on features (BatchFormer sees the combined features through
``transform_features``; list ``bbn`` first so that later methods see the bilateral
model, whose ``feature_dim`` is ``2 D``).

Functional twins, usable without the engine: :func:`bbn_alpha`,
:func:`reversed_sampler`, :func:`bbn_features`, :func:`bbn_logits`,
:func:`bbn_loss`, :func:`sample_beta`; plus :class:`BBNSampler` (the dual index
stream) and :class:`BilateralNet` (the two-branch model wrapper).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.data import ShuffleSampler
from batchkin.errors import ConfigError, DataError, RunError
from batchkin.hookspecs import hookimpl
from batchkin.kernels.reversed_sampler import MODES, class_sorted_table, sample_epoch
from batchkin.kernels.rng import derive_key
from batchkin.models import Classifier
from batchkin.plugin import Method

SCHEDULES = ("parabolic_decay", "linear_decay", "cosine_decay", "parabolic_increment", "fixed", "beta")
#: Stream id folded into the run's seed for the reversed stream's uniforms.
REVERSED_STREAM = 0x42424E  # "BBN"


# ------------------------------------------------------------------------------ functional twins


def sample_beta(a: float, b: float, generator: torch.Generator | None = None, n: int = 1) -> torch.Tensor:
    """``n`` exact draws of ``Beta(a, b)`` (float64, CPU) from ``generator``'s uniforms.

    Jöhnk's method: ``X = U ** (1 / a)``, ``Y = V ** (1 / b)`` with ``U, V`` uniform,
    accepted when ``X + Y <= 1``; then ``X / (X + Y) ~ Beta(a, b)``. It is exact for
    every ``a, b > 0`` and accepts often for small ones (about 95% for
    ``a = b = 0.2``). Computed in log space, so tiny ``X`` and ``Y`` do not underflow.
    ``torch.distributions.Beta`` cannot take a generator, hence this sampler.
    """
    if not (a > 0 and b > 0 and math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"Beta parameters must be finite and > 0; got a={a!r}, b={b!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    out: list[torch.Tensor] = []
    have = 0
    while have < n:
        m = max(2 * (n - have), 8)
        u = torch.rand(2, m, generator=generator, dtype=torch.float64)
        log_x, log_y = torch.log(u[0]) / a, torch.log(u[1]) / b
        log_s = torch.logaddexp(log_x, log_y)
        ok = (log_s <= 0) & torch.isfinite(log_s)
        draws = torch.exp(log_x[ok] - log_s[ok])
        out.append(draws)
        have += draws.numel()
    return torch.cat(out)[:n] if out else torch.empty(0, dtype=torch.float64)


def bbn_alpha(epoch: int, epochs: int, schedule: str = "parabolic_decay", *,
              generator: torch.Generator | None = None, beta: float = 0.2, alpha_epochs: int | None = None) -> float:
    """The cumulative-learning weight ``alpha`` of epoch ``epoch`` (counted from 1) of ``epochs``.

    With ``t = min((e-1)/D, 1)`` and ``D = alpha_epochs`` (default ``epochs``):
    ``parabolic_decay`` ``1 - t**2``, ``linear_decay`` ``1 - t``, ``cosine_decay``
    ``cos(t * pi/2)``, ``parabolic_increment`` ``t**2``, ``fixed`` ``0.5``; ``beta``
    returns one draw of ``Beta(beta, beta)`` from ``generator`` (a per-batch value;
    ``epoch`` is then only checked).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")
    period = epochs if alpha_epochs is None else alpha_epochs
    for name, v in (("epoch", epoch), ("epochs", epochs), ("alpha_epochs", period)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if epochs < 1 or not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must lie in 1..epochs (epochs >= 1); got epoch={epoch}, epochs={epochs}")
    if period < 1:
        raise ValueError(f"alpha_epochs must be >= 1; got {period}")
    t = min((epoch - 1) / period, 1.0)
    if schedule == "parabolic_decay":
        return 1.0 - t * t
    if schedule == "linear_decay":
        return 1.0 - t
    if schedule == "cosine_decay":
        return math.cos(t * math.pi / 2)
    if schedule == "parabolic_increment":
        return t * t
    if schedule == "fixed":
        return 0.5
    return float(sample_beta(beta, beta, generator, 1)[0])


def reversed_sampler(labels: torch.Tensor, num_draws: int, *, seed: int, epoch: int, mode: str = "reversed",
                     num_classes: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
    """Draws ``start .. stop - 1`` of epoch ``epoch``'s reversed stream over ``labels`` (int64 indices).

    Each draw picks class ``c`` with probability ``P_c`` (``mode``: ``reversed``
    ``n_max / n_c``, ``balanced`` ``1 / C``, ``instance`` ``n_c / N``, normalised) and
    then one of its samples uniformly, with replacement. The sequence depends only on
    ``(seed, epoch)``, so any slice equals the same slice of the whole epoch.
    """
    k = int(labels.max()) + 1 if num_classes is None else num_classes
    sorted_indices, counts = class_sorted_table(labels, k)
    return sample_epoch(sorted_indices, counts, num_draws, seed=seed, epoch=epoch, mode=mode, start=start, stop=stop)


def bbn_features(f_c: torch.Tensor, f_r: torch.Tensor, alpha) -> torch.Tensor:
    """The classifier's input ``cat(2 alpha f_c, 2 (1 - alpha) f_r)`` (``cat(f_c, f_r)`` at 0.5)."""
    if f_c.shape != f_r.shape:
        raise ValueError(f"f_c and f_r must have the same shape; got {tuple(f_c.shape)} and {tuple(f_r.shape)}")
    return torch.cat([f_c * (2 * alpha), f_r * (2 * (1 - alpha))], dim=1)


def bbn_logits(f_c: torch.Tensor, f_r: torch.Tensor, alpha, weight: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``2 alpha W_c f_c + 2 (1 - alpha) W_r f_r + b`` with ``weight = [W_c | W_r]`` of shape ``[K, 2D]``."""
    return F.linear(bbn_features(f_c, f_r, alpha), weight, bias)


def bbn_loss(logits: torch.Tensor, y_c: torch.Tensor, y_r: torch.Tensor, alpha) -> torch.Tensor:
    """``alpha CE(z, y_c) + (1 - alpha) CE(z, y_r)`` (mean cross-entropies, in float32)."""
    z = logits.float()
    return alpha * F.cross_entropy(z, y_c) + (1 - alpha) * F.cross_entropy(z, y_r)


# ------------------------------------------------------------------------------ the dual sampler


class BBNSampler:
    """The dual index stream: each step yields ``{"": uniform indices, "rev": reversed indices}``.

    The uniform stream is the engine's :class:`~batchkin.data.ShuffleSampler` (one
    seeded permutation per epoch, sharded). The reversed stream is a global sequence
    of ``num_draws`` draws per epoch (the number of indices the uniform stream yields
    in the epoch, over all ranks) from :func:`sample_epoch` with seed
    ``derive_key(seed, REVERSED_STREAM)`` and the epoch; it is cut exactly like the
    uniform stream: step ``s`` covers draws ``s*B*W .. (s+1)*B*W - 1`` and rank ``r``
    takes its slice ``r*B .. (r+1)*B - 1`` of them (only that slice is computed). So
    every rank's pair of batches has equal sizes, the ranks' shards are disjoint and
    cover the epoch, and ``state_dict`` (the position in the epoch) resumes mid-epoch.
    """

    def __init__(self, labels: torch.Tensor, num_classes: int, batch_size: int, seed: int, *,
                 mode: str = "reversed", drop_last: bool = True, rank: int = 0, world: int = 1):
        if mode not in MODES:
            raise ConfigError(f"bbn.sampler must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
        labels = labels.detach().to("cpu", torch.int64)
        self.uniform = ShuffleSampler(len(labels), batch_size, seed, drop_last=drop_last, rank=rank, world=world)
        self.sorted_indices, self.counts = class_sorted_table(labels, num_classes)
        empty = torch.nonzero(self.counts == 0).flatten()
        if empty.numel():
            raise DataError(
                f"bbn: class {int(empty[0])} has no training images; the reversed sampler needs every class"
            )
        self.mode, self.seed, self.stream_seed = mode, seed, derive_key(seed, REVERSED_STREAM)
        self.batch_size, self.rank, self.world = batch_size, rank, world
        g = batch_size * world
        self.num_draws = len(self.uniform) * g if drop_last else len(labels)

    @property
    def epoch(self) -> int:
        return self.uniform.epoch

    @property
    def position(self) -> int:
        return self.uniform.position

    def set_epoch(self, epoch: int) -> None:
        self.uniform.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.uniform)

    def shard(self, step: int) -> tuple[int, int]:
        """The draws ``(start, stop)`` of the reversed stream this rank takes at ``step``."""
        g = self.batch_size * self.world
        lo = step * g
        size = min(g, self.num_draws - lo)
        per = math.ceil(size / self.world)
        return min(lo + self.rank * per, lo + size), min(lo + (self.rank + 1) * per, lo + size)

    def reversed_indices(self, step: int) -> torch.Tensor:
        start, stop = self.shard(step)
        return sample_epoch(self.sorted_indices, self.counts, self.num_draws, seed=self.stream_seed,
                            epoch=self.epoch, mode=self.mode, start=start, stop=stop)

    def __iter__(self):
        """One epoch of steps, from the saved position (a resumed sampler continues mid-epoch).
        Iterating a finished epoch again yields it again, as ``DistributedSampler`` does."""
        if self.position >= len(self):
            self.uniform.load_state_dict({"epoch": self.epoch, "position": 0})
        for item in self.uniform:
            step = self.uniform.position - 1  # ShuffleSampler advances its position before yielding
            yield {"": item[""], "rev": self.reversed_indices(step)}

    def state_dict(self) -> dict:
        return self.uniform.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.uniform.load_state_dict(state)


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


# ------------------------------------------------------------------------------ the method


class BBN(Method):
    """BBN as a batchkin method: a thin adapter over the functions above."""

    @dataclass
    class Options:
        sampler: Literal["reversed", "balanced", "instance"] = field(
            default="reversed",
            metadata={"help": "re-balancing stream: reversed (P_c ~ n_max/n_c), balanced (1/C) or instance (n_c/N)"},
        )
        alpha_schedule: Literal[
            "parabolic_decay", "linear_decay", "cosine_decay", "parabolic_increment", "fixed", "beta"
        ] = field(default="parabolic_decay", metadata={"help": "cumulative-learning schedule of alpha (epochs from 1)"})
        alpha_epochs: int = field(
            default=0,
            metadata={"ge": 0, "help": "the schedule's period D, t = min((e - 1) / D, 1) (0 = the run's epochs; "
                                       "upstream's 90/180-epoch iNaturalist recipes use 100/200)"},
        )
        beta: float = field(
            default=0.2, metadata={"gt": 0.0, "help": "alpha_schedule = 'beta': alpha ~ Beta(beta, beta) per batch"}
        )
        fused: bool = field(
            default=False,
            metadata={"help": "one trunk pass over cat(x, x_rev) instead of two: faster, but changes the trunk's "
                              "BatchNorm statistics (both batches normalised together)"},
        )

    def __init__(self, options=None):
        super().__init__(options)
        self.alpha = 1.0  # the epoch's alpha (the last draw for 'beta')
        self.alpha_sum, self.alpha_count = 0.0, 0

    # -- set-up ---------------------------------------------------------------------------

    @hookimpl
    def configure(self, state):
        if "ce" in state.config.methods:
            raise ConfigError("methods lists both 'bbn' and 'ce': bbn's loss replaces cross-entropy; remove 'ce'")

    @hookimpl
    def wrap_model(self, state):
        model = state.model
        if not all(isinstance(getattr(model, a, None), nn.Module) for a in ("trunk", "last_block")):
            raise ConfigError(
                f"bbn needs a model that exposes trunk and last_block (a registered ResNet such as resnet32); "
                f"model.name = {state.config.model['name']!r} does not"
            )
        state.model = BilateralNet(model, fused=self.options.fused)

    @hookimpl
    def build_sampler(self, state):
        cfg = state.config
        return BBNSampler(state.splits.train.y, state.num_classes, cfg.data.batch_size, cfg.seed,
                          mode=self.options.sampler, drop_last=cfg.data.drop_last,
                          rank=state.rank, world=state.world_size)

    # -- per epoch / step -----------------------------------------------------------------

    @hookimpl
    def on_epoch_start(self, state):
        self.alpha_sum, self.alpha_count = 0.0, 0
        if self.options.alpha_schedule != "beta":
            self.alpha = bbn_alpha(state.epoch, state.epochs, self.options.alpha_schedule,
                                   alpha_epochs=self.options.alpha_epochs or None)
            state.epoch_metrics["bbn/alpha"] = self.alpha

    @hookimpl
    def transform_batch(self, state):
        if self.options.alpha_schedule == "beta":
            self.alpha = bbn_alpha(state.epoch, state.epochs, "beta",
                                   generator=state.generator("bbn", "cpu"), beta=self.options.beta)
        self.alpha_sum += self.alpha
        self.alpha_count += 1

    @hookimpl
    def forward(self, state):
        from batchkin.trainer import classify_streams

        x = state.batch["x"]
        if state.training:
            if "x_rev" not in state.batch:
                raise RunError("bbn: the training batch has no reversed stream (x_rev); bbn must own build_sampler")
            alpha = self.alpha
            out = dict(state.model(x, x_rev=state.batch["x_rev"], alpha=alpha, return_features=True))
        else:
            alpha = 0.5
            out = dict(state.model(x, return_features=True))
        out["alpha"] = alpha
        return classify_streams(state, out)

    @hookimpl
    def loss_terms(self, state, outputs):
        return {"bbn": bbn_loss(outputs["logits"], state.targets("y"), state.targets("y_rev"), outputs["alpha"])}

    @hookimpl
    def on_epoch_end(self, state):
        if self.options.alpha_schedule == "beta" and self.alpha_count:
            state.epoch_metrics["bbn/alpha"] = self.alpha_sum / self.alpha_count

    # -- resume ---------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"alpha": self.alpha, "alpha_sum": self.alpha_sum, "alpha_count": self.alpha_count}

    def load_state_dict(self, state: dict) -> None:
        self.alpha = float(state["alpha"])
        self.alpha_sum = float(state.get("alpha_sum", 0.0))
        self.alpha_count = int(state.get("alpha_count", 0))


@hookimpl
def register_methods(register):
    register("bbn", BBN)
