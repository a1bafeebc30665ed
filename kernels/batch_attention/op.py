"""Batch attention: the registered custom ops, their eager autograd twin and the public functions."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import checks, dispatch
from ..rng_mask import keep_mask
from .cpu import sdpa_backward, sdpa_forward
from .reference import attention_key, reference_backward, reference_forward
from .triton import triton_backward, triton_forward

INFO = dispatch.REGISTRY["batch_attention"]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPL_PATHS = ("auto", "ref", "sdpa", "triton")
TRITON_MAX_HEAD_DIM = INFO.triton_limits["head_dim"]
_MATERIALIZE_MAX = 1 << 26  # largest keep mask (elements) built before the op on CPU

# Every path takes the same arguments and returns the same (out, lse) / (dq, dk, dv).
_FORWARDS = {"ref": reference_forward, "sdpa": sdpa_forward, "triton": triton_forward}
_BACKWARDS = {"ref": reference_backward, "sdpa": sdpa_backward, "triton": triton_backward}


def explain_path(device, head_dim: int = 64) -> tuple[str, str]:
    """``(path, reason)``: which path ``auto`` runs for tensors on ``device`` (see
    :func:`batchkin.kernels.dispatch.explain`); raises :class:`dispatch.KernelUnavailable`
    when ``BATCHKIN_KERNELS`` forces a path that cannot run here."""
    return dispatch.explain("batch_attention", device, build=True, head_dim=head_dim)


def _resolve(path: str, device: torch.device, head_dim: int) -> str:
    return dispatch.select("batch_attention", device, head_dim=head_dim) if path == "auto" else path


def _forward_impl(q, k, v, scale, dropout_p, key, keep_mask, path):
    """The forward of :func:`batch_attention_op` and of its eager twin :class:`_BatchAttention`."""
    return _FORWARDS[_resolve(path, q.device, q.shape[-1])](q, k, v, scale, dropout_p, key, keep_mask)


def _backward_impl(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path):
    """The body of :func:`batch_attention_backward_op` and of :class:`_BatchAttention`'s backward."""
    backward = _BACKWARDS[_resolve(path, q.device, q.shape[-1])]
    dq, dk, dv = backward(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@torch.library.custom_op("batchkin::batch_attention", mutates_args=())
def batch_attention_op(
    q: Tensor, k: Tensor, v: Tensor, scale: float, dropout_p: float, key: int, keep_mask: Optional[Tensor], path: str
) -> tuple[Tensor, Tensor]:
    """Forward: ``(out [h, B, d] in q's dtype, lse [h, B] float32)``.

    ``key``: the 32-bit dropout key (ignored when ``keep_mask`` is given or
    ``dropout_p == 0``); ``path``: ``auto``, ``ref``, ``sdpa`` or ``triton``.
    """
    return _forward_impl(q, k, v, scale, dropout_p, key, keep_mask, path)


@batch_attention_op.register_fake
def _(q, k, v, scale, dropout_p, key, keep_mask, path):
    h, B, d = q.shape
    return q.new_empty(h, B, d), q.new_empty(h, B, dtype=torch.float32)


@torch.library.custom_op("batchkin::batch_attention_backward", mutates_args=())
def batch_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, scale: float, dropout_p: float,
    key: int, keep_mask: Optional[Tensor], path: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Backward: ``(dq, dk, dv)``, P and the dropout mask recomputed from ``lse`` and ``key``."""
    return _backward_impl(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path)


@batch_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _save(ctx, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path):
    ctx.save_for_backward(q, k, v, out, lse, keep_mask)
    ctx.args = (scale, dropout_p, key, path)


def _saved(ctx):
    """The backward's arguments after ``grad_out``, as :func:`_save` kept them."""
    q, k, v, out, lse, keep_mask = ctx.saved_tensors
    scale, dropout_p, key, path = ctx.args
    return q, k, v, out, lse, scale, dropout_p, key, keep_mask, path


def _setup_context(ctx, inputs, output):
    q, k, v, scale, dropout_p, key, keep_mask, path = inputs
    _save(ctx, q, k, v, *output, scale, dropout_p, key, keep_mask, path)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:
        grad_out = torch.zeros_like(ctx.saved_tensors[3])
    dq, dk, dv = batch_attention_backward_op(grad_out, *_saved(ctx))
    return dq, dk, dv, None, None, None, None, None


batch_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _BatchAttention(torch.autograd.Function):
    """Eager twin of :func:`batch_attention_op` with its autograd: the same forward and
    backward bodies, called directly (the registered op pays the Python custom-op dispatch
    twice per step, a sizeable share of a small layer's time on CPU). Traced calls
    (``torch.compile``) take the op."""

    @staticmethod
    def forward(ctx, q, k, v, scale, dropout_p, key, keep_mask, path):
        out, lse = _forward_impl(q, k, v, scale, dropout_p, key, keep_mask, path)
        _save(ctx, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        dq, dk, dv = _backward_impl(grad_out, *_saved(ctx))
        return dq, dk, dv, None, None, None, None, None


def _check_args(q, k, v, scale, dropout_p, seed, dropout_mask, path):
    checks.check_tensor("q", q, ndim=3, dtypes=DTYPES, min_numel=1)
    h, B, d = q.shape
    checks.check_tensor("k", k, ndim=3, dtypes=(q.dtype,), shape=(h, B, d), device=q.device)
    checks.check_tensor("v", v, ndim=3, dtypes=(q.dtype,), shape=(h, B, d), device=q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    elif not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0; got {scale}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")
    checks.check_int("seed", seed)
    if dropout_mask is not None:
        checks.check_tensor("dropout_mask", dropout_mask, dtypes=(torch.bool,), shape=(h, B, B), device=q.device)
        if dropout_p == 0.0:
            raise ValueError("dropout_mask needs dropout_p > 0 (kept values are scaled by 1 / (1 - dropout_p))")
    if path == "cpp":
        path = INFO.native  # this op's CPU fast path stands in for a C++ one
    if path not in IMPL_PATHS:
        raise ValueError(f"path must be one of {', '.join(IMPL_PATHS)}; got {path!r}")
    return float(scale), float(dropout_p), path


def _materialize_mask(q: Tensor, path: str) -> bool:
    """Whether the keep mask is built before the op (CPU ``sdpa`` path, mask of at most 64 MiB)."""
    h, B, d = q.shape
    if q.device.type != "cpu" or h * B * B > _MATERIALIZE_MAX or torch.compiler.is_compiling():
        return False
    return _resolve(path, q.device, d) == "sdpa"


def batch_attention_impl(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, dropout_p: float = 0.0, seed: int = 0,
    dropout_mask: Optional[Tensor] = None, path: str = "auto",
) -> Tensor:  # fmt: skip
    """:func:`batch_attention` on a chosen path (``auto``, ``ref``, ``sdpa``/``cpp``, ``triton``)."""
    scale, dropout_p, path = _check_args(q, k, v, scale, dropout_p, seed, dropout_mask, path)
    key = attention_key(seed) if dropout_p > 0.0 else 0
    mask = dropout_mask
    if mask is None and dropout_p > 0.0 and _materialize_mask(q, path):
        # The blockwise path would hash the mask twice (forward and backward):
        # hash it once here (1 byte per probability), so autograd keeps it.
        h, B, _ = q.shape
        mask = keep_mask(key, [h, B, B], dropout_p, q.device)
    if torch.compiler.is_compiling():
        return batch_attention_op(q, k, v, scale, dropout_p, key, mask, path)[0]
    return _BatchAttention.apply(q, k, v, scale, dropout_p, key, mask, path)


def batch_attention(
    q: Tensor, k: Tensor, v: Tensor, *, scale: Optional[float] = None, dropout_p: float = 0.0, seed: int = 0,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    """Attention over the batch: ``softmax(scale * q k^T) v`` with seeded dropout.

    Args:
        q, k, v: ``[h, B, d]`` tensors of one dtype (float32/float16/bfloat16) on
            one device; the B tokens are the samples of the batch.
        scale: score scale, default ``1 / sqrt(d)``.
        dropout_p: dropout probability on the attention probabilities, in [0, 1).
        seed: dropout seed (any int); the keep mask is
            ``dropout_keep_mask(rng.derive_key(seed), h, B, dropout_p)``.
        dropout_mask: an explicit ``[h, B, B]`` bool keep mask used instead of the
            seed (needs ``dropout_p > 0`` for the ``1 / (1 - p)`` rescaling).

    Returns ``[h, B, d]`` in the input dtype, differentiable w.r.t. q, k and v.
    """
    return batch_attention_impl(
        q, k, v, scale=scale, dropout_p=dropout_p, seed=seed, dropout_mask=dropout_mask, path="auto"
    )
