"""Batch attention: the attention core of BatchFormer, and the BatchFormer layer.

BatchFormer (METHODS.md section 2) runs a transformer encoder layer across the
batch: the B samples of a mini-batch form ONE sequence of B tokens, so every
sample attends to every other. The attention core therefore sees

    q, k, v : [h, B, d]      (h heads, B tokens = the batch, head dim d)
    S = scale * q @ k^T      [h, B, B]    (scale defaults to 1/sqrt(d))
    P = softmax(S, -1)       (in float32)
    P~ = P * keep / (1 - p)  (dropout on the probabilities, keep mask from a seed)
    out = P~ @ v             [h, B, d]    (in the input dtype)

Dropout mask. The keep mask is counter-based (``batchkin.kernels.rng``): with
``key = rng.derive_key(seed)`` the probability ``P[head, i, j]`` is kept iff

    rng.uniform(key, offset) >= p,   offset = ((head * B) + i) * B + j

(p rounded to float32, as the Triton kernel sees it). :func:`dropout_keep_mask`
builds that exact mask; every path (reference, CPU, Triton) reproduces it bit for
bit on any device (the CPU path hashes with numpy uint32 arithmetic, other
devices with int32 torch ops; the tests check both against ``rng.uniform``).

Paths (``batch_attention_impl(..., path=...)``):

* ``triton`` — flash-attention-2 style kernels: the forward keeps an online
  softmax per row block and stores the row logsumexp; the backward computes
  ``delta = rowsum(dO * O)`` in a preprocessing kernel, then dK/dV (one program
  per key block) and dQ (one program per query block), recomputing P and the
  dropout mask blockwise (nothing of size B x B is stored). Everything is
  computed in float32 after loading (fp16/bf16 inputs are upcast; fp32 dots use
  IEEE precision, no TF32). Head dims up to 256 (any size: the head dim is
  padded to a power of two by masking).
* ``sdpa`` — the CPU fast path (this op has no C++ extension): without dropout
  PyTorch's fused scaled-dot-product attention kernel for CPU (its forward
  returns the logsumexp, its backward is used as is); with dropout, explicit
  math over row blocks (P recomputed from the logsumexp in the backward) with
  the seeded mask (so results are deterministic and equal the reference given
  the same seed). The public function hashes that mask once before the op
  (1 byte per probability, kept by autograd for the backward) when it has at
  most ``_MATERIALIZE_MAX`` elements; larger masks are hashed per row block in
  the forward and again in the backward. The same explicit blockwise math runs
  on other devices, and on CUDA for head dims Triton does not take (> 256).
* ``ref`` — :func:`batch_attention_reference` and its explicit backward.

Dispatch: ``dispatch.select`` picks Triton for CUDA tensors. On CPU, where
``dispatch`` knows no fast path for an op without C++, ``auto`` (and a forced
``BATCHKIN_KERNELS=cpp``, which means "the CPU fast path") take ``sdpa``;
:func:`explain_path` says which path runs and why.

Every path returns the same ``(out, lse)`` pair (``lse`` = float32 row logsumexp
of the scaled scores), so any path's backward accepts any path's forward.

The registered custom ops (forward and backward, with ``register_autograd``) are
what ``torch.compile`` traces; eager calls run the same bodies through an
``autograd.Function`` (:class:`_BatchAttention`), which skips the Python
custom-op dispatch (a large share of a small layer's step on CPU).

:class:`BatchFormerLayer` is a post-norm transformer encoder layer over the batch
with the parameter names and shapes of ``nn.TransformerEncoderLayer`` (its state
dict loads as is); :class:`BatchFormer` stacks such layers. In training, the three
feature-dropout masks of a forward are hashed together (one numpy call on CPU) as
scaled float masks, and each residual dropout is fused with its residual add
(``addcmul``).
"""

from __future__ import annotations

import contextlib
import math
import struct
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import checks, dispatch, rng

INFO = dispatch.register_op("batch_attention", cpp_library=None, triton=True)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IMPL_PATHS = ("auto", "ref", "sdpa", "triton")
TRITON_MAX_HEAD_DIM = 256

# Elements of one row block of scores in the explicit path (its temporaries are
# a few blocks of float32): 16 MiB blocks on CPU (few, large ops: B <= 1024 at 4
# heads is one block), 256 MiB on other devices. Memory stays O(block), not O(h B^2).
_CPU_BLOCK_ELEMS = 1 << 22
_DEVICE_BLOCK_ELEMS = 1 << 26

_MASK32 = 0xFFFFFFFF
_MATERIALIZE_MAX = 1 << 26  # largest keep mask (elements) built before the op on CPU


# --------------------------------------------------------------------------- #
# Dropout mask
# --------------------------------------------------------------------------- #


def _float32(p: float) -> float:
    """``p`` rounded to float32 (the value a Triton kernel argument holds)."""
    return struct.unpack("f", struct.pack("f", float(p)))[0]


def attention_key(seed: int) -> int:
    """The 32-bit counter-RNG key of a dropout seed (``rng.derive_key(seed)``)."""
    return rng.derive_key(seed)


def dropout_keep_mask(key: int, h: int, B: int, p: float, device=None) -> Tensor:
    """The exact keep mask ``[h, B, B]`` (bool) the kernels use for ``key`` and ``p``.

    ``keep[head, i, j] = rng.uniform(key, ((head * B) + i) * B + j) >= float32(p)``.
    """
    offsets = torch.arange(h * B * B, device=device, dtype=torch.int64)
    u = rng.uniform(key, offsets).view(h, B, B)
    return u >= _float32(p)


def _wrap_int32(x: int) -> int:
    """An integer mod 2**32 as the signed int32 with the same bits."""
    x &= _MASK32
    return x - (1 << 32) if x >= (1 << 31) else x


