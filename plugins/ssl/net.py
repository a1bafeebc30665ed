"""The SSL network: the registered encoder wrapped with a head and a momentum branch.

* :class:`SSLNet`: the registered model is the online encoder; the wrapper adds the
  head (MoCo's projector, DINO's head), MoCo's predictor and the momentum branch (a
  deep copy of encoder + head with ``requires_grad=False``) as submodules, so they are
  checkpointed with the model. Its ``forward`` keeps the classifier protocol, and with
  ``ssl_hook=`` runs the whole training pass (every view through the online branch,
  ``transform_features`` fired per view, the head on every feature stream; the
  momentum branch without gradients, on the global views only: local crops are seen
  by the online branch alone) inside the model's call, so DistributedDataParallel sees
  every trainable parameter. ``eval_features`` are the features evaluation reads (kNN,
  linear probe): the online encoder's, or the momentum encoder's (DINO's teacher).
* Heads: :func:`mlp` (MoCo v3's projector/predictor: Linear, BN, ReLU; last BN without
  affine for the projector) and :class:`DINOHead`.
* Momentum: :func:`cosine_momentum` (``1 - (1 - m0)(1 + cos(pi t / T)) / 2``) and
  :func:`ema_update_` (``theta_k <- m theta_k + (1 - m) theta_q``).
* Helpers of the SSL losses: :func:`gather_rows` (all-gather without gradient) and
  :func:`fp32` (autocast off).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.errors import RunError
from batchkin.models import Classifier, check_classifier_protocol


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """MoCo v3's MLP: ``Linear(bias=False)`` layers; BN + ReLU after every hidden layer, and
    a BN without affine after the last one when ``last_bn`` (the projector)."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        d_out = out_dim if i == num_layers - 1 else hidden_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


HEAD_INITS = ("trunc_normal", "fan_in")


