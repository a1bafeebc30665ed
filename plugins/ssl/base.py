"""The common part of the SSL bases ``moco`` and ``dino``, and their contract with a mixing method.

* :class:`SSLOptions`: the options both bases' schemas extend (``momentum``,
  ``knn_k``, ``knn_temperature``, the ``views`` table); :func:`check_ssl_run` and
  :func:`check_last_batch`: the run checks.
* :class:`SSLBase`: the base class (``raw_batch = True``: the engine hands it the
  uint8 images, which it augments itself) holding the run checks, the kNN evaluator,
  the momentum update and its logging; each base adds its head, training forward and
  loss.
* :func:`ssl_train_forward`: the training forward both bases share. It draws the
  views (:mod:`.views`) from the raw batch, fires the ``transform_views`` hook on the
  uint8 global views (local crops are never mixed), runs the clean views and the
  returned :class:`MixBatch`'s mixed views through the online and the momentum branch
  (one call of the :class:`~.net.SSLNet`) and stores an :class:`SSLStep` in
  ``outputs["ssl"]``: clean and mixed outputs, keys (gathered across ranks when the
  base or the mixing needs them), the mixing record. A mixing method (SDMP) adds its
  loss terms in ``loss_terms`` from that record alone; no method looks another up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from batchkin.errors import ConfigError, RunError
from batchkin.hookspecs import hookimpl
from batchkin.models import check_classifier_protocol
from batchkin.plugin import Method

from .knn import KNNEvaluator
from .net import SSLNet, cosine_momentum, ema_update_, gather_rows
from .views import LocalCrops, ViewOptions, make_local_views, make_views, normalize_views


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


# ------------------------------------------------------------------------------ the contract with a mixing method


@dataclass
class MixBatch:
    """What a ``transform_views`` implementation (SDMP) returns to an SSL base.

    ``mixed``: uint8 views ``[V, B, C, H, W]``. ``lam``: ``lam_eff`` ``[V, B]`` of this
    rank's samples (the weight of the sample's own image, from the boxes actually
    pasted). ``partner``: int64 ``[B]``, the row of each sample's partner in the global
    batch (rank-major, ``world * B`` rows). ``lam_keys``: ``lam_eff`` ``[V, world * B]`` of
    every row of the global batch, so that a loss reads the partner's ``lam`` at the
    partner's row. ``op``: the batch's operator code. ``global_pairs``: partners may be
    rows of other ranks (SDMP's ``flip = "global"``), so the keys must be gathered.

    :meth:`localized` re-bases ``partner`` and ``lam_keys`` to this rank's ``B`` rows,
    for a base that keeps its keys local.
    """

    mixed: torch.Tensor
    lam: torch.Tensor
    partner: torch.Tensor
    lam_keys: torch.Tensor
    op: int
    global_pairs: bool = False

    @property
    def lam_partner(self) -> torch.Tensor:
        """``lam_eff`` ``[V, B]`` of each sample's partner (``lam_keys`` at the partner's row)."""
        return self.lam_keys[:, self.partner]

    def localized(self, rank: int, batch: int) -> MixBatch:
        """The same record with partners and ``lam_keys`` over this rank's ``batch`` rows
        (valid when every partner is a row of this rank: not ``global_pairs``)."""
        rows = slice(rank * batch, (rank + 1) * batch)
        return dataclasses.replace(self, partner=self.partner - rank * batch, lam_keys=self.lam_keys[:, rows])


@dataclass
class SSLStep:
    """What a base stores in ``outputs["ssl"]`` during training (read by its own and SDMP's
    ``loss_terms``).

    ``kind``: ``"moco"`` or ``"dino"``. ``q``: the online outputs of the clean views,
    ``q[v][s]`` ``[B, d]`` per view and feature stream (MoCo: predictor outputs; DINO:
    student head outputs): the ``V`` global views first, then DINO's local crops (the
    student sees every crop). ``keys``: momentum outputs of the clean global views only
    (the teacher never sees a local crop), gathered over ranks, ``[V, world * B, d]``
    (MoCo; DINO with a mixing's ``global_pairs``), or this rank's own ``[V, B, d]`` (DINO otherwise:
    see :func:`ssl_train_forward`); ``q[v]`` and ``keys[v]`` are the same view for
    ``v < V``. ``labels``: ``[B]``, the row of each local sample in ``keys``.
    ``temperature``: MoCo's T, DINO's student temperature. DINO also sets
    ``teacher_temp`` and ``center``. With a mixing method (``transform_views``):
    ``q_mix`` / ``keys_mix`` (the same for the mixed global views) and ``mix`` (its
    :class:`MixBatch`, over the rows of ``keys``).
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
    from the same generator) of the raw batch ``state.batch["x"]`` (uint8), the
    ``transform_views`` hook on the global views (a mixing method's extra views), the
    model's pass, keys gathered across ranks. Returns ``{"features": [B, D], "ssl": SSLStep}``.

    ``gather_keys = False`` (DINO: its loss reads only this rank's rows and its centre
    all-reduces a sum) keeps the keys local, ``[V, B, d]`` with ``labels = arange(B)``,
    and re-bases the mixing's partners to local rows (:meth:`MixBatch.localized`); a
    mixing with ``global_pairs`` pairs rows of other ranks, so with it the keys are
    gathered whatever ``gather_keys`` says."""
    data = state.train_data
    raw = state.batch["x"]
    if raw.dtype != torch.uint8:
        raise RunError(f"{kind} builds its views from the raw uint8 batch, but state.batch['x'] is {raw.dtype}: "
                       "a method changed it in transform_batch (the SSL bases ask the engine for raw_batch)")
    hflip = state.splits.hflip if view_options.hflip is None else view_options.hflip
    gen, shard = state.generator(generator_name), (state.rank, state.world_size)
    views = make_views(raw, gen, view_options, hflip=hflip, shard=shard)
    n_clean = views.shape[0]
    mix = state.hooks.transform_views(state=state, views=views)
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
    if gather_keys or (mix is not None and mix.global_pairs):
        keys = gather_rows(out["keys"], state.world_size, dim=1)
        labels = torch.arange(B, device=keys.device) + state.rank * B
    else:
        keys = out["keys"]
        labels = torch.arange(B, device=keys.device)
        if mix is not None:  # the partners are rows of this rank's batch: local rows
            mix = mix.localized(state.rank, B)
    step = SSLStep(kind=kind, q=out["q"][:n_clean] + out["q"][n_x:], keys=keys[:n_clean], labels=labels,
                   temperature=temperature, **extra)
    if mix is not None:
        step.q_mix, step.keys_mix, step.mix = out["q"][n_clean:n_x], keys[n_clean:], mix
    return {"features": out["features"][0], "ssl": step}


# ------------------------------------------------------------------------------ the bases' common part


class SSLBase(Method):
    """What the SSL bases ``moco`` and ``dino`` share; a subclass sets :attr:`name`, extends
    :class:`SSLOptions` in its ``Options`` and implements :meth:`build_model` and
    :meth:`train_forward`.

    * ``raw_batch = True``: ``state.batch["x"]`` is the uint8 batch (no engine crop,
      flip or normalisation; ``data.augment`` is not used);
    * ``configure`` / ``wrap_model``: the run checks (:func:`check_ssl_run`,
      :func:`check_last_batch`), then ``state.model = build_model(state, encoder)``;
    * ``forward``: kNN scores (:class:`KNNEvaluator`, ``knn_k``, ``knn_temperature``) in
      evaluation, :meth:`train_forward` in training;
    * ``after_step``: the momentum branch's EMA with :func:`cosine_momentum` from
      ``momentum`` over the run's optimizer steps; ``on_epoch_end`` logs it as
      ``<name>/momentum``.
    """

    roles = frozenset({"ssl-base"})
    raw_batch = True  # the engine hands over the uint8 images: the bases draw their own views
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
        check_classifier_protocol(state.model, self.name, state.config.model["name"])
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

