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
``lam`` is the query view's ``lam_eff``, ``lam_i'`` the key view's ``lam_eff`` of the partner.

**Losses, DINO form** (:func:`sdmp_dino_loss`, our design, METHODS.md): the student sees
the mixed view a; its target is a mixture of the teacher's (centred, sharpened)
distributions on view b: clean view with weights ``(lam, 1 - lam)`` for source-mix,
mixed view with ``(1/(1+c), c/(1+c))`` for mix-mix; cross-entropy with the student's
``log_softmax(s / T_s)``, averaged over the two directions as DINO's own loss. With DINO's
multi-crop (``[dino] n_local_crops > 0``) SDMP mixes only the two global views: the local
crops are never mixed and take part only in DINO's own loss, so the SDMP terms are the
same pairs of global views with or without local crops.

**The contract with the base** (see :mod:`batchkin.plugins.ssl`): the base's training
forward calls :meth:`SDMP.mix_views` on its uint8 views and stores an ``SSLStep`` with
the mixed branch in ``outputs["ssl"]``; :meth:`SDMP.loss_terms` reads only that.
BatchFormer composes: every feature stream of the mixed views gets its own queries,
and the SDMP terms are averaged over the streams.

Functional twins: :func:`sdmp_mix`, :func:`mixture_nll`, :func:`sdmp_ms_loss`,
:func:`sdmp_mm_weights`, :func:`sdmp_mm_loss`, :func:`sdmp_moco_loss`,
:func:`sdmp_dino_loss`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from batchkin.errors import ConfigError
from batchkin.hookspecs import hookimpl
from batchkin.kernels.batch_mix import OPERATORS, MixParams, batch_mix, sample_mix_params
from batchkin.plugin import Method
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
    ``c = 0.9``, weights ``0.526, 0.474``)."""
    lam, lam_partner = lam.double(), lam_partner.double()
    c = torch.minimum(lam, 1 - lam_partner) + torch.minimum(1 - lam, lam_partner)
    return c, 1 / (1 + c), c / (1 + c)


def sdmp_mm_loss(q_mix: torch.Tensor, keys_mix: torch.Tensor, lam: torch.Tensor, lam_partner: torch.Tensor,
                 temperature: float, *, labels: torch.Tensor | None = None,
                 partner: torch.Tensor | None = None) -> torch.Tensor:
    """Mix-mix loss ``2T mean_i -log(p_i(i)/(1+c_i) + c_i p_i(i')/(1+c_i))`` of mixed queries
    against mixed keys (``lam``: the queries' ``lam_eff``; ``lam_partner``: the key view's
    ``lam_eff`` of each partner)."""
    labels, partner = _rows(q_mix, labels, partner)
    _, w_self, w_partner = sdmp_mm_weights(lam, lam_partner)
    nll = mixture_nll(_logits(q_mix, keys_mix, temperature), labels, partner, w_self, w_partner)
    return nll.mean() * (2 * temperature)


def sdmp_moco_loss(q: torch.Tensor, k: torch.Tensor, q_mix: torch.Tensor, k_mix: torch.Tensor, lam: torch.Tensor,
                   temperature: float = 0.2, *, weights=(0.5, 0.5)) -> dict:
    """SDMP's MoCo loss on one process: ``q``, ``k``, ``q_mix``, ``k_mix`` ``[2, B, d]`` (online
    and momentum outputs of the clean and mixed views), ``lam`` ``[2, B]`` (``lam_eff`` per
    view). Returns ``{"src", "ms", "mm", "loss"}`` with ``loss = src + 0.5 ms + 0.5 mm``;
    each term sums the two directions (queries of view a, keys of view b != a)."""
    from batchkin.plugins.moco import moco_loss

    B = q.shape[1]
    flip = torch.arange(B - 1, -1, -1, device=q.device)
    src = moco_loss(q[0], q[1], k[0], k[1], temperature)
    ms = mm = 0
    for a, b in ((0, 1), (1, 0)):
        ms = ms + sdmp_ms_loss(q_mix[a], k[b].detach(), lam[a], temperature)
        mm = mm + sdmp_mm_loss(q_mix[a], k_mix[b].detach(), lam[a], lam[b][flip], temperature)
    return {"src": src, "ms": ms, "mm": mm, "loss": src + weights[0] * ms + weights[1] * mm}


def soft_cross_entropy(student: torch.Tensor, target: torch.Tensor, student_temp: float) -> torch.Tensor:
    """``mean_i -sum_j target_ij log_softmax(student_i / T_s)_j`` in float32."""
    with fp32(student.device.type):
        return -(target.float() * F.log_softmax(student.float() / student_temp, dim=1)).sum(1).mean()


def sdmp_dino_loss(student_mix: torch.Tensor, teacher_probs: torch.Tensor, teacher_probs_mix: torch.Tensor,
                   lam: torch.Tensor, student_temp: float = 0.1, *, labels: torch.Tensor | None = None,
                   partner: torch.Tensor | None = None, lam_partner: torch.Tensor | None = None) -> dict:
    """SDMP's DINO form. ``student_mix`` ``[2, B, K]``: student outputs of the mixed views;
    ``teacher_probs`` / ``teacher_probs_mix`` ``[2, N, K]``: the teacher's centred and
    sharpened distributions of the clean / mixed views (N rows: gathered over ranks when the
    flip is global, this rank's B rows when it is local);
    ``lam`` ``[2, B]``. Source-mix target ``lam P(b, i) + (1 - lam) P(b, i')``; mix-mix
    target ``P_mix(b, i)/(1+c) + c P_mix(b, i')/(1+c)``; averaged over the directions a != b.
    Returns ``{"ms", "mm"}``."""
    labels, partner = _rows(student_mix[0], labels, partner)
    if lam_partner is None:
        lam_partner = lam[:, partner]
    ms = mm = 0
    for a, b in ((0, 1), (1, 0)):
        la = lam[a].float().view(-1, 1)
        p = teacher_probs[b].float()
        target = la * p[labels] + (1 - la) * p[partner]
        ms = ms + soft_cross_entropy(student_mix[a], target, student_temp)
        _, w_self, w_partner = sdmp_mm_weights(lam[a], lam_partner[b])
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

    def mix_views(self, state, views: torch.Tensor) -> MixBatch:
        """Mix the base's uint8 global views ``[V, B, C, H, W]`` (the contract in
        :mod:`batchkin.plugins.ssl`; DINO's local crops are not passed here)."""
        V, B, C, H, W = views.shape
        rank, world = state.rank, state.world_size
        gen = state.generator("sdmp", "cpu")
        params = sample_mix_params(B * world, H, W, generator=gen, ops=tuple(self.options.ops), num_views=V)
        ar = torch.arange(B, device=views.device)
        if self.options.flip == "global" and world > 1:
            everything = gather_rows(views, world, dim=1)
            mixed, lam_all, _ = sdmp_mix(everything, gen, params=params)
            mine = slice(rank * B, (rank + 1) * B)
            mixed, lam = mixed[:, mine].contiguous(), lam_all[:, mine]
            partner = world * B - 1 - (rank * B + ar)
            lam_partner = lam_all[:, partner]
        else:
            mixed, lam, _ = sdmp_mix(views, gen, params=slice_params(params, rank * B, (rank + 1) * B))
            partner = rank * B + (B - 1 - ar)
            lam_partner = lam[:, B - 1 - ar]
        op = int(params.op[0])
        self.lam_sum += float(lam.double().mean())
        self.count += 1
        self.op_counts[op] += 1
        return MixBatch(mixed=mixed, lam=lam, partner=partner, lam_partner=lam_partner, op=op)

    @hookimpl
    def loss_terms(self, state, outputs):
        step = outputs.get("ssl")
        if step is None or step.mix is None:
            return None
        mix = step.mix
        n = len(step.q_mix[0])
        ms = mm = 0
        if step.kind == "moco":
            T = step.temperature
            for s in range(n):
                for a, b in ((0, 1), (1, 0)):
                    q = step.q_mix[a][s]
                    ms = ms + sdmp_ms_loss(q, step.keys[b], mix.lam[a], T, labels=step.labels, partner=mix.partner)
                    mm = mm + sdmp_mm_loss(q, step.keys_mix[b], mix.lam[a], mix.lam_partner[b], T,
                                           labels=step.labels, partner=mix.partner)
        else:
            from batchkin.plugins.dino import teacher_probs

            p = teacher_probs(step.keys, step.center, step.teacher_temp)
            pm = teacher_probs(step.keys_mix, step.center, step.teacher_temp)
            for s in range(n):
                student = torch.stack([step.q_mix[0][s], step.q_mix[1][s]])
                terms = sdmp_dino_loss(student, p, pm, mix.lam, step.temperature, labels=step.labels,
                                       partner=mix.partner, lam_partner=mix.lam_partner)
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
