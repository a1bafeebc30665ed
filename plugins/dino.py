"""``dino``: DINO self-distillation pretraining (a base plugin: ``roles = {"ssl-base"}``).

METHODS.md section 4 ("DINO form") gives the defaults used here.

* Views from the on-device pipeline of :mod:`batchkin.plugins.ssl` (built from the raw
  uint8 batch): two global views per image (:func:`~batchkin.plugins.ssl.make_views`,
  ``[dino.views]``) and, with
  ``[dino] n_local_crops > 0``, DINO's multi-crop local views
  (:func:`~batchkin.plugins.ssl.make_local_views`, drawn after the global views from the
  same run generator ``"dino_views"``, so the global views do not depend on them).
  Labels are never read in training.
* Student: the registered encoder + :class:`~batchkin.plugins.ssl.DINOHead` (MLP to a
  bottleneck, L2 norm, weight-normalised last layer with ``g = 1`` when
  ``[dino] norm_last_layer``). Teacher: deep copies of both, no gradients, updated after
  every optimizer step by EMA with momentum rising from ``[dino] momentum`` (0.996) to 1
  on the cosine schedule of MoCo v3 (:func:`~batchkin.plugins.ssl.cosine_momentum`).
* Teacher distribution ``P = softmax((t - center) / T_t)``. The teacher sees the global
  views only, the student every crop; the loss is ``-sum P(view t) log_softmax(s(view
  v) / T_s)``, averaged over the batch and over every pair (teacher global view ``t``,
  student view ``v``) with ``v != t`` (DINO's loss: ``2 (2 + n_local_crops) - 2`` pairs;
  the two directions with two crops). ``T_s = 0.1``; ``T_t`` warms up linearly from 0.04
  to 0.07 over the first ``warmup_fraction`` of the epochs (DINO's 30 of 100 epochs,
  scaled to the run: ``round(0.3 * epochs)`` epochs, as ``np.linspace`` per epoch), then
  stays at 0.07.
* Centering: after every step ``center <- 0.9 center + 0.1 mean(teacher outputs)``
  (the teacher's outputs only: both global views, every rank's rows). Under DDP each rank
  sums its own rows and one all-reduce of that ``[K]`` sum makes the global mean (divided
  by ``world size x rows``: every rank has the same batch, ``data.drop_last`` being
  required with several processes); the teacher outputs themselves are not gathered (the
  loss reads only this rank's rows), except with SDMP's ``flip = "global"``, whose
  partners live on other ranks. The center is a buffer of the model (``dino_center``), so
  it is checkpointed.
* Evaluation: kNN class scores as ``logits`` (as ``moco``) and the linear probe
  (:func:`batchkin.probe.linear_probe`, ``batchkin probe``) read the teacher's encoder, as
  DINO does (``[dino] eval_encoder = "student"`` reads the student's).
* Optimiser details of DINO, in ``before_optimizer_step``: the head's last layer gets no
  update during the first ``freeze_last_layer`` epochs (1; its gradient is dropped, so
  the optimizer keeps no state for it and applies no weight decay), and each
  parameter's gradient is clipped to norm ``clip_grad`` (3; :func:`clip_gradients_`).
  DINO's other two: ``optim.no_decay_norm_bias = true`` (no weight decay on biases and
  norms) and ``schedule.warmup_start = 0`` (the warm-up starts at lr 0).
* Small encoders: DINO's head init (``head_init = "trunc_normal"``, std 0.02) is sized
  for ViT-S features; over a small encoder's pooled features the bottleneck has norm
  ~0.02 and every run collapses to uniform outputs. ``head_init = "fan_in"`` (He init)
  and ``head_bn = true`` (BatchNorm after each hidden layer: DINO's
  ``use_bn_in_head``) are the scale-aware options; configs/dino_digits.toml is a
  measured small-scale recipe.
* Collapse is logged every epoch: ``dino/teacher_entropy`` (the mean entropy of the
  teacher's distributions, ``log out_dim`` when they are uniform) and
  ``dino/teacher_batch_entropy`` (the entropy of their mean, near 0 when every image
  gets the same prototype) (:func:`teacher_entropy`).
* With ``sdmp`` (through the ``transform_views`` hook): the SDMP DINO form
  (:func:`batchkin.plugins.sdmp.sdmp_dino_loss`); only
  the two global views are mixed, the teacher also sees the mixed global views and the
  same center is used for them; local crops add only to DINO's own loss.

Multi-crop options of ``[dino]`` (the global views keep ``[dino.views] crop_scale``):

* ``n_local_crops`` (default 0: two global views only, exactly the plain two-crop
  DINO): local crops per image; DINO's usual setting is 2 global + 6 to 10 local crops.
* ``local_crop_size``: ``s`` or ``[h, w]`` pixels, at most the image size (default:
  96/224 of each image side, DINO's 96-pixel crops of 224-pixel images).
* ``local_crop_scale``: ``[low, high]`` range of the crop's area fraction inside
  ``(0, 1]`` (default ``[0.05, 0.4]``, DINO's). Local crops use ``[dino.views]``'
  ``crop_ratio``, flip, colour jitter, grayscale and blur sigma, blur with probability
  0.5 and no solarize (DINO's local transform).

The model must encode the smaller local crops: the globally pooled models (``resnet*``,
``tiny``) do; ``vit`` cannot (learned position embeddings for its fixed token grid),
which is reported as a ConfigError when the model is built.

Functional twins: :func:`teacher_temperature`, :func:`teacher_probs`, :func:`dino_loss`,
:func:`update_center`, :func:`teacher_entropy`, :func:`clip_gradients_`,
:func:`local_crop_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from batchkin.errors import ConfigError
from batchkin.hookspecs import hookimpl
from batchkin.plugins.ssl import (
    DINOHead,
    LocalCrops,
    SSLBase,
    SSLNet,
    SSLOptions,
    encoder_input_error,
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
    ``mean_i -sum_j probs[b]_ij log_softmax(student[a]_i / T_s)_j``.

    ``probs[b]``: the teacher's distributions of global view ``b``; ``student[a]``: the
    student's outputs of every view, the teacher's views first (``student[b]`` is the
    same view as ``probs[b]``), then the local crops; ``len(probs) * (len(student) - 1)``
    pairs."""
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
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float = 0.9, *,
                  world_size: int = 1, group=None) -> torch.Tensor:
    """In place ``center <- m center + (1 - m) mean(teacher_out)`` (mean over every row of
    every view); returns ``center``.

    With ``world_size > 1``, ``teacher_out`` holds this rank's rows only and the mean is
    over every rank's: the float32 row sum ``[K]`` is all-reduced (``group``; one
    collective of ``4 K`` bytes) and divided by ``world_size`` times the local row count,
    which assumes the same number of rows on every rank (the engine's sharding with
    ``data.drop_last``). Every rank then holds the same center."""
    rows = teacher_out.float().reshape(-1, teacher_out.shape[-1])
    if world_size <= 1:
        batch = rows.mean(0, keepdim=True)
    else:
        import torch.distributed as dist

        batch = rows.sum(0, keepdim=True)
        dist.all_reduce(batch, op=dist.ReduceOp.SUM, group=group)
        batch = batch / (rows.shape[0] * world_size)
    center.mul_(momentum).add_(batch.to(center.dtype), alpha=1 - momentum)
    return center


