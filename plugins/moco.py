"""``moco``: MoCo v3 self-supervised pretraining (a base plugin: ``roles = {"ssl-base"}``).

METHODS.md section 4 ("Base method: MoCo v3") is the specification.

* Two views per image from the on-device pipeline of :mod:`batchkin.plugins.ssl`
  (random resized crop, flip, colour jitter and grayscale on colour data, blur,
  solarize; BYOL's asymmetric pair), built from the raw uint8 batch (the bases set
  ``raw_batch``: the engine does not augment or normalise it). Labels are never read in
  training.
* The registered model is the online encoder; ``wrap_model`` wraps it in
  :class:`~batchkin.plugins.ssl.SSLNet` with a projector (``[moco] proj_layers``-layer MLP
  with BN, last BN without affine), a 2-layer predictor and the momentum encoder +
  projector (deep copies, no gradients). All of them are part of the model, so they
  are checkpointed and resume exactly.
* Loss: ``q``, ``k`` L2-normalised, ``CE(q kᵀ / T, labels) * 2T`` (T = ``[moco]
  temperature``, 0.2), summed over the two directions (view 1's queries against view
  2's keys and back), as MoCo v3. The keys are all-gathered across ranks (no
  gradient) and the labels are offset by ``rank * B``. With BatchFormer enabled, the
  projector and predictor run on every feature stream that ``transform_features``
  produced and the loss is averaged over the streams; the keys stay the momentum
  branch's.
* Momentum: after every optimizer step ``theta_k <- m theta_k + (1 - m) theta_q`` with
  ``m = 1 - (1 - m0)(1 + cos(pi s / S)) / 2`` (``s = state.step`` optimizer steps done,
  ``S = epochs * steps_per_epoch``; ``m0 = [moco] momentum``, 0.99); logged per epoch as
  ``moco/momentum``.
* Evaluation: the forward returns kNN class scores as ``logits`` (k = 20, weights
  ``exp(sim / 0.07)``, cosine similarity to the training split's features), so the
  engine's val/test ``top1`` of a MoCo run is kNN accuracy. The linear probe is
  :func:`batchkin.probe.linear_probe` (``batchkin probe RUN_DIR``).
* With a mixing method enabled (``sdmp``), the forward fires ``transform_views`` on the
  uint8 views, runs the mixed views it returns through both branches and stores their
  outputs for the mixing method's loss terms (:mod:`batchkin.plugins.ssl.base`).

Functional twins: :func:`moco_infonce`, :func:`moco_loss`; and from
:mod:`batchkin.plugins.ssl`: :func:`~batchkin.plugins.ssl.cosine_momentum`,
:func:`~batchkin.plugins.ssl.ema_update_`, :func:`~batchkin.plugins.ssl.make_views`,
:func:`~batchkin.plugins.ssl.knn_scores`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchkin.hookspecs import hookimpl
from batchkin.plugins.ssl import SSLBase, SSLNet, SSLOptions, fp32, mlp, ssl_train_forward

# ------------------------------------------------------------------------------ functional twins


def moco_infonce(q: torch.Tensor, k: torch.Tensor, temperature: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo v3's contrastive loss ``CE(q̂ k̂ᵀ / T, labels) * 2T`` (``q̂``, ``k̂`` L2-normalised),
    in float32. ``k`` may hold more rows than ``q`` (keys gathered from every rank);
    ``labels`` (default ``arange(len(q))``) is the row of each query's positive key."""
    with fp32(q.device.type):
        qn = F.normalize(q.float(), dim=1)
        kn = F.normalize(k.float(), dim=1)
        logits = qn @ kn.T / temperature
        if labels is None:
            labels = torch.arange(q.shape[0], device=q.device)
        return F.cross_entropy(logits, labels) * (2 * temperature)


def moco_loss(q1, q2, k1, k2, temperature: float, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The symmetric MoCo v3 loss ``L(q1, k2) + L(q2, k1)`` (keys without gradient)."""
    return moco_infonce(q1, k2.detach(), temperature, labels) + moco_infonce(q2, k1.detach(), temperature, labels)


# ------------------------------------------------------------------------------ the method


class MoCo(SSLBase):
    """MoCo v3 as a plugin (see the module docstring); the run checks, kNN evaluation and
    the momentum update are :class:`~batchkin.plugins.ssl.SSLBase`'s."""

    name = "moco"

    @dataclass
    class Options(SSLOptions):
        """``[moco]``; ``momentum``, ``knn_k``, ``knn_temperature`` and ``[moco.views]`` are
        :class:`~batchkin.plugins.ssl.SSLOptions`'."""

        temperature: float = field(default=0.2, metadata={"gt": 0.0, "help": "InfoNCE temperature T"})
        proj_layers: int = field(default=3, metadata={"ge": 1, "help": "projector layers"})
        proj_hidden: int = field(default=256, metadata={"ge": 1, "help": "projector hidden width"})
        proj_dim: int = field(default=64, metadata={"ge": 1, "help": "projector output width"})
        pred_hidden: int = field(default=256, metadata={"ge": 1, "help": "predictor hidden width"})

    def build_model(self, state, encoder):
        o = self.options
        projector = mlp(o.proj_layers, encoder.feature_dim, o.proj_hidden, o.proj_dim, last_bn=True)
        predictor = mlp(2, o.proj_dim, o.pred_hidden, o.proj_dim, last_bn=False)
        return SSLNet(encoder, projector, predictor)

    def train_forward(self, state):
        return ssl_train_forward(state, "moco_views", self.options.views, "moco", self.options.temperature)

    @hookimpl
    def loss_terms(self, state, outputs):
        step = outputs["ssl"]
        k1, k2 = step.keys[0], step.keys[1]
        n = len(step.q[0])
        loss = sum(moco_loss(step.q[0][s], step.q[1][s], k1, k2, step.temperature, step.labels) for s in range(n)) / n
        return {"moco": loss}


@hookimpl
def register_methods(register):
    register("moco", MoCo)
