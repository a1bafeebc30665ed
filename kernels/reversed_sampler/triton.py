"""The reversed class sampler's Triton kernel (binary search over the float64 cdf) and its launcher."""

from __future__ import annotations

import torch

from .. import dispatch, rng

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms
    triton = None

#: Draws per Triton program.
TRITON_BLOCK = 1024

if triton is not None:
    from ..rng_triton import tl_uniform

    @triton.jit(do_not_specialize=["key"])  # the key is a runtime uint32 even when it equals 1
    def _sampler_kernel(
        out_ptr, idx_ptr, off_ptr, cnt_ptr, cdf_ptr, uc_ptr, ui_ptr, C, n_iter, key, start, n,
        BLOCK: tl.constexpr, FROM_UNIFORMS: tl.constexpr,
    ):  # fmt: skip
        """Indices of draws ``start + j`` (uniforms hashed from ``key``), or of the given uniforms."""
        j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < n
        if FROM_UNIFORMS:
            u_class = tl.load(uc_ptr + j, mask=mask, other=0.0)
            u_inst = tl.load(ui_ptr + j, mask=mask, other=0.0)
        else:
            draw = start + j
            u_class = tl_uniform(key, 2 * draw)
            u_inst = tl_uniform(key, 2 * draw + 1)
        # class: binary search of the float64 cdf in a fixed n_iter steps
        u = u_class.to(tl.float64)
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = lo + C
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(cdf_ptr + mid, mask=mask & active, other=0.0)
            lo = tl.where(active & (v <= u), mid + 1, lo)
            hi = tl.where(active & (v > u), mid, hi)
        cls = tl.minimum(lo, C - 1)
        n_c = tl.load(cnt_ptr + cls, mask=mask, other=1)
        inst = (u_inst.to(tl.float64) * n_c.to(tl.float64)).to(tl.int64)  # truncation == floor once >= 0
        inst = tl.minimum(tl.maximum(inst, 0), n_c - 1)
        base = tl.load(off_ptr + cls, mask=mask, other=0)
        tl.store(out_ptr + j, tl.load(idx_ptr + base + inst, mask=mask, other=0), mask=mask)


def reversed_sampler_triton_launch(sorted_indices, offsets, counts, cdf, n: int, *, key: int = 0, start: int = 0,
                                   uniforms=None) -> torch.Tensor:  # fmt: skip
    """``n`` indices: draws ``start .. start + n - 1`` of key ``key``, or those of ``uniforms``
    (``(u_class, u_inst)``, widened to float64: the kernel compares in float64 like the other paths)."""
    device = sorted_indices.device
    ok, why = dispatch.triton_can_run(device)
    if not ok or triton is None:
        raise dispatch.KernelUnavailable(f"op 'reversed_sampler': the Triton path cannot run here ({why})")
    out = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return out
    uc, ui = (out, out) if uniforms is None else (u.to(torch.float64).contiguous() for u in uniforms)
    C = cdf.numel()
    args = (out, sorted_indices.contiguous(), offsets.contiguous(), counts.contiguous(), cdf.contiguous(), uc, ui,
            C, C.bit_length(), int(key) & rng.MASK32, start, n)  # fmt: skip
    meta = dict(BLOCK=TRITON_BLOCK, FROM_UNIFORMS=uniforms is not None)
    if device.type == "cuda":
        with torch.cuda.device(device):
            _sampler_kernel[(triton.cdiv(n, TRITON_BLOCK),)](*args, **meta, num_warps=4)
    else:
        _sampler_kernel[(triton.cdiv(n, TRITON_BLOCK),)](*args, **meta)
    return out
