"""Batch attention in explicit PyTorch math: the definition the fast paths are tested against."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import rng
from ..rng_mask import float32


def attention_key(seed: int) -> int:
    """The 32-bit counter-RNG key of a dropout seed (``rng.derive_key(seed)``)."""
    return rng.derive_key(seed)


def dropout_keep_mask(key: int, h: int, B: int, p: float, device=None) -> Tensor:
    """The exact keep mask ``[h, B, B]`` (bool) the kernels use for ``key`` and ``p``.

    ``keep[head, i, j] = rng.uniform(key, ((head * B) + i) * B + j) >= float32(p)``.
    """
    offsets = torch.arange(h * B * B, device=device, dtype=torch.int64)
    u = rng.uniform(key, offsets).view(h, B, B)
    return u >= float32(p)


def batch_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, scale: float, keep_mask: Optional[Tensor], p: float
) -> Tensor:
    """Attention over the batch with explicit math; differentiable by autograd.

    ``q, k, v``: ``[h, B, d]``; ``keep_mask``: ``[h, B, B]`` bool or ``None`` (no
    dropout); ``p``: the dropout probability the kept values are rescaled by.
    Scores and softmax in float32; the output has the input dtype.
    """
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores, dim=-1)
    if keep_mask is not None:
        probs = probs * keep_mask.to(probs.dtype) / (1.0 - p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def _mask(q: Tensor, p: float, key: int, keep_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The keep mask the reference path applies: ``keep_mask``, or the seeded one (None without dropout)."""
    if p <= 0.0:
        return None
    return keep_mask if keep_mask is not None else dropout_keep_mask(key, q.shape[0], q.shape[1], p, q.device)


def reference_forward(q, k, v, scale, p, key, keep_mask):
    """``(out, lse)`` of the reference (``lse``: float32 row logsumexp of the scaled scores)."""
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = batch_attention_reference(q, k, v, scale, _mask(q, p, key, keep_mask), p)
    return out.contiguous(), lse.contiguous()


def reference_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask):
    """Explicit gradients of :func:`batch_attention_reference` (float32 math)."""
    keep_mask = _mask(q, p, key, keep_mask)
    qf, kf, vf, go = q.float(), k.float(), v.float(), grad_out.float()
    probs = torch.softmax(torch.matmul(qf, kf.transpose(-1, -2)) * scale, dim=-1)
    if keep_mask is not None:
        drop_scale = keep_mask.to(torch.float32) / (1.0 - p)
    else:
        drop_scale = torch.ones_like(probs)
    dropped = probs * drop_scale
    dv = torch.matmul(dropped.transpose(-1, -2), go)
    d_dropped = torch.matmul(go, vf.transpose(-1, -2))
    d_probs = d_dropped * drop_scale
    d_scores = probs * (d_probs - (probs * d_probs).sum(-1, keepdim=True))
    dq = torch.matmul(d_scores, kf) * scale
    dk = torch.matmul(d_scores.transpose(-1, -2), qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
