"""Batch attention: the attention core of BatchFormer, over the samples of a batch.

Computes, for ``q, k, v`` of shape ``[h, B, d]`` (h heads, B tokens = the batch)::

    S  = scale * q @ k^T            [h, B, B]   scale defaults to 1 / sqrt(d)
    P  = softmax(S, -1)             in float32
    P~ = P * keep / (1 - p)         dropout on the probabilities
    out = P~ @ v                    [h, B, d]   in the input dtype

dtypes: float32, float16, bfloat16 (math in float32). Gradients w.r.t. q, k and v.

Randomness: ``keep[head, i, j] = rng.uniform(key, ((head * B) + i) * B + j) >= float32(p)``
with ``key = rng.derive_key(seed)`` (:func:`dropout_keep_mask`), identical on every path
and device; an explicit ``dropout_mask`` may replace it.

Paths (chosen by :mod:`batchkin.kernels.dispatch`; ``batch_attention_impl(path=...)``
runs one): ``triton`` (CUDA, head dims up to 256), ``sdpa`` (the CPU fast path and the
fallback elsewhere: PyTorch's fused CPU kernel without dropout, blockwise explicit math
with it; this op has no C++ extension) and ``ref`` (:func:`batch_attention_reference`).
Every path returns the same ``(out, lse)`` pair, so any backward accepts any forward.
The registered ops are ``batchkin::batch_attention`` and ``batchkin::batch_attention_backward``.

The BatchFormer layers live in :mod:`batchkin.nn` (``BatchFormerLayer``, ``BatchFormer``,
... are still importable from here). Design notes: docs/kernels/batch_attention.md.
"""

from .op import (
    DTYPES,
    IMPL_PATHS,
    INFO,
    TRITON_MAX_HEAD_DIM,
    batch_attention,
    batch_attention_backward_op,
    batch_attention_impl,
    batch_attention_op,
    explain_path,
)
from .reference import attention_key, batch_attention_reference, dropout_keep_mask
from ..rng_mask import keep_mask_op

# The layers moved to batchkin.nn; these names stay importable from here.
_MOVED_TO_NN = (
    "BatchFormer", "BatchFormerLayer", "BatchSelfAttention", "draw_seed", "layer_dropout_mask",
    "STREAM_RESIDUAL1", "STREAM_FFN", "STREAM_RESIDUAL2",
)  # fmt: skip

__all__ = [
    "DTYPES", "IMPL_PATHS", "INFO", "TRITON_MAX_HEAD_DIM", "attention_key", "batch_attention",
    "batch_attention_backward_op", "batch_attention_impl", "batch_attention_op", "batch_attention_reference",
    "dropout_keep_mask", "explain_path", "keep_mask_op",
]  # fmt: skip


def __getattr__(name):
    """The BatchFormer layers (now :mod:`batchkin.nn`), imported on first use: batchkin.nn
    imports this package, so an eager import here would be circular."""
    if name in _MOVED_TO_NN:
        import batchkin.nn

        return getattr(batchkin.nn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
