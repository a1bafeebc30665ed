"""``dino``: DINO self-distillation pretraining (a base plugin: ``roles = {"ssl-base"}``).

METHODS.md section 4 ("DINO form") gives the defaults used here.

* Two global views per image from the on-device pipeline of :mod:`batchkin.plugins.ssl`
  (multi-crop local views are not implemented). Labels are never read in training.
* Student: the registered encoder + :class:`~batchkin.plugins.ssl.DINOHead` (MLP to a
  bottleneck, L2 norm, weight-normalised last layer with ``g = 1`` when
  ``[dino] norm_last_layer``). Teacher: deep copies of both, no gradients, updated after
  every optimizer step by EMA with momentum rising from ``[dino] momentum`` (0.996) to 1
  on the cosine schedule of MoCo v3 (:func:`~batchkin.plugins.ssl.cosine_momentum`).
* Teacher distribution ``P = softmax((t - center) / T_t)``; the loss is
  ``-sum P(view b) log_softmax(s(view a) / T_s)``, averaged over the batch and over the
  two directions a != b (DINO's loss with two crops). ``T_s = 0.1``; ``T_t`` warms up
  linearly from 0.04 to 0.07 over the first ``warmup_fraction`` of the epochs (DINO's
  30 of 100 epochs, scaled to the run: ``round(0.3 * epochs)`` epochs, as
  ``np.linspace`` per epoch), then stays at 0.07.
* Centering: after every step ``center <- 0.9 center + 0.1 mean(teacher outputs)``
  (both views, all ranks: the teacher outputs are all-gathered). The center is a
  buffer of the model (``dino_center``), so it is checkpointed.
* Evaluation: kNN class scores as ``logits`` (as ``moco``); linear probe with
  :func:`batchkin.plugins.ssl.linear_probe`.
* With ``sdmp``: the SDMP DINO form (:func:`batchkin.plugins.sdmp.sdmp_dino_loss`); the
  teacher also sees the mixed views and the same center is used for them.

Functional twins: :func:`teacher_temperature`, :func:`teacher_probs`, :func:`dino_loss`,
:func:`update_center`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchkin.hookspecs import hookimpl
from batchkin.plugin import Method
from batchkin.plugins.ssl import (
    DINOHead,
    KNNEvaluator,
    SSLNet,
    ViewOptions,
    check_last_batch,
    check_ssl_run,
    cosine_momentum,
    ema_update_,
    fp32,
    ssl_train_forward,
)

# ------------------------------------------------------------------------------ functional twins


def teacher_temperature(epoch: int, epochs: int, start: float = 0.04, end: float = 0.07,
                        warmup_fraction: float = 0.3) -> float:
    """The teacher temperature of epoch ``epoch`` (from 1): ``linspace(start, end, W)[epoch - 1]``
    for the first ``W = round(warmup_fraction * epochs)`` epochs, then ``end``."""
    warm = int(round(warmup_fraction * epochs))
    e = epoch - 1
    if e >= warm:
        return end
    if warm == 1:
        return start
    return start + (end - start) * e / (warm - 1)


def teacher_probs(teacher_out: torch.Tensor, center: torch.Tensor, temperature: float) -> torch.Tensor:
    """``softmax((t - center) / T_t)`` over the last dimension, float32, no gradient."""
    with fp32(teacher_out.device.type):
        return F.softmax((teacher_out.detach().float() - center.float()) / temperature, dim=-1)


def dino_loss(student: list[torch.Tensor], probs: list[torch.Tensor], student_temp: float = 0.1) -> torch.Tensor:
    """DINO's loss over views: mean over pairs ``a != b`` of
    ``mean_i -sum_j probs[b]_ij log_softmax(student[a]_i / T_s)_j``."""
    total, n = 0, 0
    with fp32(student[0].device.type):
        for b, p in enumerate(probs):
            for a, s in enumerate(student):
                if a == b:
                    continue
                total = total + (-(p.float() * F.log_softmax(s.float() / student_temp, dim=-1)).sum(-1)).mean()
                n += 1
    return total / n


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9) -> torch.Tensor:
    """In place ``center <- m center + (1 - m) mean(teacher_out)`` (mean over every row of
    every view); returns ``center``."""
    batch = teacher_out.float().reshape(-1, teacher_out.shape[-1]).mean(0, keepdim=True)
    center.mul_(momentum).add_(batch.to(center.dtype), alpha=1 - momentum)
    return center


# ------------------------------------------------------------------------------ the method


class DINO(Method):
    """DINO as a plugin (see the module docstring)."""

    roles = frozenset({"ssl-base"})

    @dataclass
    class Options:
        out_dim: int = field(default=1024, metadata={"ge": 2, "help": "head output width (prototypes)"})
        hidden_dim: int = field(default=256, metadata={"ge": 1, "help": "head MLP hidden width"})
        bottleneck_dim: int = field(default=64, metadata={"ge": 1, "help": "head bottleneck width"})
        head_layers: int = field(default=3, metadata={"ge": 1, "help": "head MLP layers"})
        norm_last_layer: bool = field(default=True, metadata={"help": "weight-normalised last layer with g fixed to 1"})
        student_temp: float = field(default=0.1, metadata={"gt": 0.0, "help": "student temperature"})
        teacher_temp: float = field(default=0.07, metadata={"gt": 0.0, "help": "teacher temperature after warm-up"})
        warmup_teacher_temp: float = field(default=0.04, metadata={"gt": 0.0, "help": "teacher temperature at the start"})
        warmup_fraction: float = field(default=0.3, metadata={"ge": 0.0, "le": 1.0, "help": "fraction of the epochs of the teacher warm-up"})
        center_momentum: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0, "help": "centering momentum"})
        momentum: float = field(default=0.996, metadata={"ge": 0.0, "le": 1.0, "help": "initial teacher momentum (cosine to 1)"})
        knn_k: int = field(default=20, metadata={"ge": 1, "help": "kNN evaluation: neighbours"})
        knn_temperature: float = field(default=0.07, metadata={"gt": 0.0, "help": "kNN evaluation: weight temperature"})
        views: ViewOptions = field(default_factory=ViewOptions, metadata={"help": "the view pipeline"})

    def __init__(self, options=None):
        super().__init__(options)
        self.knn = KNNEvaluator(self.options.knn_k, self.options.knn_temperature)
        self.momentum = self.options.momentum
        self.temp = self.options.warmup_teacher_temp

    @hookimpl
    def configure(self, state):
        check_ssl_run(state, "dino")

    @hookimpl
    def wrap_model(self, state):
        check_last_batch(state, "dino")
        o = self.options
        enc = state.model
        head = DINOHead(enc.feature_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers, o.norm_last_layer)
        net = SSLNet(enc, head)
        net.register_buffer("dino_center", torch.zeros(1, o.out_dim))
        state.model = net

    @hookimpl
    def on_epoch_start(self, state):
        o = self.options
        self.temp = teacher_temperature(state.epoch, state.epochs, o.warmup_teacher_temp, o.teacher_temp, o.warmup_fraction)
        state.epoch_metrics["dino/teacher_temp"] = self.temp

    @hookimpl
    def forward(self, state):
        if not state.training:
            return self.knn.forward(state)
        center = state.unwrapped_model.dino_center.clone()
        return ssl_train_forward(state, "dino_views", self.options.views, "dino", self.options.student_temp,
                                 teacher_temp=self.temp, center=center)

    @hookimpl
    def loss_terms(self, state, outputs):
        step = outputs["ssl"]
        p = teacher_probs(step.keys[:, step.labels], step.center, step.teacher_temp)
        n = len(step.q[0])
        loss = sum(dino_loss([q[s] for q in step.q], list(p), step.temperature) for s in range(n)) / n
        return {"dino": loss}

    @hookimpl
    def after_step(self, state):
        net = state.unwrapped_model
        m = cosine_momentum(state.step, state.epochs * state.steps_per_epoch, self.options.momentum)
        target, online = net.momentum_pairs()
        ema_update_(target, online, m)
        self.momentum = m
        step = state.outputs.get("ssl") if isinstance(state.outputs, dict) else None
        if step is not None:
            update_center(net.dino_center, step.keys, self.options.center_momentum)

    @hookimpl
    def on_epoch_end(self, state):
        state.epoch_metrics["dino/momentum"] = self.momentum


@hookimpl
def register_methods(register):
    register("dino", DINO)