def _threshold24(p: float) -> int:
    """``u = m * 2**-24 >= float32(p)``  <=>  ``m >= ceil(float32(p) * 2**24)`` (exact)."""
    return math.ceil(_float32(p) * (1 << 24))


_M1, _M2 = 0x7FEB352D, 0x846CA68B
_NP_CHUNK = 1 << 16  # uint32 elements per numpy pass: the working set stays in L2


def _np_lowbias32_(x: np.ndarray, t: np.ndarray) -> None:
    """``rng``'s lowbias32 on a uint32 array, in place (``t``: scratch of the same size)."""
    np.right_shift(x, 16, out=t)
    x ^= t
    np.multiply(x, np.uint32(_M1), out=x)
    np.right_shift(x, 15, out=t)
    x ^= t
    np.multiply(x, np.uint32(_M2), out=x)
    np.right_shift(x, 16, out=t)
    x ^= t


_NP_ARANGE = np.arange(_NP_CHUNK, dtype=np.uint32)


def _hash_passes(segments, ch: int):
    """Split ``segments`` (``(key, start, n)``, laid end to end) into passes of at most ``ch`` elements.

    Each pass is a list of pieces ``(key, offset, m)``: ``m`` consecutive counter
    offsets from ``offset`` under ``key``. Short segments share one pass, so a few
    small masks (different keys) cost one round of numpy calls, not one each.
    """
    passes, cur, size = [], [], 0
    for key, start, n in segments:
        s = 0
        while s < n:
            m = min(n - s, ch - size)
            cur.append((key, start + s, m))
            size, s = size + m, s + m
            if size == ch:
                passes.append((cur, size))
                cur, size = [], 0
    if cur:
        passes.append((cur, size))
    return passes


def _hash_segments_cpu(keep: np.ndarray, segments, p: float, value=None) -> None:
    """``keep[pos:pos+n] = rng.uniform(key, start + arange(n)) >= float32(p)`` for each
    segment ``(key, start, n)``, the segments laid end to end in the 1-D ``keep``.

    numpy uint32 arithmetic (wrapping products, logical shifts) in cache-sized
    passes. ``keep``: bool, or float32 (kept entries = ``value``, else 1).
    """
    threshold = _threshold24(p)
    if threshold >= 1 << 24:  # float32(p) == 1: nothing is kept
        keep[:] = 0
        return
    thr = np.uint32(threshold << 8)  # (h >> 8) >= t  <=>  h >= t << 8 (t < 2**24)
    total = keep.shape[0]
    ch = max(1, min(_NP_CHUNK, total))
    x = np.empty(ch, dtype=np.uint32)
    t = np.empty(ch, dtype=np.uint32)
    pos = 0
    for pieces, size in _hash_passes(segments, ch):
        a = 0
        for key, offset, m in pieces:
            xs = x[a : a + m]
            offset &= _MASK32
            if offset:
                np.add(_NP_ARANGE[:m], np.uint32(offset), out=xs)  # offsets mod 2**32
                xs ^= np.uint32(key & _MASK32)
            else:
                np.bitwise_xor(_NP_ARANGE[:m], np.uint32(key & _MASK32), out=xs)
            a += m
        xs, ts = x[:size], t[:size]
        _np_lowbias32_(xs, ts)
        a = 0
        for key, _, m in pieces:
            x[a : a + m] += np.uint32(key & _MASK32)
            a += m
        _np_lowbias32_(xs, ts)
        out = keep[pos : pos + size]
        np.greater_equal(xs, thr, out=out)
        if value is not None:
            out *= value
        pos += size


def _keep_ranges_cpu(key: int, start: int, stride: int, count: int, n: int, p: float, dtype, value=None) -> Tensor:
    """CPU: the ranges as segments of one :func:`_hash_segments_cpu` call."""
    if count > 1 and stride == n:  # back-to-back ranges: one long range
        segments = [(key, start, n * count)]
    else:
        segments = [(key, start + row * stride, n) for row in range(count)]
    keep = np.empty(count * n, dtype=np.bool_ if dtype == torch.bool else np.float32)
    _hash_segments_cpu(keep, segments, p, value)
    return torch.from_numpy(keep).view(count, n)


def _torch_lowbias32_int32_(x: Tensor) -> Tensor:
    """``rng``'s lowbias32 on int32 tensors, in place (wrapping products, masked shifts)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _wrap_int32(_M1)
    x ^= (x >> 15) & 0x1FFFF
    x *= _wrap_int32(_M2)
    x ^= (x >> 16) & 0xFFFF
    return x


def _keep_ranges_torch(
    key: int, start: int, stride: int, count: int, n: int, p: float, device, dtype, value=None
) -> Tensor:
    """Other devices: the same hash in int32 torch ops, all ranges in one pass, no host copy."""
    offsets = torch.arange(count, dtype=torch.int64, device=device).view(-1, 1) * stride + start
    offsets = offsets + torch.arange(n, dtype=torch.int64, device=device).view(1, -1)
    offsets = offsets & _MASK32
    x = (offsets - ((offsets >> 31) << 32)).to(torch.int32)  # same bits, signed
    k = _wrap_int32(key)
    x ^= k
    _torch_lowbias32_int32_(x)
    x += k  # wraps mod 2**32
    _torch_lowbias32_int32_(x)
    keep = ((x >> 8) & 0xFFFFFF) >= _threshold24(p)
    if dtype == torch.bool:
        return keep
    return keep.to(dtype) if value is None else keep.to(dtype) * value


def _keep_ranges(key: int, start: int, stride: int, count: int, n: int, p: float, device, dtype=torch.bool, value=None):
    """``rng.uniform(key, start + r * stride + arange(n)) >= float32(p)`` for ``r < count``.

    Returns ``[count, n]``. Bit-identical to :func:`rng.uniform` (the tests check
    it) and several times faster than its int64 torch version on CPU. ``dtype``:
    bool, or float32 for a 0/1 mask that multiplies without a conversion (kept
    entries equal to ``value`` instead of 1 when given).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype == torch.bool:
        value = None
    if device.type == "cpu":
        return _keep_ranges_cpu(key, start, stride, count, n, p, dtype, value)
    return _keep_ranges_torch(key, start, stride, count, n, p, device, dtype, value)


