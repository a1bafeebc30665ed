"""In-batch mixing's Triton kernel (one program per image plane and block of pixels) and its launcher."""

from __future__ import annotations

import torch

from .. import dispatch
from .reference import as_views

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

if triton is not None:

    # the sizes stay runtime scalars (a size of 1 would otherwise become a constexpr)
    @triton.jit(do_not_specialize=["B", "C", "H", "W", "HW"])
    def _batch_mix_kernel(
        x_ptr, out_ptr, op_ptr, lam_ptr, box_ptr, lam_eff_ptr, B, C, H, W, HW,
        IS_UINT8: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        # program (plane, block): plane = (v*B + b)*C + c, block = BLOCK elements of that plane
        plane = tl.program_id(0)
        blk = tl.program_id(1)
        c = plane % C
        vb = plane // C
        b = vb % B
        v = vb // B
        p = B - 1 - b
        code = tl.load(op_ptr + b)
        lam = tl.load(lam_ptr + b)
        by = tl.load(box_ptr + vb * 4 + 0).to(tl.int32)
        bx = tl.load(box_ptr + vb * 4 + 1).to(tl.int32)
        bh = tl.load(box_ptr + vb * 4 + 2).to(tl.int32)
        bw = tl.load(box_ptr + vb * 4 + 3).to(tl.int32)

        offs = blk * BLOCK + tl.arange(0, BLOCK)
        valid = offs < HW
        yy = offs // W
        xx = offs - yy * W
        inbox = (yy >= by) & (yy < by + bh) & (xx >= bx) & (xx < bx + bw)
        own_ptr = x_ptr + plane.to(tl.int64) * HW
        prt_ptr = x_ptr + ((v * B + p) * C + c).to(tl.int64) * HW

        if code == 0:  # mixup
            a = tl.load(own_ptr + offs, mask=valid, other=0).to(tl.float32)
            q = tl.load(prt_ptr + offs, mask=valid, other=0).to(tl.float32)
            res = lam * a + (1.0 - lam) * q
        elif code == 1:  # cutmix: every pixel is read once, from x_i or from the partner
            a = tl.load(own_ptr + offs, mask=valid & ~inbox, other=0).to(tl.float32)
            q = tl.load(prt_ptr + offs, mask=valid & inbox, other=0).to(tl.float32)
            res = tl.where(inbox, q, a)
        else:  # resizemix: F.interpolate's source index, align_corners=False
            a = tl.load(own_ptr + offs, mask=valid & ~inbox, other=0).to(tl.float32)
            scale_y = tl.math.div_rn(H.to(tl.float32), tl.maximum(bh, 1).to(tl.float32))
            scale_x = tl.math.div_rn(W.to(tl.float32), tl.maximum(bw, 1).to(tl.float32))
            sy = tl.maximum(scale_y * ((yy - by).to(tl.float32) + 0.5) - 0.5, 0.0)
            sx = tl.maximum(scale_x * ((xx - bx).to(tl.float32) + 0.5) - 0.5, 0.0)
            ylo = tl.minimum(sy.to(tl.int32), H - 1)
            xlo = tl.minimum(sx.to(tl.int32), W - 1)
            fy = tl.minimum(tl.maximum(sy - ylo.to(tl.float32), 0.0), 1.0)
            fx = tl.minimum(tl.maximum(sx - xlo.to(tl.float32), 0.0), 1.0)
            yhi = tl.where(ylo < H - 1, ylo + 1, ylo)
            xhi = tl.where(xlo < W - 1, xlo + 1, xlo)
            m = valid & inbox
            q00 = tl.load(prt_ptr + ylo * W + xlo, mask=m, other=0).to(tl.float32)
            q01 = tl.load(prt_ptr + ylo * W + xhi, mask=m, other=0).to(tl.float32)
            q10 = tl.load(prt_ptr + yhi * W + xlo, mask=m, other=0).to(tl.float32)
            q11 = tl.load(prt_ptr + yhi * W + xhi, mask=m, other=0).to(tl.float32)
            top = q00 * (1.0 - fx) + q01 * fx
            bot = q10 * (1.0 - fx) + q11 * fx
            res = tl.where(inbox, top * (1.0 - fy) + bot * fy, a)
        if IS_UINT8:
            res = tl.minimum(tl.maximum(tl.floor(res + 0.5), 0.0), 255.0)
        tl.store(out_ptr + plane.to(tl.int64) * HW + offs, res.to(out_ptr.dtype.element_ty), mask=valid)

        if (blk == 0) & (c == 0):
            area = bh * bw
            from_box = ((HW - area).to(tl.float64) / HW.to(tl.float64)).to(tl.float32)
            tl.store(lam_eff_ptr + vb, tl.where(code == 0, lam, from_box))


def batch_mix_triton(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    if triton is None:
        raise dispatch.KernelUnavailable("batch_mix: triton is not importable")
    xv = as_views(x).contiguous()
    V, B, C, H, W = xv.shape
    out = torch.empty_like(xv)
    lam_eff = torch.empty(V, B, dtype=torch.float32, device=x.device)
    if xv.numel() > 0:
        HW = H * W
        block = min(1024, triton.next_power_of_2(HW))
        grid = (V * B * C, triton.cdiv(HW, block))
        _batch_mix_kernel[grid](
            xv, out, op.contiguous(), lam.contiguous(), boxes.contiguous(), lam_eff, B, C, H, W, HW,
            IS_UINT8=x.dtype == torch.uint8, BLOCK=block, num_warps=4 if block >= 512 else 1,
            enable_fp_fusion=False,  # separate multiply and add roundings, as the reference and the C++ path
        )  # fmt: skip
    return out.view(x.shape), lam_eff