class DINOHead(nn.Module):
    """DINO's head: MLP (GELU) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer ``W = g v / ||v||`` (``g = 1`` fixed when ``norm_last_layer``).

    ``init`` sets the MLP's weights (biases start at 0): ``"trunc_normal"`` is DINO's
    ``N(0, 0.02^2)``, scaled for ViT-S features (the bottleneck before the L2
    normalisation has norm ~1.5 there, but ~0.02 over a small encoder's features, where
    the normalisation's gradient, ``1 / norm``, is ~70x larger and the bottleneck's bias
    outgrows the input-dependent part after one step); ``"fan_in"`` is He's
    ``N(0, 2 / fan_in)`` before each GELU and ``N(0, 1 / fan_in)`` for the bottleneck
    layer, which keeps the bottleneck's norm in proportion to the features' whatever the
    widths. ``use_bn`` (DINO's ``use_bn_in_head``) puts a BatchNorm after every hidden
    linear layer (Linear, BN, GELU): each hidden unit is standardised over the batch, so
    the head sees how the images differ rather than the large component every image's
    pooled features share.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 256, bottleneck_dim: int = 64,
                 num_layers: int = 3, norm_last_layer: bool = True, init: str = "trunc_normal",
                 use_bn: bool = False):
        super().__init__()
        if init not in HEAD_INITS:
            raise ValueError(f"init must be one of {', '.join(HEAD_INITS)}; got {init!r}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers += [nn.BatchNorm1d(dims[i + 1])] if use_bn else []
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        linears = [m for m in self.mlp if isinstance(m, nn.Linear)]
        for i, m in enumerate(linears):
            if init == "trunc_normal":
                nn.init.trunc_normal_(m.weight, std=0.02)
            else:
                gain = 1.0 if i == len(linears) - 1 else 2.0
                nn.init.normal_(m.weight, std=math.sqrt(gain / m.in_features))
            nn.init.zeros_(m.bias)
        self.last_v = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        nn.init.kaiming_uniform_(self.last_v, a=math.sqrt(5))
        self.last_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not norm_last_layer)

    def forward(self, x):
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, self.last_g * F.normalize(self.last_v, dim=1))


class SSLNet(Classifier):
    """The registered model (``encoder``) with an SSL ``head``, an optional ``predictor`` and
    a ``momentum`` branch (deep copies of encoder and head, no gradients).

    ``forward(x)`` / ``forward(x, return_features=True)`` keep the classifier protocol
    (``classifier`` is the encoder's, frozen: SSL never trains it). The training pass is
    ``forward(views, ssl_hook=fire, local=crops)`` with normalised views ``[V, B, C, H, W]``
    and optional normalised local crops ``[L, B, C, h, w]`` (DINO's multi-crop, any
    smaller size): each view separately (BatchNorm sees one view at a time, as MoCo v3)
    goes through the encoder, ``fire(outputs)`` (``transform_features`` with ``outputs =
    {"features": f, "streams": [f]}``), then ``predictor(head(s))`` for every stream
    ``s``; the momentum branch gives ``head_m(encoder_m(view))`` under ``no_grad`` for the
    ``V`` views only (the local crops go through the online branch only). Returns
    ``{"features": [V + L, B, D], "q": [[stream outputs] per view, views then local
    crops], "keys": [V, B, d]}``. ``eval_features`` are what evaluation reads.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, predictor: nn.Module | None = None):
        super().__init__()
        check_classifier_protocol(encoder, "the SSL bases", type(encoder).__name__)
        encoder.classifier.requires_grad_(False)
        self.encoder = encoder
        self.head = head
        self.predictor = predictor if predictor is not None else nn.Identity()
        self.momentum = nn.ModuleDict({"encoder": copy.deepcopy(encoder), "head": copy.deepcopy(head)})
        self.momentum.requires_grad_(False)
        self.feature_dim = encoder.feature_dim
        self.num_classes = getattr(encoder, "num_classes", 0)

    @property
    def classifier(self) -> nn.Module:
        return self.encoder.classifier

    eval_momentum = False  # evaluate the momentum encoder (DINO's teacher) instead of the online one

    def forward_features(self, x):
        return self.encoder.forward_features(x)

    def eval_features(self, x):
        """The features evaluation reads (kNN, linear probe): the momentum encoder's when
        :attr:`eval_momentum` (DINO evaluates its teacher), else the online encoder's."""
        return (self.momentum["encoder"] if self.eval_momentum else self.encoder).forward_features(x)

    def momentum_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(momentum parameters, online parameters), aligned."""
        online = list(self.encoder.parameters()) + list(self.head.parameters())
        target = list(self.momentum["encoder"].parameters()) + list(self.momentum["head"].parameters())
        if len(online) != len(target) or any(a.shape != b.shape for a, b in zip(online, target)):
            raise RunError("the momentum branch no longer matches the online encoder + head "
                           "(a module was added to the encoder after the SSL base wrapped it)")
        return target, online

    def forward(self, x, return_features: bool = False, *, ssl_hook=None, local=None):
        if ssl_hook is None:
            feats = self.forward_features(x)
            return feats if return_features else self.classifier(feats["features"])
        feats, q = [], []
        online = list(x.unbind(0)) + (list(local.unbind(0)) if local is not None else [])
        for view in online:
            f = self.forward_features(view)["features"]
            out = {"features": f, "streams": [f]}
            ssl_hook(out)
            feats.append(f)
            q.append([self.predictor(self.head(s)) for s in out["streams"]])
        with torch.no_grad():
            enc, head = self.momentum["encoder"], self.momentum["head"]
            keys = torch.stack([head(enc.forward_features(x[v])["features"]) for v in range(x.shape[0])])
        return {"features": torch.stack(feats), "q": q, "keys": keys}


# ------------------------------------------------------------------------------ momentum


def cosine_momentum(step: int, total_steps: int, m0: float) -> float:
    """MoCo v3 / DINO's momentum at ``step`` of ``total_steps``: ``1 - (1 - m0)(1 + cos(pi step / total)) / 2``
    (``m0`` at the start, 1 at the end)."""
    t = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - m0) * 0.5 * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], source: list[torch.Tensor], m: float) -> None:
    """In place ``target <- m * target + (1 - m) * source`` for every pair."""
    if not target:
        return
    torch._foreach_mul_(target, m)
    torch._foreach_add_(target, [s.detach() for s in source], alpha=1.0 - m)


# ------------------------------------------------------------------------------ distributed helpers


@torch.no_grad()
def gather_rows(t: torch.Tensor, world_size: int, dim: int = 0) -> torch.Tensor:
    """All-gather ``t`` from every rank and concatenate along ``dim`` (no gradient)."""
    if world_size <= 1:
        return t
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(world_size)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=dim)


@contextlib.contextmanager
def fp32(device_type: str):
    """Autocast off: losses are computed in float32 from whatever dtype came in."""
    with torch.autocast(device_type=device_type, enabled=False):
        yield


def encoder_input_error(encoder: nn.Module, in_channels: int, size: tuple[int, int]) -> str | None:
    """Why ``encoder.forward_features`` cannot encode images of ``size`` ``(h, w)``, or None when
    it can: one pass of two zero images in eval mode without gradient (no random draw, no
    BatchNorm statistics touched); the features must be ``[2, feature_dim]``."""
    h, w = size
    was = encoder.training
    param = next(encoder.parameters(), None)
    x = torch.zeros(2, in_channels, h, w, device=param.device if param is not None else "cpu")
    try:
        encoder.eval()
        with torch.no_grad():
            f = encoder.forward_features(x)["features"]
    except Exception as exc:  # the model's own error, reported as a config problem by the caller
        reason = f"{type(exc).__name__}: {exc}"
    else:
        expected = (2, encoder.feature_dim)
        reason = None if tuple(f.shape) == expected else f"features of shape {tuple(f.shape)}, not {expected}"
    finally:
        encoder.train(was)
    grid = getattr(encoder, "grid_size", None)
    if reason is not None and grid is not None:
        reason = (f"it is a token model with learned position embeddings for a fixed {grid[0]}x{grid[1]} token grid "
                  f"({reason})")
    return reason