def _keep_rows(key: int, h: int, B: int, r0: int, r1: int, p: float, device, dtype=torch.bool) -> Tensor:
    """Attention keep mask rows ``r0:r1`` of every head: ``[h, r1 - r0, B]``."""
    return _keep_ranges(key, r0 * B, B * B, h, (r1 - r0) * B, p, device, dtype).view(h, r1 - r0, B)


@torch.library.custom_op("batchkin::batch_attention_keep_mask", mutates_args=())
def keep_mask_op(key: int, shape: list[int], p: float, device: torch.device) -> Tensor:
    """Bool keep mask of ``shape``: ``keep.view(-1)[i] = rng.uniform(key, i) >= float32(p)``.

    With ``shape = [h, B, B]`` this is :func:`dropout_keep_mask`; the layer's
    feature dropouts use it too. A registered op so that it traces under torch.compile.
    """
    n = math.prod(shape)
    return _keep_ranges(key, 0, 0, 1, n, p, device).view(shape)


@keep_mask_op.register_fake
def _(key, shape, p, device):
    return torch.empty(shape, dtype=torch.bool, device=device)


def _keep_mask(key: int, shape: list[int], p: float, device: torch.device) -> Tensor:
    """:func:`keep_mask_op`; eager calls skip the custom-op dispatch overhead (same result)."""
    if torch.compiler.is_compiling():
        return keep_mask_op(key, shape, p, device)
    return _keep_ranges(key, 0, 0, 1, math.prod(shape), p, device).view(shape)


# --------------------------------------------------------------------------- #
# Reference (explicit math)
# --------------------------------------------------------------------------- #


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


def _reference_forward(q, k, v, scale, keep_mask, p):
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    out = batch_attention_reference(q, k, v, scale, keep_mask, p)
    return out.contiguous(), lse.contiguous()


def _reference_backward(grad_out, q, k, v, scale, keep_mask, p):
    """Explicit gradients of :func:`batch_attention_reference` (float32 math)."""
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


# --------------------------------------------------------------------------- #
# "sdpa" path: fused SDPA on CPU without dropout, explicit blockwise math otherwise
# --------------------------------------------------------------------------- #


def _row_block(h: int, B: int, device: torch.device) -> int:
    target = _CPU_BLOCK_ELEMS if device.type == "cpu" else _DEVICE_BLOCK_ELEMS
    return max(1, min(B, target // max(1, h * B)))


def _block_keep(key, keep_mask, h, B, r0, r1, p, device):
    """0/1 float32 keep mask of rows ``r0:r1`` (``[h, R, B]``), or None without dropout."""
    if p <= 0.0:
        return None
    if keep_mask is not None:
        rows = keep_mask[:, r0:r1]  # bool -> float via uint8: the direct bool cast is several times slower
        return (rows.view(torch.uint8) if rows.dtype == torch.bool else rows).to(torch.float32)
    return _keep_rows(key, h, B, r0, r1, p, device, torch.float32)


def _explicit_forward(q, k, v, scale, p, key, keep_mask):
    h, B, d = q.shape
    qs = q.float() * scale  # [h, B, d]: the scale folded into q (small)
    kt, vf = k.float().transpose(1, 2), v.float()
    inv_keep = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    R = _row_block(h, B, q.device)
    outs, lses = [], []
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        s = torch.bmm(qs[:, r0:r1], kt)  # scores [h, R, B]
        m = s.amax(dim=-1, keepdim=True)
        s.sub_(m).exp_()
        denom = s.sum(dim=-1, keepdim=True)  # softmax normaliser of the undropped row
        keep = _block_keep(key, keep_mask, h, B, r0, r1, p, q.device)
        if keep is not None:
            s.mul_(keep)
        o = torch.bmm(s, vf)
        lses.append(denom.log().add_(m).squeeze(-1))
        outs.append(o.mul_(denom.reciprocal_().mul_(inv_keep)))
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs, 1), torch.cat(lses, 1))
    return out.to(q.dtype), lse


