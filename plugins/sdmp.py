"""``sdmp``: the Simple Data Mixing Prior for self-supervised learning (needs ``moco`` or ``dino``).

METHODS.md section 4 ("Mixing", "Losses") is the specification. Images mixed from the
same source pair are extra positives with soft weights.

**Mixing** (:func:`sdmp_mix`, through :func:`batchkin.kernels.batch_mix.batch_mix`, both
views in one pass). Sample ``i`` mixes with its partner ``B-1-i`` (the batch flipped;
the middle sample of an odd batch pairs with itself). ``[sdmp] flip = "local"`` flips
each process's batch; ``"global"`` all-gathers the raw uint8 views of every rank, mixes
the global batch (partner ``W*B-1-g`` for global row ``g``) and keeps this rank's slice
(the same as ``local`` on one process). ``lam = 0.8 Beta(1, 1) + 0.1`` per sample, the
same for both views; the operator is drawn once per batch, uniformly from
``[sdmp] ops`` (mixup, cutmix, resizemix); boxes lie inside the image, one position per
view; ``lam_eff = 1 - box_area / (H W)`` from the integer box actually pasted (``lam``
for mixup). Draws come from the run's CPU generator ``"sdmp"`` and are made for the
global batch, each rank using its slice.

**Losses, MoCo form** (:func:`sdmp_moco_loss`; ``p_i(j) = softmax_j(q_i·k_j / T)``,
partner ``i'``, every term times ``2T``, summed over the two directions like MoCo v3):

* ``L_src``: MoCo's own loss on the clean views (the base's ``moco`` term);
* ``L_ms`` (term ``sdmp_ms`` = ``0.5 L_ms``): mixed queries of view a against the clean
  keys of view b, ``mean_i -log(lam_i p_i(i) + (1 - lam_i) p_i(i'))``;
* ``L_mm`` (term ``sdmp_mm`` = ``0.5 L_mm``): mixed queries against the momentum
  encoder's keys of the *mixed* view b, ``c_i = min(lam_i, 1 - lam_i') + min(1 - lam_i,
  lam_i')``, ``mean_i -log(p_i(i) / (1 + c_i) + c_i p_i(i') / (1 + c_i))``.

Each ``-log`` of a mixture is ``logsumexp_j(l_ij) - logsumexp(log w_a + l_ia, log w_b +
l_ib)`` in float32 (:func:`mixture_nll`): no softmax-then-log underflow under fp16.
``lam`` is the query view's ``lam_eff`` per sample; the losses take the key view's
``lam_eff`` per sample (per row of the keys) and read ``lam_i'`` at the partner's row.

**Losses, DINO form** (:func:`sdmp_dino_loss`, our design, METHODS.md): the student sees
the mixed view a; its target is a mixture of the teacher's (centred, sharpened)
distributions on view b: clean view with weights ``(lam, 1 - lam)`` for source-mix,
mixed view with ``(1/(1+c), c/(1+c))`` for mix-mix; cross-entropy with the student's
``log_softmax(s / T_s)``, averaged over the two directions as DINO's own loss. With DINO's
multi-crop (``[dino] n_local_crops > 0``) SDMP mixes only the two global views: the local
crops are never mixed and take part only in DINO's own loss, so the SDMP terms are the
same pairs of global views with or without local crops.

**The contract with the base** (the ``transform_views`` hook, see
:mod:`batchkin.hookspecs` and :mod:`batchkin.plugins.ssl.base`): the base's training
forward fires ``transform_views`` on its uint8 global views; SDMP answers with a
:class:`~batchkin.plugins.ssl.MixBatch` (mixed views, ``lam_eff`` per sample and per
row of the global batch, partners), the base runs the mixed views through both branches
and stores an ``SSLStep`` with the mixed branch in ``outputs["ssl"]``;
:meth:`SDMP.loss_terms` reads only that, through the functional twins. BatchFormer
composes: every feature stream of the mixed views gets its own queries, and the SDMP
terms are averaged over the streams.

Functional twins: :func:`sdmp_mix`, :func:`sdmp_lam_eff`, :func:`mixture_nll`,
:func:`sdmp_ms_loss`, :func:`sdmp_mm_weights`, :func:`sdmp_mm_loss`,
:func:`sdmp_moco_terms`, :func:`sdmp_moco_loss`, :func:`sdmp_dino_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from batchkin.errors import ConfigError
from batchkin.hookspecs import hookimpl
from batchkin.kernels.batch_mix import MIXUP, OPERATORS, MixParams, batch_mix, sample_mix_params
from batchkin.plugin import Method
from batchkin.plugins.dino import teacher_probs
from batchkin.plugins.moco import moco_loss
from batchkin.plugins.ssl import MixBatch, fp32, gather_rows

ALL_OPS = ("mixup", "cutmix", "resizemix")

# ------------------------------------------------------------------------------ mixing


def slice_params(params: MixParams, start: int, stop: int) -> MixParams:
    """The parameters of samples ``start .. stop - 1`` of a batch."""
    return MixParams(params.op[start:stop], params.lam[start:stop], params.boxes[:, start:stop])


def sdmp_mix(views: torch.Tensor, generator: torch.Generator, *, ops=ALL_OPS, params: MixParams | None = None):
    """Mix every view of a batch with its flipped self: ``views`` ``[V, B, C, H, W]`` (or
    ``[B, C, H, W]``), uint8 or float.

    Draws the parameters with :func:`~batchkin.kernels.batch_mix.sample_mix_params` from
    ``generator`` (a CPU generator; skipped when ``params`` is given) and mixes through
    :func:`~batchkin.kernels.batch_mix.batch_mix`. Returns ``(mixed, lam_eff [V, B],
    params)``.
    """
    xv = views if views.dim() == 5 else views.unsqueeze(0)
    V, B, C, H, W = xv.shape
    if params is None:
        params = sample_mix_params(B, H, W, generator=generator, ops=tuple(ops), num_views=V, device=views.device)
    mixed, lam_eff = batch_mix(xv, *params.to(views.device))
    return (mixed if views.dim() == 5 else mixed[0]), lam_eff, params


def sdmp_lam_eff(params: MixParams, H: int, W: int) -> torch.Tensor:
    """``lam_eff`` ``[V, B]`` of mixing parameters without mixing anything: ``lam`` for mixup,
    ``(H W - h w) / (H W)`` of each integer box otherwise (float64, rounded once to
    float32): what :func:`~batchkin.kernels.batch_mix.batch_mix` returns for them. SDMP
    draws the parameters of the global batch on every rank, so each rank knows every
    row's ``lam_eff`` without a collective."""
    area = (params.boxes[..., 2] * params.boxes[..., 3]).to(torch.float64)
    from_box = ((H * W - area) / (H * W)).to(torch.float32)
    return torch.where(params.op.view(1, -1) == MIXUP, params.lam.to(torch.float32).view(1, -1), from_box)