def teacher_entropy(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse diagnostics of the teacher's distributions ``probs`` ``[..., K]`` (every row of
    every view): ``(mean_i H(P_i), H(mean_i P_i))`` in nats, float32, no gradient.

    Both are ``log K`` when every output is uniform (DINO's uniform collapse), the first
    near 0 and the second near 0 when every image gets the same one-hot output (the
    dominant-dimension collapse); a teacher that learns has a low per-sample entropy
    and a high entropy of the mean (its prototypes are used evenly)."""
    with torch.no_grad(), fp32(probs.device.type):
        rows = probs.detach().float().reshape(-1, probs.shape[-1])

        def entropy(p):
            return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)

        return entropy(rows).mean(), entropy(rows.mean(0))


@torch.no_grad()
def clip_gradients_(params, max_norm: float) -> list[torch.Tensor]:
    """DINO's ``clip_gradients``: in place, scale each parameter's gradient by
    ``min(1, max_norm / (||grad|| + 1e-6))`` (each parameter clipped to its own norm,
    not the global norm of ``torch.nn.utils.clip_grad_norm_``). Parameters without a
    gradient are skipped. Returns the gradients' norms before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return []
    norms = torch._foreach_norm(grads)
    torch._foreach_mul_(grads, [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms])
    return list(norms)


# ------------------------------------------------------------------------------ the method


def local_keys(step) -> torch.Tensor:
    """This rank's teacher outputs ``[V, B, K]`` of an :class:`~batchkin.plugins.ssl.SSLStep`:
    ``step.keys`` itself when they are local, their rows ``step.labels`` when gathered
    (SDMP's global flip)."""
    if step.keys.shape[1] == step.labels.shape[0]:
        return step.keys
    return step.keys[:, step.labels]


def local_crop_size(size, image_size: tuple[int, int]) -> tuple[int, int]:
    """``[dino] local_crop_size`` as ``(h, w)``: ``s`` or ``[s]`` is square, ``[h, w]`` as given;
    unset, DINO's ratio of 96 to 224 of each image side (at least 1 pixel)."""
    if size is None:
        return tuple(max(1, round(side * 96 / 224)) for side in image_size)
    if isinstance(size, int):
        return size, size
    return (size[0], size[0]) if len(size) == 1 else (size[0], size[1])


class DINO(SSLBase):
    """DINO as a plugin (see the module docstring); the run checks, kNN evaluation and the
    teacher's EMA are :class:`~batchkin.plugins.ssl.SSLBase`'s."""

    name = "dino"

    @dataclass
    class Options(SSLOptions):
        """``[dino]``; ``momentum``, ``knn_k``, ``knn_temperature`` and ``[dino.views]`` are
        :class:`~batchkin.plugins.ssl.SSLOptions`' (``momentum`` with DINO's default)."""

        momentum: float = field(default=0.996, metadata={"ge": 0.0, "le": 1.0, "help": "initial teacher momentum (cosine to 1)"})
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
        n_local_crops: int = field(
            default=0, metadata={"ge": 0, "help": "multi-crop: local crops per image, seen by the student only"})
        local_crop_size: int | list[int] | None = field(
            default=None,
            metadata={"ge": 1, "help": "local crops' size in pixels, s or [h, w] (default: 96/224 of the image side)"})
        local_crop_scale: list[float] = field(
            default_factory=lambda: [0.05, 0.4],
            metadata={"gt": 0.0, "le": 1.0, "help": "local crops: range of the crop's area fraction"})
        head_init: Literal["trunc_normal", "fan_in"] = field(
            default="trunc_normal",
            metadata={"help": "head MLP init: DINO's N(0, 0.02^2), or fan_in (He) for a bottleneck of norm O(1) on small encoders"})
        head_bn: bool = field(
            default=False, metadata={"help": "BatchNorm after every hidden layer of the head (DINO's use_bn_in_head)"})
        freeze_last_layer: int = field(
            default=1, metadata={"ge": 0, "help": "epochs during which the head's last layer is not updated (DINO: 1)"})
        clip_grad: float = field(
            default=3.0, metadata={"ge": 0.0, "help": "clip each parameter's gradient norm to this value (DINO: 3; 0 = off)"})
        eval_encoder: Literal["teacher", "student"] = field(
            default="teacher", metadata={"help": "the encoder kNN evaluation and the linear probe read (DINO: teacher)"})

        def validate(self):
            if len(self.local_crop_scale) != 2 or self.local_crop_scale[0] > self.local_crop_scale[1]:
                raise ConfigError(f"local_crop_scale must be [low, high] with 0 < low <= high <= 1; "
                                  f"got {self.local_crop_scale}")
            if isinstance(self.local_crop_size, list) and len(self.local_crop_size) not in (1, 2):
                raise ConfigError(f"local_crop_size must be one size or [h, w]; got {self.local_crop_size}")

    def __init__(self, options=None):
        super().__init__(options)
        self.temp = self.options.warmup_teacher_temp
        self.local: LocalCrops | None = None
        self.entropy = torch.zeros(3)

    def build_model(self, state, encoder):
        o = self.options
        if o.n_local_crops > 0:
            self.local = self.local_crops(state, encoder)
        head = DINOHead(encoder.feature_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers, o.norm_last_layer,
                        init=o.head_init, use_bn=o.head_bn)
        net = SSLNet(encoder, head)
        net.eval_momentum = o.eval_encoder == "teacher"
        net.register_buffer("dino_center", torch.zeros(1, o.out_dim))
        return net

    def local_crops(self, state, encoder) -> LocalCrops:
        """The run's :class:`~batchkin.plugins.ssl.LocalCrops`, once the image size is known;
        a size larger than the images, or a model that cannot encode it, is a ConfigError."""
        o = self.options
        C, H, W = state.splits.image_shape
        h, w = local_crop_size(o.local_crop_size, (H, W))
        if h > H or w > W:
            raise ConfigError(f"dino.local_crop_size ({h}x{w}) is larger than the images ({H}x{W}); "
                              "local crops are small crops of the image")
        reason = encoder_input_error(encoder, C, (h, w))
        if reason is not None:
            raise ConfigError(f"dino.n_local_crops = {o.n_local_crops} needs a model that encodes {h}x{w} local crops "
                              f"as well as the {H}x{W} global views, and model {state.config.model['name']!r} cannot: "
                              f"{reason}; use a globally pooled convolutional model (resnet*, tiny) or "
                              "dino.n_local_crops = 0")
        return LocalCrops(n=o.n_local_crops, size=(h, w), scale=tuple(o.local_crop_scale))

    @hookimpl
    def on_epoch_start(self, state):
        o = self.options
        self.temp = teacher_temperature(state.epoch, state.epochs, o.warmup_teacher_temp, o.teacher_temp, o.warmup_fraction)
        state.epoch_metrics["dino/teacher_temp"] = self.temp
        self.entropy = torch.zeros(3)  # sums over the epoch's steps: H(P_i) mean, H(mean P), steps

    @hookimpl
    def on_epoch_end(self, state):
        super().on_epoch_end(state)
        total = self.entropy.tolist()
        if total[2]:
            state.epoch_metrics["dino/teacher_entropy"] = total[0] / total[2]
            state.epoch_metrics["dino/teacher_batch_entropy"] = total[1] / total[2]

    def train_forward(self, state):
        center = state.unwrapped_model.dino_center.clone()
        # the loss reads this rank's teacher rows and the centre all-reduces their sum: no key gather
        return ssl_train_forward(state, "dino_views", self.options.views, "dino", self.options.student_temp,
                                 local=self.local, gather_keys=False, teacher_temp=self.temp, center=center)

    @hookimpl
    def loss_terms(self, state, outputs):
        step = outputs["ssl"]
        p = teacher_probs(local_keys(step), step.center, step.teacher_temp)
        per_sample, of_mean = teacher_entropy(p)
        one = torch.ones((), device=p.device)
        self.entropy = self.entropy.to(p.device) + torch.stack([per_sample, of_mean, one])
        n = len(step.q[0])
        loss = sum(dino_loss([q[s] for q in step.q], list(p), step.temperature) for s in range(n)) / n
        return {"dino": loss}

    @hookimpl
    def before_optimizer_step(self, state):
        """DINO's optimiser details: no update of the head's last layer during the first
        ``freeze_last_layer`` epochs (its gradients are dropped, so the optimizer skips it:
        no momentum, no weight decay), then each parameter's gradient clipped to norm
        ``clip_grad``."""
        o = self.options
        if state.epoch <= o.freeze_last_layer:
            head = state.unwrapped_model.head
            head.last_v.grad = None
            head.last_g.grad = None
        if o.clip_grad > 0:
            clip_gradients_([p for g in state.optimizer.param_groups for p in g["params"]], o.clip_grad)

    @hookimpl
    def after_step(self, state):
        super().after_step(state)
        step = state.outputs.get("ssl") if isinstance(state.outputs, dict) else None
        if step is not None:
            update_center(state.unwrapped_model.dino_center, local_keys(step), self.options.center_momentum,
                          world_size=state.world_size)


@hookimpl
def register_methods(register):
    register("dino", DINO)
