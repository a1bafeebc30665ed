"""DRLoc pair sampling's Triton kernels (draw, gathers, fused draw + gather + targets, scatter) and launchers."""

from __future__ import annotations

import torch

from .. import dispatch
from .reference import grid_grad_shape

try:  # Triton is optional: the kernels below are only defined where it imports
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms
    triton = None

if triton is not None:
    from ..rng_triton import tl_uniform

    @triton.jit
    def _pair_tile(N, NCH, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's pairs ``n`` and channels ``k``, with their bounds masks."""
        n = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        k = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        return n, k, n < N, k < NCH

    @triton.jit
    def _load_pair(grid_ptr, b, ra, ca, rb, cb, OFF_B, k, mask, s_b, s_c, s_h, s_w):
        """Channels ``k`` of both members of the pairs (the ``b`` member's from channel ``OFF_B`` on)."""
        kc = k.to(tl.int64)[None, :] * s_c
        base_a = b * s_b + ra * s_h + ca * s_w
        base_b = b * s_b + rb * s_h + cb * s_w + OFF_B * s_c
        va = tl.load(grid_ptr + base_a[:, None] + kc, mask=mask, other=0)
        return va, tl.load(grid_ptr + base_b[:, None] + kc, mask=mask, other=0)

    @triton.jit
    def _scatter_member(base, pos_ptr, g_ptr, b, m, W, k, km, COL: tl.constexpr, off, o_p, o_c, s_b, s_m, s_c):
        """Add the gradients of one member (position columns ``COL``, ``COL + 1``) in pair order."""
        for j in range(0, m):
            pj = pos_ptr + (b * m + j) * 4 + COL
            p = tl.load(pj) * W + tl.load(pj + 1)
            g = tl.load(g_ptr + b * s_b + j * s_m + k * s_c, mask=km, other=0).to(tl.float32)
            tl.atomic_add(base + p * o_p + (k + off) * o_c, g, mask=km, sem="relaxed")

    # The key and the sizes are never specialised (a key or a size equal to 1 would otherwise
    # become a compile-time constant and a separate compilation).
    @triton.jit(do_not_specialize=["total", "H", "W", "key"])
    def _drloc_positions_kernel(pos_ptr, total, H, W, key, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        t = offs % 4
        size = tl.where(t % 2 == 0, H, W)
        u = tl_uniform(key, offs)
        v = (u * size.to(tl.float32)).to(tl.int32)
        v = tl.minimum(v, size - 1)
        tl.store(pos_ptr + offs, v.to(tl.int64), mask=mask)

    @triton.jit(do_not_specialize=["N", "m", "H", "W"])
    def _drloc_gather_kernel(
        grid_ptr, pos_ptr, ea_ptr, eb_ptr, bias_ptr,
        N, m, NCH, OFF_B, H, W, O_STRIDE,
        s_b, s_c, s_h, s_w,
        SUM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, k, nm, km = _pair_tile(N, NCH, BLOCK_P, BLOCK_C)
        # clamped so that a bad position can never address memory outside the grid
        ra = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 0, mask=nm, other=0), 0), H - 1)
        ca = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 1, mask=nm, other=0), 0), W - 1)
        rb = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 2, mask=nm, other=0), 0), H - 1)
        cb = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 3, mask=nm, other=0), 0), W - 1)
        mask = nm[:, None] & km[None, :]
        va, vb = _load_pair(grid_ptr, n // m, ra, ca, rb, cb, OFF_B, k, mask, s_b, s_c, s_h, s_w)
        out = n[:, None] * O_STRIDE + k[None, :]
        if SUM:
            s = va.to(tl.float32) + vb.to(tl.float32)  # upcast: the interpreter's bf16 math is wrong
            if HAS_BIAS:
                s = s + tl.load(bias_ptr + k, mask=km, other=0).to(tl.float32)[None, :]
            tl.store(ea_ptr + out, s.to(ea_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ea_ptr + out, va, mask=mask)
            tl.store(eb_ptr + out, vb, mask=mask)

    @triton.jit
    def _drloc_target(a, b, size_m1, denom, SIGNED: tl.constexpr, NORMALIZE: tl.constexpr):
        d = a - b
        if SIGNED:
            t = d + size_m1
        else:
            t = tl.abs(d)
        f = t.to(tl.float32)
        if NORMALIZE:
            f = tl.math.div_rn(f, denom)
        return f

    @triton.jit(do_not_specialize=["N", "m", "H", "W", "key"])
    def _drloc_pairs_kernel(
        grid_ptr, ea_ptr, eb_ptr, tgt_ptr, pos_ptr,
        N, m, C, H, W, Hf, Wf, denom_h, denom_w, key,
        s_b, s_c, s_h, s_w,
        SIGNED: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n, k, nm, km = _pair_tile(N, C, BLOCK_P, BLOCK_C)
        off = n * 4
        ra = tl.minimum((tl_uniform(key, off + 0) * Hf).to(tl.int32), H - 1).to(tl.int64)
        ca = tl.minimum((tl_uniform(key, off + 1) * Wf).to(tl.int32), W - 1).to(tl.int64)
        rb = tl.minimum((tl_uniform(key, off + 2) * Hf).to(tl.int32), H - 1).to(tl.int64)
        cb = tl.minimum((tl_uniform(key, off + 3) * Wf).to(tl.int32), W - 1).to(tl.int64)
        if tl.program_id(1) == 0:  # one column of programs writes the positions and targets
            tl.store(pos_ptr + off + 0, ra, mask=nm)
            tl.store(pos_ptr + off + 1, ca, mask=nm)
            tl.store(pos_ptr + off + 2, rb, mask=nm)
            tl.store(pos_ptr + off + 3, cb, mask=nm)
            tl.store(tgt_ptr + n * 2 + 0, _drloc_target(ra, rb, H - 1, denom_h, SIGNED, NORMALIZE), mask=nm)
            tl.store(tgt_ptr + n * 2 + 1, _drloc_target(ca, cb, W - 1, denom_w, SIGNED, NORMALIZE), mask=nm)
        mask = nm[:, None] & km[None, :]
        va, vb = _load_pair(grid_ptr, n // m, ra, ca, rb, cb, 0, k, mask, s_b, s_c, s_h, s_w)
        out = n[:, None] * C + k[None, :]
        tl.store(ea_ptr + out, va, mask=mask)
        tl.store(eb_ptr + out, vb, mask=mask)

    @triton.jit(do_not_specialize=["m", "W"])
    def _drloc_scatter_kernel(
        acc_ptr, ga_ptr, gb_ptr, pos_ptr,
        m, NCH, OFF_B, W,
        o_b, o_p, o_c,
        a_sb, a_sm, a_sc, b_sb, b_sm, b_sc,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # One program owns the float32 accumulator of (image b, a block of channels) and
        # adds its terms in a fixed order: deterministic, no cross-program races.
        b = tl.program_id(0).to(tl.int64)
        k = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        km = k < NCH
        base = acc_ptr + b * o_b
        _scatter_member(base, pos_ptr, ga_ptr, b, m, W, k, km, 0, 0, o_p, o_c, a_sb, a_sm, a_sc)
        _scatter_member(base, pos_ptr, gb_ptr, b, m, W, k, km, 2, OFF_B, o_p, o_c, b_sb, b_sm, b_sc)


def _require_triton() -> None:
    if triton is None:
        raise dispatch.KernelUnavailable("op 'drloc_pairs': triton cannot be imported")


def _blocks(nch: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): about 4096 elements per tile."""
    block_c = min(256, triton.next_power_of_2(max(int(nch), 1)))
    return max(1, 4096 // block_c), block_c


def positions_triton(B, m, H, W, key, device) -> torch.Tensor:
    _require_triton()
    pos = torch.empty(B, m, 4, dtype=torch.int64, device=device)
    total = B * m * 4
    block = 1024
    _drloc_positions_kernel[(triton.cdiv(total, block),)](pos, total, H, W, key, BLOCK=block)
    return pos


def gather_triton(grid, pos, nch, off_b, kind, bias=None):
    """``kind``: ``pair`` -> (e_a, e_b); ``cat`` -> [B, m, 2 * nch]; ``sum`` -> e_a + e_b (+ bias)."""
    _require_triton()
    B, _, H, W = grid.shape
    m = pos.shape[1]
    pos = pos.contiguous()
    width = 2 * nch if kind == "cat" else nch
    e_a = torch.empty(B, m, width, dtype=grid.dtype, device=grid.device)
    if kind == "pair":
        e_b = torch.empty_like(e_a)
    else:
        e_b = e_a[..., nch:] if kind == "cat" else e_a  # (unused by the sum)
    N = B * m
    bp, bc = _blocks(nch)
    launch = (triton.cdiv(N, bp), triton.cdiv(nch, bc))
    _drloc_gather_kernel[launch](
        grid, pos, e_a, e_b, e_a if bias is None else bias.contiguous(),
        N, m, nch, off_b, H, W, width, *grid.stride(),
        SUM=kind == "sum", HAS_BIAS=bias is not None, BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    return e_a, e_b


def pairs_triton(grid, m, key, signed_mode, normalize):
    _require_triton()
    B, C, H, W = grid.shape
    e_a = torch.empty(B, m, C, dtype=grid.dtype, device=grid.device)
    e_b = torch.empty_like(e_a)
    tgt = torch.empty(B, m, 2, dtype=torch.float32, device=grid.device)
    pos = torch.empty(B, m, 4, dtype=torch.int64, device=grid.device)
    N = B * m
    bp, bc = _blocks(C)
    launch = (triton.cdiv(N, bp), triton.cdiv(C, bc))
    _drloc_pairs_kernel[launch](
        grid, e_a, e_b, tgt, pos,
        N, m, C, H, W, float(H), float(W), float(max(H - 1, 1)), float(max(W - 1, 1)), key,
        *grid.stride(),
        SIGNED=signed_mode, NORMALIZE=normalize, BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    return e_a, e_b, tgt, pos


def scatter_triton(grad_a, grad_b, pos, channels, H, W, off_b, channels_last):
    _require_triton()
    B, m, nch = grad_a.shape
    pos = pos.contiguous()
    acc = torch.zeros(grid_grad_shape(B, channels, H, W, channels_last), dtype=torch.float32, device=grad_a.device)
    HW = H * W
    o_b, o_p, o_c = (HW * channels, channels, 1) if channels_last else (HW * channels, 1, HW)
    block_c = min(256, triton.next_power_of_2(max(nch, 1)))
    _drloc_scatter_kernel[(B, triton.cdiv(nch, block_c))](
        acc, grad_a, grad_b, pos, m, nch, off_b, W, o_b, o_p, o_c,
        *grad_a.stride(), *grad_b.stride(), BLOCK_C=block_c,
    )  # fmt: skip
    return acc if grad_a.dtype == torch.float32 else acc.to(grad_a.dtype)