# ------------------------------------------------------------------------------ losses


def mixture_nll(logits: torch.Tensor, index_a: torch.Tensor, index_b: torch.Tensor,
                w_a: torch.Tensor, w_b: torch.Tensor) -> torch.Tensor:
    """Per row ``-log(w_a softmax(l)[a] + w_b softmax(l)[b])``, computed as
    ``logsumexp(l) - logsumexp(log w_a + l_a, log w_b + l_b)`` in float32 (zero weights
    are fine: ``log 0 = -inf`` drops out of the logsumexp)."""
    with fp32(logits.device.type):
        l = logits.float()
        la = l.gather(1, index_a.view(-1, 1)).squeeze(1)
        lb = l.gather(1, index_b.view(-1, 1)).squeeze(1)
        mix = torch.stack((torch.log(w_a.float()) + la, torch.log(w_b.float()) + lb), dim=1)
        return torch.logsumexp(l, dim=1) - torch.logsumexp(mix, dim=1)


def _logits(q, k, temperature):
    with fp32(q.device.type):
        return F.normalize(q.float(), dim=1) @ F.normalize(k.float(), dim=1).T / temperature


def _rows(q, labels, partner):
    B = q.shape[0]
    if labels is None:
        labels = torch.arange(B, device=q.device)
    if partner is None:
        partner = torch.arange(B - 1, -1, -1, device=q.device)
    return labels, partner