def _explicit_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask):
    """dS = P * (dP - delta), dP = keep * dP~ / (1 - p), delta = rowsum(dO * O).

    With dropout this is computed as ``inv * (Pk * dP~ - P * delta * (1 - p))``
    where ``Pk = P * keep``, so the mask is applied once and ``inv = 1 / (1 - p)``
    folds into the products.
    """
    h, B, d = q.shape
    qs = q.float() * scale
    kf, go = k.float(), grad_out.float()
    kt, vt = kf.transpose(1, 2), v.float().transpose(1, 2)
    delta = (go * out.float()).sum(-1, keepdim=True)  # [h, B, 1]
    inv_keep = 1.0 / (1.0 - p) if p > 0.0 else 1.0
    R = _row_block(h, B, q.device)
    dqs, dk, dv = [], None, None
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        probs = torch.bmm(qs[:, r0:r1], kt)
        probs.sub_(lse[:, r0:r1, None]).exp_()  # P recomputed from the logsumexp
        go_blk = go[:, r0:r1]
        ds = torch.bmm(go_blk, vt)  # dP~, the gradient of the dropped probabilities
        keep = _block_keep(key, keep_mask, h, B, r0, r1, p, q.device)
        if keep is None:
            pd = probs
            ds.sub_(delta[:, r0:r1]).mul_(probs)
        else:
            pd = keep.mul_(probs)  # P * keep, in the (fresh) mask buffer
            ds.mul_(pd).addcmul_(probs, delta[:, r0:r1], value=-(1.0 - p))
        if dv is None:  # first block: plain products (no zero fill)
            dv = torch.bmm(pd.transpose(1, 2), go_blk)
            dk = torch.bmm(ds.transpose(1, 2), qs[:, r0:r1])
        else:
            dv.baddbmm_(pd.transpose(1, 2), go_blk)
            dk.baddbmm_(ds.transpose(1, 2), qs[:, r0:r1])
        dqs.append(torch.bmm(ds, kf))
    dq = dqs[0] if len(dqs) == 1 else torch.cat(dqs, 1)
    dq.mul_(scale * inv_keep)
    if inv_keep != 1.0:
        dk.mul_(inv_keep)
        dv.mul_(inv_keep)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _sdpa_forward(q, k, v, scale, p, key, keep_mask):
    if p == 0.0 and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=scale
        )
        return out.squeeze(0).contiguous(), lse.squeeze(0).float().contiguous()
    return _explicit_forward(q, k, v, scale, p, key, keep_mask)


def _sdpa_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask):
    if p == 0.0 and q.device.type == "cpu":
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out.contiguous().unsqueeze(0),
            q.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            out.contiguous().unsqueeze(0),
            lse.unsqueeze(0),
            0.0,
            False,
            scale=scale,
        )
        return dq.squeeze(0).contiguous(), dk.squeeze(0).contiguous(), dv.squeeze(0).contiguous()
    return _explicit_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask)


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms
    triton = None

