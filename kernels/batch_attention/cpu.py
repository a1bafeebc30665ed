"""Batch attention's ``sdpa`` path: PyTorch's fused CPU attention without dropout, explicit
blockwise math with the seeded mask otherwise (and on devices Triton does not take)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..rng_mask import keep_ranges

# Elements of one row block of scores in the explicit path (its temporaries are
# a few blocks of float32): 16 MiB blocks on CPU, 256 MiB on other devices.
_CPU_BLOCK_ELEMS = 1 << 22
_DEVICE_BLOCK_ELEMS = 1 << 26


def keep_rows(key: int, h: int, B: int, r0: int, r1: int, p: float, device, dtype=torch.bool) -> Tensor:
    """Attention keep mask rows ``r0:r1`` of every head: ``[h, r1 - r0, B]``."""
    return keep_ranges(key, r0 * B, B * B, h, (r1 - r0) * B, p, device, dtype).view(h, r1 - r0, B)


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
    return keep_rows(key, h, B, r0, r1, p, device, torch.float32)


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


def sdpa_forward(q, k, v, scale, p, key, keep_mask):
    """``(out, lse)``: the fused kernel on CPU without dropout, blockwise explicit math otherwise."""
    if p == 0.0 and q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), 0.0, False, scale=scale
        )
        return out.squeeze(0).contiguous(), lse.squeeze(0).float().contiguous()
    return _explicit_forward(q, k, v, scale, p, key, keep_mask)


def sdpa_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask):
    """``(dq, dk, dv)`` of :func:`sdpa_forward` (P recomputed from ``lse``)."""
    if p == 0.0 and q.device.type == "cpu":
        args = (grad_out.contiguous(), q, k, v, out.contiguous(), lse)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            *(t.unsqueeze(0) for t in args), 0.0, False, scale=scale
        )
        return dq.squeeze(0).contiguous(), dk.squeeze(0).contiguous(), dv.squeeze(0).contiguous()
    return _explicit_backward(grad_out, q, k, v, out, lse, scale, p, key, keep_mask)