def _partner_lam(lam: torch.Tensor, lam_keys: torch.Tensor | None, n_keys: int, partner: torch.Tensor,
                 who: str) -> torch.Tensor:
    """``lam_keys[partner]``: the key view's ``lam_eff`` of each query's partner, after checking
    that ``lam`` has one value per query and ``lam_keys`` one per key row."""
    B = partner.shape[0]
    if lam.dim() != 1 or lam.shape[0] != B:
        raise ValueError(f"{who}: lam must hold one lam_eff per query, shape ({B},); got {tuple(lam.shape)}")
    if lam_keys is None:
        if n_keys != B:
            raise ValueError(f"{who}: with {n_keys} key rows for {B} queries, pass lam_keys (the key view's "
                             f"lam_eff of every key row, shape ({n_keys},))")
        lam_keys = lam
    if lam_keys.dim() != 1 or lam_keys.shape[0] != n_keys:
        raise ValueError(f"{who}: lam_keys must hold the key view's lam_eff of every key row, shape ({n_keys},) "
                         f"(per sample, not permuted: the partner's value is read at its row); got "
                         f"{tuple(lam_keys.shape)}")
    return lam_keys[partner]


def sdmp_ms_loss(q_mix: torch.Tensor, keys: torch.Tensor, lam: torch.Tensor, temperature: float, *,
                 labels: torch.Tensor | None = None, partner: torch.Tensor | None = None) -> torch.Tensor:
    """Source-mix loss ``2T mean_i -log(lam_i p_i(i) + (1 - lam_i) p_i(i'))`` of mixed queries
    against clean keys. ``labels`` / ``partner``: rows of each query's own and partner's
    key in ``keys`` (default ``i`` and ``B-1-i``)."""
    labels, partner = _rows(q_mix, labels, partner)
    lam = lam.float()
    nll = mixture_nll(_logits(q_mix, keys, temperature), labels, partner, lam, 1 - lam)
    return nll.mean() * (2 * temperature)


def sdmp_mm_weights(lam: torch.Tensor, lam_partner: torch.Tensor):
    """``(c, 1/(1+c), c/(1+c))`` with ``c = min(lam, 1 - lam') + min(1 - lam, lam')``: the
    overlap of sample i's mixture with its partner's mixture (``lam = 0.7, lam' = 0.4`` gives
    ``c = 0.9``, weights ``0.526, 0.474``). ``lam_partner`` is the partner's value itself."""
    lam, lam_partner = lam.double(), lam_partner.double()
    c = torch.minimum(lam, 1 - lam_partner) + torch.minimum(1 - lam, lam_partner)
    return c, 1 / (1 + c), c / (1 + c)


def sdmp_mm_loss(q_mix: torch.Tensor, keys_mix: torch.Tensor, lam: torch.Tensor, temperature: float, *,
                 lam_keys: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                 partner: torch.Tensor | None = None) -> torch.Tensor:
    """Mix-mix loss ``2T mean_i -log(p_i(i)/(1+c_i) + c_i p_i(i')/(1+c_i))`` of mixed queries
    against mixed keys, ``c_i`` from :func:`sdmp_mm_weights` of ``lam_i`` and ``lam_i'``.

    ``lam`` ``[B]``: each query's ``lam_eff`` (its own sample, the query view).
    ``lam_keys`` ``[N]``: the key view's ``lam_eff`` of every row of ``keys_mix``, per
    sample and in row order; ``lam_i' = lam_keys[partner_i]`` is read here. Default:
    ``lam`` (one process, N = B: SDMP uses the same ``lam`` for both views)."""
    labels, partner = _rows(q_mix, labels, partner)
    lam_p = _partner_lam(lam, lam_keys, keys_mix.shape[0], partner, "sdmp_mm_loss")
    _, w_self, w_partner = sdmp_mm_weights(lam, lam_p)
    nll = mixture_nll(_logits(q_mix, keys_mix, temperature), labels, partner, w_self, w_partner)
    return nll.mean() * (2 * temperature)


def sdmp_moco_terms(q_mix, keys: torch.Tensor, keys_mix: torch.Tensor, lam: torch.Tensor, temperature: float, *,
                    lam_keys: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                    partner: torch.Tensor | None = None) -> dict:
    """SDMP's two MoCo terms, each summed over the two directions (queries of view a, keys
    of view b != a, as MoCo v3): ``{"ms": L_ms, "mm": L_mm}``.

    ``q_mix``: online outputs of the mixed views (``[2, B, d]`` or a pair of ``[B, d]``);
    ``keys`` / ``keys_mix`` ``[2, N, d]``: momentum outputs of the clean / mixed views
    (no gradient flows into them); ``lam`` ``[2, B]``; ``lam_keys`` ``[2, N]`` (default
    ``lam``); ``labels`` / ``partner``: key rows of each query's own sample and partner."""
    lam_keys = lam if lam_keys is None else lam_keys
    ms = mm = 0
    for a, b in ((0, 1), (1, 0)):
        ms = ms + sdmp_ms_loss(q_mix[a], keys[b].detach(), lam[a], temperature, labels=labels, partner=partner)
        mm = mm + sdmp_mm_loss(q_mix[a], keys_mix[b].detach(), lam[a], temperature, lam_keys=lam_keys[b],
                               labels=labels, partner=partner)
    return {"ms": ms, "mm": mm}