if triton is not None:
    from .rng import tl_uniform

    @triton.jit
    def _keep_block(MASK, sm_h, sm_i, sm_j, head, offs_m, offs_n, B, key, dropout_p, HAS_MASK: tl.constexpr):
        """Keep mask of one [BLOCK_M, BLOCK_N] tile: loaded, or hashed from (key, offset)."""
        if HAS_MASK:
            ok = (offs_m[:, None] < B) & (offs_n[None, :] < B)
            ptrs = MASK + head * sm_h + offs_m[:, None] * sm_i + offs_n[None, :] * sm_j
            keep = tl.load(ptrs, mask=ok, other=0) != 0
        else:
            offsets = (head * B + offs_m[:, None]) * B + offs_n[None, :]
            keep = tl_uniform(key, offsets) >= dropout_p
        return keep

    @triton.jit
    def _load_rows(PTR, head, s_h, s_b, s_d, offs_b, offs_d, ok):
        """The tile ``[offs_b, offs_d]`` of head ``head`` of a ``[h, B, d]`` tensor, as float32 (0 where not ``ok``)."""
        ptrs = PTR + head * s_h + offs_b[:, None] * s_b + offs_d[None, :] * s_d
        return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _bwd_tile(
        q, kb, vb, do, lse, delta, MASK, sm_h, sm_i, sm_j, head, offs_m, offs_n, m_ok, n_ok,
        B, scale, dropout_p, inv_keep, key, DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        """One ``[BLOCK_M, BLOCK_N]`` tile of the backward, shared by the dK/dV and dQ kernels.

        Recomputes ``P = exp(scale * q k^T - lse)`` (0 outside the ``B x B`` range) and
        the tile's keep mask; returns ``(P~, dS)``: the dropped probabilities
        ``keep * P / (1 - p)`` and ``dS = P * (dP - delta)`` with ``dP = keep * (dO v^T) / (1 - p)``.
        """
        s = tl.dot(q, tl.trans(kb), input_precision="ieee") * scale
        pr = tl.exp(s - lse[:, None])
        pr = tl.where(m_ok[:, None] & n_ok[None, :], pr, 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision="ieee")  # gradient of the dropped P
        if DROPOUT:
            keep = _keep_block(MASK, sm_h, sm_i, sm_j, head, offs_m, offs_n, B, key, dropout_p, HAS_MASK)
            pd = tl.where(keep, pr * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = pr
        ds = pr * (dp - delta[:, None])
        return pd, ds

    @triton.jit(do_not_specialize=["key"])  # a key equal to 1 must stay a runtime value
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, MASK,
        sq_h, sq_b, sq_d, sk_h, sk_b, sk_d, sv_h, sv_b, sv_d, so_h, so_b, so_d, sm_h, sm_i, sm_j,
        B, D, scale, dropout_p, inv_keep, key,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < B
        d_ok = offs_d < D
        q = _load_rows(Q, head, sq_h, sq_b, sq_d, offs_m, offs_d, m_ok[:, None] & d_ok[None, :])
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, B, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < B
            kv_ok = n_ok[:, None] & d_ok[None, :]
            kb = _load_rows(K, head, sk_h, sk_b, sk_d, offs_n, offs_d, kv_ok)
            vb = _load_rows(V, head, sv_h, sv_b, sv_d, offs_n, offs_d, kv_ok)
            s = tl.dot(q, tl.trans(kb), input_precision="ieee") * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)  # normaliser over the undropped probabilities
            if DROPOUT:
                keep = _keep_block(MASK, sm_h, sm_i, sm_j, head, offs_m, offs_n, B, key, dropout_p, HAS_MASK)
                pr = tl.where(keep, pr, 0.0)
            acc = acc * alpha[:, None] + tl.dot(pr, vb, input_precision="ieee")
            m_i = m_new
        acc = acc / l_i[:, None]
        if DROPOUT:
            acc = acc * inv_keep
        tl.store(
            O + head * so_h + offs_m[:, None] * so_b + offs_d[None, :] * so_d,
            acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :],
        )
        tl.store(LSE + head * B + offs_m, m_i + tl.log(l_i), mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess_kernel(
        O, DO, DELTA, so_h, so_b, so_d, sdo_h, sdo_b, sdo_d, B, D,
        BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_m[:, None] < B) & (offs_d[None, :] < D)
        o = _load_rows(O, head, so_h, so_b, so_d, offs_m, offs_d, ok)
        do = _load_rows(DO, head, sdo_h, sdo_b, sdo_d, offs_m, offs_d, ok)
        delta = tl.sum(o * do, 1)
        tl.store(DELTA + head * B + offs_m, delta, mask=offs_m < B)

    @triton.jit(do_not_specialize=["key"])  # a key equal to 1 must stay a runtime value
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, MASK, DK, DV,
        sq_h, sq_b, sq_d, sk_h, sk_b, sk_d, sv_h, sv_b, sv_d, sdo_h, sdo_b, sdo_d,
        sdk_h, sdk_b, sdk_d, sdv_h, sdv_b, sdv_d, sm_h, sm_i, sm_j,
        B, D, scale, dropout_p, inv_keep, key,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        head = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        n_ok = offs_n < B
        d_ok = offs_d < D
        kv_ok = n_ok[:, None] & d_ok[None, :]
        kb = _load_rows(K, head, sk_h, sk_b, sk_d, offs_n, offs_d, kv_ok)
        vb = _load_rows(V, head, sv_h, sv_b, sv_d, offs_n, offs_d, kv_ok)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, B, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < B
            q_ok = m_ok[:, None] & d_ok[None, :]
            q = _load_rows(Q, head, sq_h, sq_b, sq_d, offs_m, offs_d, q_ok)
            do = _load_rows(DO, head, sdo_h, sdo_b, sdo_d, offs_m, offs_d, q_ok)
            lse = tl.load(LSE + head * B + offs_m, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + head * B + offs_m, mask=m_ok, other=0.0)
            pd, ds = _bwd_tile(
                q, kb, vb, do, lse, delta, MASK, sm_h, sm_i, sm_j, head, offs_m, offs_n, m_ok, n_ok,
                B, scale, dropout_p, inv_keep, key, DROPOUT, HAS_MASK,
            )  # fmt: skip
            dv += tl.dot(tl.trans(pd), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        dk = dk * scale
        dk_ptrs = DK + head * sdk_h + offs_n[:, None] * sdk_b + offs_d[None, :] * sdk_d
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_ok)
        dv_ptrs = DV + head * sdv_h + offs_n[:, None] * sdv_b + offs_d[None, :] * sdv_d
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit(do_not_specialize=["key"])  # a key equal to 1 must stay a runtime value
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, MASK, DQ,
        sq_h, sq_b, sq_d, sk_h, sk_b, sk_d, sv_h, sv_b, sv_d, sdo_h, sdo_b, sdo_d,
        sdq_h, sdq_b, sdq_d, sm_h, sm_i, sm_j,
        B, D, scale, dropout_p, inv_keep, key,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        head = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < B
        d_ok = offs_d < D
        q_ok = m_ok[:, None] & d_ok[None, :]
        q = _load_rows(Q, head, sq_h, sq_b, sq_d, offs_m, offs_d, q_ok)
        do = _load_rows(DO, head, sdo_h, sdo_b, sdo_d, offs_m, offs_d, q_ok)
        lse = tl.load(LSE + head * B + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + head * B + offs_m, mask=m_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, B, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            n_ok = offs_n < B
            kv_ok = n_ok[:, None] & d_ok[None, :]
            kb = _load_rows(K, head, sk_h, sk_b, sk_d, offs_n, offs_d, kv_ok)
            vb = _load_rows(V, head, sv_h, sv_b, sv_d, offs_n, offs_d, kv_ok)
            _, ds = _bwd_tile(
                q, kb, vb, do, lse, delta, MASK, sm_h, sm_i, sm_j, head, offs_m, offs_n, m_ok, n_ok,
                B, scale, dropout_p, inv_keep, key, DROPOUT, HAS_MASK,
            )  # fmt: skip
            dq += tl.dot(ds, kb, input_precision="ieee")
        dq = dq * scale
        dq_ptrs = DQ + head * sdq_h + offs_m[:, None] * sdq_b + offs_d[None, :] * sdq_d
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=q_ok)


def _triton_blocks(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_stages) for head dim ``d``.

    Compiled for sm_90 (no GPU was at hand to time them) with two pipeline stages
    the kernels use at most ~82 KB of shared memory for d <= 128 but ~135 KB at
    d = 256, so d = 256 runs with one stage (room on GPUs with less shared memory).
    """
    block_d = max(16, triton.next_power_of_2(d))
    block = 64 if block_d <= 64 else 32
    return block, block, block_d, (2 if block_d <= 128 else 1)


def _mask_args(keep_mask: Optional[Tensor], q: Tensor):
    if keep_mask is None:
        return q, (0, 0, 0)  # any pointer: never read
    mask = keep_mask.view(torch.uint8) if keep_mask.dtype == torch.bool else keep_mask
    return mask, tuple(mask.stride())


def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _triton_forward(q, k, v, scale, p, key, keep_mask):
    if triton is None:
        raise dispatch.KernelUnavailable("op 'batch_attention': triton cannot be imported")
    h, B, d = q.shape
    if d > TRITON_MAX_HEAD_DIM:
        raise dispatch.KernelUnavailable(
            f"op 'batch_attention': the Triton kernel takes head dims up to {TRITON_MAX_HEAD_DIM}; got {d}"
        )
    out = torch.empty(h, B, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(h, B, dtype=torch.float32, device=q.device)
    BM, BN, BD, stages = _triton_blocks(d)
    mask, sm = _mask_args(keep_mask, q)
    dropout = p > 0.0
    with _device_guard(q):
        _attn_fwd_kernel[(triton.cdiv(B, BM), h)](
            q, k, v, out, lse, mask,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *sm,
            B, d, float(scale), _float32(p), 1.0 / (1.0 - p) if dropout else 1.0, int(key),
            BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, DROPOUT=dropout, HAS_MASK=keep_mask is not None,
            num_warps=4, num_stages=stages,
        )  # fmt: skip
    return out, lse


def _triton_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask):
    if triton is None:
        raise dispatch.KernelUnavailable("op 'batch_attention': triton cannot be imported")
    h, B, d = q.shape
    if d > TRITON_MAX_HEAD_DIM:
        raise dispatch.KernelUnavailable(
            f"op 'batch_attention': the Triton kernel takes head dims up to {TRITON_MAX_HEAD_DIM}; got {d}"
        )
    BM, BN, BD, stages = _triton_blocks(d)
    mask, sm = _mask_args(keep_mask, q)
    dropout = p > 0.0
    inv_keep = 1.0 / (1.0 - p) if dropout else 1.0
    lse = lse.contiguous()
    delta = torch.empty(h, B, dtype=torch.float32, device=q.device)
    dq = torch.empty(h, B, d, dtype=q.dtype, device=q.device)
    dk = torch.empty(h, B, d, dtype=k.dtype, device=q.device)
    dv = torch.empty(h, B, d, dtype=v.dtype, device=q.device)
    common = dict(BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD, DROPOUT=dropout, HAS_MASK=keep_mask is not None)
    common.update(num_warps=4, num_stages=stages)
    with _device_guard(q):
        _attn_bwd_preprocess_kernel[(triton.cdiv(B, BM), h)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), B, d,
            BLOCK_M=BM, BLOCK_D=BD, num_warps=4, num_stages=stages,
        )  # fmt: skip
        _attn_bwd_dkdv_kernel[(triton.cdiv(B, BN), h)](
            q, k, v, grad_out, lse, delta, mask, dk, dv,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *sm,
            B, d, float(scale), _float32(p), inv_keep, int(key), **common,
        )  # fmt: skip
        _attn_bwd_dq_kernel[(triton.cdiv(B, BM), h)](
            q, k, v, grad_out, lse, delta, mask, dq,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *sm,
            B, d, float(scale), _float32(p), inv_keep, int(key), **common,
        )  # fmt: skip
    return dq, dk, dv


# --------------------------------------------------------------------------- #
# Path selection
# --------------------------------------------------------------------------- #


def explain_path(device, head_dim: int = 64) -> tuple[str, str]:
    """``(path, reason)``: which implementation ``auto`` runs for tensors on ``device``.

    ``path`` is ``ref``, ``sdpa`` or ``triton``. Raises
    :class:`dispatch.KernelUnavailable` when ``BATCHKIN_KERNELS`` forces a path
    that cannot run here.
    """
    device = torch.device(device)
    mode = dispatch.requested_mode()
    if mode == "cpp":
        if device.type == "cpu":
            return "sdpa", "BATCHKIN_KERNELS=cpp: this op's CPU fast path is PyTorch SDPA (no C++ extension)"
        path, why = dispatch.explain("batch_attention", device)  # raises: cpp on a non-CPU device
        return path, why
    path, why = dispatch.explain("batch_attention", device, build=True)
    if path == "triton":
        if head_dim > TRITON_MAX_HEAD_DIM:
            if mode == "triton":
                raise dispatch.KernelUnavailable(
                    f"op 'batch_attention': BATCHKIN_KERNELS=triton but head dim {head_dim} > {TRITON_MAX_HEAD_DIM}"
                )
            return "sdpa", f"head dim {head_dim} > {TRITON_MAX_HEAD_DIM} (Triton limit): blockwise explicit math"
        return "triton", why
    if mode == "ref":
        return "ref", why
    if device.type == "cpu":
        return "sdpa", "CPU fast path: PyTorch SDPA (explicit blockwise math with dropout)"
    return "sdpa", f"{why}; blockwise explicit math"


def _resolve(path: str, device: torch.device, head_dim: int) -> str:
    if path == "auto":
        return explain_path(device, head_dim)[0]
    return path


_FORWARDS = {"sdpa": _sdpa_forward, "triton": _triton_forward}
_BACKWARDS = {"sdpa": _sdpa_backward, "triton": _triton_backward}


# --------------------------------------------------------------------------- #
# Registered custom ops
# --------------------------------------------------------------------------- #


@torch.library.custom_op("batchkin::batch_attention", mutates_args=())
def batch_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    dropout_p: float,
    key: int,
    keep_mask: Optional[Tensor],
    path: str,
) -> tuple[Tensor, Tensor]:
    """Forward: ``(out [h, B, d] in q's dtype, lse [h, B] float32)``.

    ``key``: the 32-bit dropout key (ignored when ``keep_mask`` is given or
    ``dropout_p == 0``); ``path``: ``auto``, ``ref``, ``sdpa`` or ``triton``.
    """
    return _forward_impl(q, k, v, scale, dropout_p, key, keep_mask, path)


def _forward_impl(q, k, v, scale, dropout_p, key, keep_mask, path):
    """The forward of :func:`batch_attention_op` (and of its eager twin :class:`_BatchAttention`)."""
    path = _resolve(path, q.device, q.shape[-1])
    if path == "ref":
        mask = keep_mask
        if dropout_p > 0.0 and mask is None:
            mask = dropout_keep_mask(key, q.shape[0], q.shape[1], dropout_p, q.device)
        return _reference_forward(q, k, v, scale, mask if dropout_p > 0.0 else None, dropout_p)
    return _FORWARDS[path](q, k, v, scale, dropout_p, key, keep_mask)


@batch_attention_op.register_fake
def _(q, k, v, scale, dropout_p, key, keep_mask, path):
    h, B, d = q.shape
    return q.new_empty(h, B, d), q.new_empty(h, B, dtype=torch.float32)


@torch.library.custom_op("batchkin::batch_attention_backward", mutates_args=())
def batch_attention_backward_op(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    dropout_p: float,
    key: int,
    keep_mask: Optional[Tensor],
    path: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward: ``(dq, dk, dv)``, P and the dropout mask recomputed from ``lse`` and ``key``."""
    return _backward_impl(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path)


def _backward_impl(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path):
    """The body of :func:`batch_attention_backward_op` (and of :class:`_BatchAttention`'s backward)."""
    path = _resolve(path, q.device, q.shape[-1])
    if path == "ref":
        mask = keep_mask
        if dropout_p > 0.0 and mask is None:
            mask = dropout_keep_mask(key, q.shape[0], q.shape[1], dropout_p, q.device)
        dq, dk, dv = _reference_backward(grad_out, q, k, v, scale, mask if dropout_p > 0.0 else None, dropout_p)
    else:
        dq, dk, dv = _BACKWARDS[path](grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@batch_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, dropout_p, key, keep_mask, path = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, keep_mask)
    ctx.args = (scale, dropout_p, key, path)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, keep_mask = ctx.saved_tensors
    scale, dropout_p, key, path = ctx.args
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = batch_attention_backward_op(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path)
    return dq, dk, dv, None, None, None, None, None


batch_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _BatchAttention(torch.autograd.Function):
    """Eager twin of :func:`batch_attention_op` with its autograd: the same forward and
    backward bodies, called directly.

    The registered op pays the Python custom-op dispatch (argument normalisation,
    redispatch through autograd and the backend) twice per training step, which is
    a sizeable share of a small layer's time on CPU; eager calls take this class,
    traced calls (``torch.compile``) the op.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, dropout_p, key, keep_mask, path):
        out, lse = _forward_impl(q, k, v, scale, dropout_p, key, keep_mask, path)
        ctx.save_for_backward(q, k, v, out, lse, keep_mask)
        ctx.args = (scale, dropout_p, key, path)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, keep_mask = ctx.saved_tensors
        scale, dropout_p, key, path = ctx.args
        dq, dk, dv = _backward_impl(grad_out, q, k, v, out, lse, scale, dropout_p, key, keep_mask, path)
        return dq, dk, dv, None, None, None, None, None


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


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
        path = "sdpa"  # this op's CPU fast path stands in for a C++ one
    if path not in IMPL_PATHS:
        raise ValueError(f"path must be one of {', '.join(IMPL_PATHS)}; got {path!r}")
    return float(scale), float(dropout_p), path


def batch_attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    dropout_mask: Optional[Tensor] = None,
    path: str = "auto",
) -> Tensor:
    """:func:`batch_attention` on a chosen path (``auto``, ``ref``, ``sdpa``/``cpp``, ``triton``)."""
    scale, dropout_p, path = _check_args(q, k, v, scale, dropout_p, seed, dropout_mask, path)
    key = attention_key(seed) if dropout_p > 0.0 else 0
    mask = dropout_mask
    if mask is None and dropout_p > 0.0 and _materialize_mask(q, path):
        # The blockwise path would hash the mask twice (forward and backward):
        # hash it once here (1 byte per probability), so autograd keeps it.
        h, B, _ = q.shape
        mask = _keep_mask(key, [h, B, B], dropout_p, q.device)
    if torch.compiler.is_compiling():
        return batch_attention_op(q, k, v, scale, dropout_p, key, mask, path)[0]
    return _BatchAttention.apply(q, k, v, scale, dropout_p, key, mask, path)


def _materialize_mask(q: Tensor, path: str) -> bool:
    """Whether the keep mask is built before the op (CPU ``sdpa`` path, mask of at most 64 MiB)."""
    h, B, d = q.shape
    if q.device.type != "cpu" or h * B * B > _MATERIALIZE_MAX or torch.compiler.is_compiling():
        return False
    return _resolve(path, q.device, d) == "sdpa"


def batch_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
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


# --------------------------------------------------------------------------- #
# BatchFormer layer
# --------------------------------------------------------------------------- #

# Counter-RNG streams of a layer's dropouts, folded with the layer's seed:
# the attention probabilities use rng.derive_key(seed) (batch_attention's key).
STREAM_RESIDUAL1 = 1  # on the attention block's output, before the first residual add
STREAM_FFN = 2  # inside the feed-forward block, after the activation
STREAM_RESIDUAL2 = 3  # on the feed-forward block's output, before the second residual add


def layer_dropout_mask(seed: int, stream: int, shape: tuple[int, ...], p: float, device=None) -> Tensor:
    """Keep mask of one of a layer's feature dropouts.

    ``keep.view(-1)[i] = rng.uniform(rng.derive_key(seed, stream), i) >= float32(p)``.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    return _keep_mask(rng.derive_key(seed, stream), list(shape), float(p), device)


def _feature_masks(seed: int, shapes, p: float, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """The scaled keep masks ``keep / (1 - p)`` (values 0 or ``1 / (1 - p)``, ``dtype``) of a
    layer's feature dropouts: ``shapes`` is ``[(stream, shape), ...]``; each mask is
    :func:`layer_dropout_mask` of its stream.

    On CPU (eager) all of them are hashed by one numpy call, the streams' counter
    ranges laid end to end, so several small masks cost about what one does.
    """
    inv_keep = 1.0 / (1.0 - p)
    keys = [rng.derive_key(seed, stream) for stream, _ in shapes]
    sizes = [math.prod(shape) for _, shape in shapes]
    if torch.compiler.is_compiling():
        masks = [keep_mask_op(key, list(shape), float(p), device) for key, (_, shape) in zip(keys, shapes)]
        return [m.to(dtype) * inv_keep for m in masks]
    if device.type == "cpu":
        keep = np.empty(sum(sizes), dtype=np.bool_)
        _hash_segments_cpu(keep, [(key, 0, n) for key, n in zip(keys, sizes)], p)
        masks = torch.from_numpy(np.multiply(keep, np.float32(inv_keep), dtype=np.float32)).to(dtype).split(sizes)
    else:
        masks = [_keep_ranges(key, 0, 0, 1, n, p, device, torch.float32, inv_keep).to(dtype)
                 for key, n in zip(keys, sizes)]  # fmt: skip
    return [m.view(shape) for m, (_, shape) in zip(masks, shapes)]


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 62-bit dropout seed from ``generator`` (the default CPU generator when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


class BatchSelfAttention(nn.Module):
    """Multi-head self-attention over the batch, parameters named as ``nn.MultiheadAttention``'s."""

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"nhead ({num_heads}) must divide d_model ({embed_dim})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        # As nn.MultiheadAttention: xavier-uniform input projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, dropout_p: float = 0.0, seed: int = 0) -> Tensor:
        B, C = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, 3C]
        q, k, v = qkv.view(B, 3, h, d).permute(1, 2, 0, 3)  # each [h, B, d], strided views
        attn = batch_attention(q, k, v, dropout_p=dropout_p, seed=seed)  # [h, B, d]
        attn = attn.transpose(0, 1).reshape(B, C)
        return self.out_proj(attn)


class BatchFormerLayer(nn.Module):
    """Post-norm transformer encoder layer over the batch dimension.

    Computes what ``nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward,
    dropout)`` (ReLU, post-norm) computes on ``x.unsqueeze(1)``, with the same
    parameter names and shapes, so ``load_state_dict`` works both ways::

        x = norm1(x + dropout1(self_attn(x)))
        x = norm2(x + dropout2(linear2(dropout(relu(linear1(x))))))

    Input and output ``[B, C]``. In training mode every dropout (attention
    probabilities, inside the FFN, both residuals) is driven by one seed per
    forward, drawn from ``generator`` (or the default generator when None) or
    given as ``seed``: the attention mask is ``dropout_keep_mask(derive_key(seed),
    ...)`` and the feature masks are :func:`layer_dropout_mask` with the streams
    ``STREAM_RESIDUAL1``, ``STREAM_FFN``, ``STREAM_RESIDUAL2``. Evaluation mode uses
    no dropout (the plugin decides whether the layer runs at all at evaluation).
    """

    def __init__(
        self,
        d_model: int,
        nhead: int = 4,
        dim_feedforward: Optional[int] = None,
        dropout: float = 0.5,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        checks.check_int("d_model", d_model, min_value=1)
        checks.check_int("nhead", nhead, min_value=1)
        if dim_feedforward is None:
            dim_feedforward = d_model
        checks.check_int("dim_feedforward", dim_feedforward, min_value=1)
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1); got {dropout!r}")
        self.d_model = d_model
        self.nhead = nhead
        self.dropout_p = float(dropout)
        self.self_attn = BatchSelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.norm2 = nn.LayerNorm(d_model, eps=layer_norm_eps)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None) -> Tensor:
        checks.check_tensor("x", x, ndim=2, shape=(None, self.d_model), min_numel=1)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        p = self.dropout_p if self.training else 0.0
        if p > 0.0:
            seed = draw_seed(generator) if seed is None else checks.check_int("seed", seed)
        else:
            seed = 0
        sa = self.self_attn(x, dropout_p=p, seed=seed)
        if p <= 0.0:  # evaluation (or dropout 0): no masks
            x = self.norm1(x + sa)
            return self.norm2(x + self.linear2(F.relu(self.linear1(x))))
        B, C = x.shape
        shapes = [(STREAM_RESIDUAL1, (B, C)), (STREAM_FFN, (B, self.linear1.out_features)), (STREAM_RESIDUAL2, (B, C))]
        drop1, drop_ffn, drop2 = _feature_masks(seed, shapes, p, x.device, x.dtype)
        x = self.norm1(torch.addcmul(x, sa, drop1))  # x + dropout1(sa): the residual add fused with the mask
        ff = self.linear2(F.relu(self.linear1(x)) * drop_ffn)
        return self.norm2(torch.addcmul(x, ff, drop2))


class BatchFormer(nn.Module):
    """A stack of ``num_layers`` :class:`BatchFormerLayer` (the encoder; no eval-time bypass).

    ``forward(x, generator=None, *, seed=None)``: with ``seed``, layer ``i`` uses
    the seed ``rng.derive_key(seed, i)``; otherwise each layer draws its own from
    ``generator``.
    """

    def __init__(
        self,
        d_model: int,
        num_layers: int = 1,
        nhead: int = 4,
        dim_feedforward: Optional[int] = None,
        dropout: float = 0.5,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        checks.check_int("num_layers", num_layers, min_value=1)
        self.layers = nn.ModuleList(
            BatchFormerLayer(d_model, nhead, dim_feedforward, dropout, layer_norm_eps) for _ in range(num_layers)
        )

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None, *, seed: Optional[int] = None) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, generator, seed=None if seed is None else rng.derive_key(seed, i))
        return x
