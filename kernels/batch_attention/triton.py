"""Batch attention's Triton kernels (flash-attention-2 style) and their launchers.

The forward keeps an online softmax per query block and stores the row logsumexp; the
backward computes ``delta = rowsum(dO * O)``, then dK/dV (one program per key block)
and dQ (one program per query block), recomputing P and the dropout mask tile by tile.
``q``, ``k`` and ``v`` share one layout (any strides: the layer passes views of one
projection); ``out``, ``grad_out``, the gradients and an explicit mask are contiguous.
"""

from __future__ import annotations

import contextlib

import torch

from .. import dispatch
from ..rng_mask import float32

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms
    triton = None

MAX_HEAD_DIM = dispatch.REGISTRY["batch_attention"].triton_limits["head_dim"]

if triton is not None:
    from ..rng_triton import tl_uniform

    @triton.jit
    def _rows(start, BLOCK: tl.constexpr, B, offs_d, D):
        """Rows ``start .. start + BLOCK - 1``: offsets, which are ``< B``, and the mask of their tile."""
        offs = start + tl.arange(0, BLOCK)
        ok = offs < B
        return offs, ok, ok[:, None] & (offs_d < D)[None, :]

    @triton.jit
    def _load_qkv(PTR, head, s_h, s_b, s_d, offs_b, offs_d, ok):
        """The tile ``[offs_b, offs_d]`` of head ``head`` of q, k or v, as float32 (0 where not ``ok``)."""
        ptrs = PTR + head * s_h + offs_b[:, None] * s_b + offs_d[None, :] * s_d
        return tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)

    @triton.jit
    def _load_kv(K, V, head, s_h, s_b, s_d, offs_n, offs_d, ok):
        """The key and value tiles of rows ``offs_n``."""
        k = _load_qkv(K, head, s_h, s_b, s_d, offs_n, offs_d, ok)
        return k, _load_qkv(V, head, s_h, s_b, s_d, offs_n, offs_d, ok)

    @triton.jit
    def _tile(head, B, D, offs_b, offs_d):
        """Element offsets of a tile of a contiguous ``[h, B, D]`` tensor."""
        return (head * B + offs_b[:, None]) * D + offs_d[None, :]

    @triton.jit
    def _load_query_rows(Q, DO, LSE, DELTA, head, s_h, s_b, s_d, B, D, offs_m, offs_d, m_ok, q_ok):
        """What the backward needs of query rows ``offs_m``: ``q``, ``dO``, the logsumexp and ``delta``."""
        q = _load_qkv(Q, head, s_h, s_b, s_d, offs_m, offs_d, q_ok)
        do = tl.load(DO + _tile(head, B, D, offs_m, offs_d), mask=q_ok, other=0.0).to(tl.float32)
        lse = tl.load(LSE + head * B + offs_m, mask=m_ok, other=0.0)
        return q, do, lse, tl.load(DELTA + head * B + offs_m, mask=m_ok, other=0.0)

    @triton.jit
    def _keep_block(MASK, head, offs_m, offs_n, B, key, dropout_p, HAS_MASK: tl.constexpr):
        """Keep mask of one tile: loaded from the ``[h, B, B]`` mask, or hashed from ``(key, offset)``."""
        offsets = (head.to(tl.int64) * B + offs_m[:, None]) * B + offs_n[None, :]
        if HAS_MASK:
            ok = (offs_m[:, None] < B) & (offs_n[None, :] < B)
            keep = tl.load(MASK + offsets, mask=ok, other=0) != 0
        else:
            keep = tl_uniform(key, offsets) >= dropout_p  # the hash takes the offset mod 2**32
        return keep

    @triton.jit
    def _bwd_tile(
        q, kb, vb, do, lse, delta, MASK, head, offs_m, offs_n, m_ok, n_ok,
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
            keep = _keep_block(MASK, head, offs_m, offs_n, B, key, dropout_p, HAS_MASK)
            pd = tl.where(keep, pr * inv_keep, 0.0)
            dp = tl.where(keep, dp * inv_keep, 0.0)
        else:
            pd = pr
        ds = pr * (dp - delta[:, None])
        return pd, ds

    @triton.jit(do_not_specialize=["key"])  # a key equal to 1 must stay a runtime value
    def _attn_fwd_kernel(
        Q, K, V, O, LSE, MASK, s_h, s_b, s_d, B, D, scale, dropout_p, inv_keep, key,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        head, offs_d = tl.program_id(1), tl.arange(0, BLOCK_D)
        offs_m, m_ok, q_ok = _rows(tl.program_id(0) * BLOCK_M, BLOCK_M, B, offs_d, D)
        q = _load_qkv(Q, head, s_h, s_b, s_d, offs_m, offs_d, q_ok)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, B, BLOCK_N):
            offs_n, n_ok, kv_ok = _rows(start_n, BLOCK_N, B, offs_d, D)
            kb, vb = _load_kv(K, V, head, s_h, s_b, s_d, offs_n, offs_d, kv_ok)
            s = tl.dot(q, tl.trans(kb), input_precision="ieee") * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp(m_i - m_new)
            pr = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(pr, 1)  # normaliser over the undropped probabilities
            if DROPOUT:
                keep = _keep_block(MASK, head, offs_m, offs_n, B, key, dropout_p, HAS_MASK)
                pr = tl.where(keep, pr, 0.0)
            acc = acc * alpha[:, None] + tl.dot(pr, vb, input_precision="ieee")
            m_i = m_new
        acc = acc / l_i[:, None]
        if DROPOUT:
            acc = acc * inv_keep
        tl.store(O + _tile(head, B, D, offs_m, offs_d), acc.to(O.dtype.element_ty), mask=q_ok)
        tl.store(LSE + head * B + offs_m, m_i + tl.log(l_i), mask=m_ok)

    @triton.jit
    def _attn_bwd_preprocess_kernel(O, DO, DELTA, B, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        head, offs_d = tl.program_id(1), tl.arange(0, BLOCK_D)
        offs_m, m_ok, ok = _rows(tl.program_id(0) * BLOCK_M, BLOCK_M, B, offs_d, D)
        tile = _tile(head, B, D, offs_m, offs_d)
        o = tl.load(O + tile, mask=ok, other=0.0).to(tl.float32)
        do = tl.load(DO + tile, mask=ok, other=0.0).to(tl.float32)
        tl.store(DELTA + head * B + offs_m, tl.sum(o * do, 1), mask=m_ok)

    @triton.jit(do_not_specialize=["key"])
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, MASK, DK, DV, s_h, s_b, s_d, B, D, scale, dropout_p, inv_keep, key,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        head, offs_d = tl.program_id(1), tl.arange(0, BLOCK_D)
        offs_n, n_ok, kv_ok = _rows(tl.program_id(0) * BLOCK_N, BLOCK_N, B, offs_d, D)
        kb, vb = _load_kv(K, V, head, s_h, s_b, s_d, offs_n, offs_d, kv_ok)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, B, BLOCK_M):
            offs_m, m_ok, q_ok = _rows(start_m, BLOCK_M, B, offs_d, D)
            q, do, lse, delta = _load_query_rows(
                Q, DO, LSE, DELTA, head, s_h, s_b, s_d, B, D, offs_m, offs_d, m_ok, q_ok
            )
            pd, ds = _bwd_tile(
                q, kb, vb, do, lse, delta, MASK, head, offs_m, offs_n, m_ok, n_ok,
                B, scale, dropout_p, inv_keep, key, DROPOUT, HAS_MASK,
            )  # fmt: skip
            dv += tl.dot(tl.trans(pd), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        tile = _tile(head, B, D, offs_n, offs_d)
        tl.store(DK + tile, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
        tl.store(DV + tile, dv.to(DV.dtype.element_ty), mask=kv_ok)

    @triton.jit(do_not_specialize=["key"])
    def _attn_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, MASK, DQ, s_h, s_b, s_d, B, D, scale, dropout_p, inv_keep, key,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        DROPOUT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):  # fmt: skip
        head, offs_d = tl.program_id(1), tl.arange(0, BLOCK_D)
        offs_m, m_ok, q_ok = _rows(tl.program_id(0) * BLOCK_M, BLOCK_M, B, offs_d, D)
        q, do, lse, delta = _load_query_rows(Q, DO, LSE, DELTA, head, s_h, s_b, s_d, B, D, offs_m, offs_d, m_ok, q_ok)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, B, BLOCK_N):
            offs_n, n_ok, kv_ok = _rows(start_n, BLOCK_N, B, offs_d, D)
            kb, vb = _load_kv(K, V, head, s_h, s_b, s_d, offs_n, offs_d, kv_ok)
            _, ds = _bwd_tile(
                q, kb, vb, do, lse, delta, MASK, head, offs_m, offs_n, m_ok, n_ok,
                B, scale, dropout_p, inv_keep, key, DROPOUT, HAS_MASK,
            )  # fmt: skip
            dq += tl.dot(ds, kb, input_precision="ieee")
        tl.store(DQ + _tile(head, B, D, offs_m, offs_d), (dq * scale).to(DQ.dtype.element_ty), mask=q_ok)


def _blocks(d: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_stages) for head dim ``d``.

    Two pipeline stages use at most ~82 KB of shared memory for d <= 128 but ~135 KB at
    d = 256, so d = 256 runs with one stage (room on GPUs with less shared memory).
    """
    block_d = max(16, triton.next_power_of_2(d))
    block = 64 if block_d <= 64 else 32
    return block, block, block_d, (2 if block_d <= 128 else 1)


def _launch_args(q, k, v, scale, p, key, keep_mask):
    """What every launch shares: ``(q, k, v, mask, scalars, meta)``.

    ``q``, ``k``, ``v`` in one layout (copied when their strides differ), the mask as
    contiguous bytes (any tensor when there is none: never read), the kernels' scalar
    arguments ``(s_h, s_b, s_d, B, D, scale, dropout_p, inv_keep, key)`` and their
    compile-time and launch options.
    """
    if triton is None:
        raise dispatch.KernelUnavailable("op 'batch_attention': triton cannot be imported")
    h, B, d = q.shape
    if d > MAX_HEAD_DIM:
        raise dispatch.KernelUnavailable(
            f"op 'batch_attention': the Triton kernel takes head dims up to {MAX_HEAD_DIM}; got {d}"
        )
    if not q.stride() == k.stride() == v.stride():
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    mask = q if keep_mask is None else keep_mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    dropout = p > 0.0
    scalars = (*q.stride(), B, d, float(scale), float32(p), 1.0 / (1.0 - p) if dropout else 1.0, int(key))
    bm, bn, bd, stages = _blocks(d)
    meta = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, DROPOUT=dropout, HAS_MASK=keep_mask is not None,
                num_warps=4, num_stages=stages)  # fmt: skip
    return q, k, v, mask, scalars, meta


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def triton_forward(q, k, v, scale, p, key, keep_mask):
    """``(out, lse)`` from the Triton forward kernel."""
    q, k, v, mask, scalars, meta = _launch_args(q, k, v, scale, p, key, keep_mask)
    h, B, d = q.shape
    out = torch.empty(h, B, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(h, B, dtype=torch.float32, device=q.device)
    with _device_guard(q):
        _attn_fwd_kernel[(triton.cdiv(B, meta["BLOCK_M"]), h)](q, k, v, out, lse, mask, *scalars, **meta)
    return out, lse


def triton_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask):
    """``(dq, dk, dv)`` from the Triton backward kernels."""
    q, k, v, mask, scalars, meta = _launch_args(q, k, v, scale, p, key, keep_mask)
    h, B, d = q.shape
    grad_out, out, lse = grad_out.contiguous(), out.contiguous(), lse.contiguous()
    delta = torch.empty(h, B, dtype=torch.float32, device=q.device)
    dq, dk, dv = (torch.empty(h, B, d, dtype=q.dtype, device=q.device) for _ in range(3))
    rows, cols = triton.cdiv(B, meta["BLOCK_M"]), triton.cdiv(B, meta["BLOCK_N"])
    with _device_guard(q):
        _attn_bwd_preprocess_kernel[(rows, h)](
            out, grad_out, delta, B, d, BLOCK_M=meta["BLOCK_M"], BLOCK_D=meta["BLOCK_D"],
            num_warps=meta["num_warps"], num_stages=meta["num_stages"],
        )  # fmt: skip
        _attn_bwd_dkdv_kernel[(cols, h)](q, k, v, grad_out, lse, delta, mask, dk, dv, *scalars, **meta)
        _attn_bwd_dq_kernel[(rows, h)](q, k, v, grad_out, lse, delta, mask, dq, *scalars, **meta)
    return dq, dk, dv