def sdmp_moco_loss(q: torch.Tensor, k: torch.Tensor, q_mix: torch.Tensor, k_mix: torch.Tensor, lam: torch.Tensor,
                   temperature: float = 0.2, *, weights=(0.5, 0.5)) -> dict:
    """SDMP's MoCo loss on one process: ``q``, ``k``, ``q_mix``, ``k_mix`` ``[2, B, d]`` (online
    and momentum outputs of the clean and mixed views), ``lam`` ``[2, B]`` (``lam_eff`` per
    view). Returns ``{"src", "ms", "mm", "loss"}`` with ``loss = src + 0.5 ms + 0.5 mm``;
    each term sums the two directions (:func:`sdmp_moco_terms`)."""
    src = moco_loss(q[0], q[1], k[0], k[1], temperature)
    terms = sdmp_moco_terms(q_mix, k, k_mix, lam, temperature)
    return {"src": src, **terms, "loss": src + weights[0] * terms["ms"] + weights[1] * terms["mm"]}


def soft_cross_entropy(student: torch.Tensor, target: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``mean_i -sum_j target_ij log_softmax(student_i / T_s)_j`` in float32."""
    with fp32(student.device.type):
        return -(target.float() * F.log_softmax(student.float() / student_temp, dim=1)).sum(1).mean()


def sdmp_dino_loss(student_mix, teacher_probs: torch.Tensor, teacher_probs_mix: torch.Tensor,
                   lam: torch.Tensor, student_temp: float = 0.1, *, lam_keys: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None, partner: torch.Tensor | None = None) -> dict:
    """SDMP's DINO form. ``student_mix`` ``[2, B, K]`` (or a pair of ``[B, K]``): student
    outputs of the mixed views; ``teacher_probs`` / ``teacher_probs_mix`` ``[2, N, K]``: the
    teacher's centred and sharpened distributions of the clean / mixed views (N rows:
    gathered over ranks when the pairs cross ranks, this rank's B rows otherwise);
    ``lam`` ``[2, B]``; ``lam_keys`` ``[2, N]``: ``lam_eff`` of every teacher row per view
    (default ``lam``, N = B). Source-mix target ``lam P(b, i) + (1 - lam) P(b, i')``;
    mix-mix target ``P_mix(b, i)/(1+c) + c P_mix(b, i')/(1+c)`` with ``c`` from ``lam_i``
    and ``lam_keys[b][i']``; averaged over the directions a != b. Returns ``{"ms", "mm"}``."""
    labels, partner = _rows(student_mix[0], labels, partner)
    lam_keys = lam if lam_keys is None else lam_keys
    ms = mm = 0
    for a, b in ((0, 1), (1, 0)):
        la = lam[a].float().view(-1, 1)
        p = teacher_probs[b].float()
        target = la * p[labels] + (1 - la) * p[partner]
        ms = ms + soft_cross_entropy(student_mix[a], target, student_temp)
        lam_p = _partner_lam(lam[a], lam_keys[b], p.shape[0], partner, "sdmp_dino_loss")
        _, w_self, w_partner = sdmp_mm_weights(lam[a], lam_p)
        pm = teacher_probs_mix[b].float()
        target = w_self.float().view(-1, 1) * pm[labels] + w_partner.float().view(-1, 1) * pm[partner]
        mm = mm + soft_cross_entropy(student_mix[a], target, student_temp)
    return {"ms": ms / 2, "mm": mm / 2}


# ------------------------------------------------------------------------------ the method


class SDMP(Method):
    """SDMP as a plugin over an SSL base (see the module docstring)."""

    requires = ("moco", "dino")

    @dataclass
    class Options:
        ops: list[str] = field(default_factory=lambda: list(ALL_OPS),
                               metadata={"help": "operators chosen from per batch: mixup, cutmix, resizemix"})
        flip: Literal["local", "global"] = field(default="local",
                                                 metadata={"help": "partner B-1-i within each process's batch, or the global batch"})
        weight_ms: float = field(default=0.5, metadata={"ge": 0.0, "help": "weight of the source-mix loss"})
        weight_mm: float = field(default=0.5, metadata={"ge": 0.0, "help": "weight of the mix-mix loss"})

        def validate(self):
            if not self.ops:
                raise ConfigError("ops must name at least one operator (mixup, cutmix, resizemix)")
            for op in self.ops:
                if op not in OPERATORS:
                    raise ConfigError(f"ops: unknown operator {op!r}; choose from {', '.join(ALL_OPS)}")
            if len(set(self.ops)) != len(self.ops):
                raise ConfigError(f"ops lists an operator twice: {self.ops}")

    def __init__(self, options=None):
        super().__init__(options)
        self.lam_sum, self.count, self.op_counts = 0.0, 0, [0, 0, 0]

    @hookimpl
    def configure(self, state):
        if not any(m in state.config.methods for m in self.requires):
            raise ConfigError("sdmp needs an SSL base: add 'moco' or 'dino' to methods")

    @hookimpl
    def transform_views(self, state, views: torch.Tensor) -> MixBatch:
        """Mix the base's uint8 global views ``[V, B, C, H, W]`` (DINO's local crops are not
        passed here): the parameters are drawn for the global batch from the run's CPU
        generator ``"sdmp"``; each rank mixes its own rows (``flip = "local"``) or the
        gathered global batch, keeping its slice (``"global"``)."""
        V, B, C, H, W = views.shape
        rank, world = state.rank, state.world_size
        gen = state.generator("sdmp", "cpu")
        params = sample_mix_params(B * world, H, W, generator=gen, ops=tuple(self.options.ops), num_views=V)
        ar = torch.arange(B, device=views.device)
        mine = slice(rank * B, (rank + 1) * B)
        global_pairs = self.options.flip == "global"
        if global_pairs and world > 1:
            everything = gather_rows(views, world, dim=1)
            mixed, lam_keys, _ = sdmp_mix(everything, gen, params=params)
            mixed, lam = mixed[:, mine].contiguous(), lam_keys[:, mine]
            partner = world * B - 1 - (rank * B + ar)
        else:
            mixed, lam, _ = sdmp_mix(views, gen, params=slice_params(params, rank * B, (rank + 1) * B))
            lam_keys = sdmp_lam_eff(params, H, W).to(views.device)  # every rank's rows: the draws are global
            partner = rank * B + (B - 1 - ar)
        op = int(params.op[0])
        self.lam_sum += float(lam.double().mean())
        self.count += 1
        self.op_counts[op] += 1
        return MixBatch(mixed=mixed, lam=lam, partner=partner, lam_keys=lam_keys, op=op, global_pairs=global_pairs)

    @hookimpl
    def loss_terms(self, state, outputs):
        step = outputs.get("ssl")
        if step is None or step.mix is None:
            return None
        mix = step.mix
        rows = {"lam_keys": mix.lam_keys, "labels": step.labels, "partner": mix.partner}
        if step.kind == "dino":
            p = teacher_probs(step.keys, step.center, step.teacher_temp)
            pm = teacher_probs(step.keys_mix, step.center, step.teacher_temp)
        n = len(step.q_mix[0])
        ms = mm = 0
        for s in range(n):
            student = (step.q_mix[0][s], step.q_mix[1][s])
            if step.kind == "moco":
                terms = sdmp_moco_terms(student, step.keys, step.keys_mix, mix.lam, step.temperature, **rows)
            else:
                terms = sdmp_dino_loss(student, p, pm, mix.lam, step.temperature, **rows)
            ms, mm = ms + terms["ms"], mm + terms["mm"]
        o = self.options
        return {"sdmp_ms": o.weight_ms * ms / n, "sdmp_mm": o.weight_mm * mm / n}

    @hookimpl
    def on_epoch_start(self, state):
        self.lam_sum, self.count, self.op_counts = 0.0, 0, [0, 0, 0]

    @hookimpl
    def on_epoch_end(self, state):
        if self.count:
            state.epoch_metrics["sdmp/lam_eff_mean"] = self.lam_sum / self.count
            for name, code in OPERATORS.items():
                state.epoch_metrics[f"sdmp/{name}_batches"] = self.op_counts[code]


@hookimpl
def register_methods(register):
    register("sdmp", SDMP)
