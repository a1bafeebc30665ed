"""In-batch mixing in plain PyTorch: the loop reference (the definition) and a vectorised one."""

from __future__ import annotations

import torch

from .params import CUTMIX, MIXUP, RESIZEMIX


def as_views(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` as one view ``[1, B, C, H, W]``; views unchanged."""
    return x if x.dim() == 5 else x.unsqueeze(0)


def from_float(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 result to the image dtype (uint8: ``floor(v + 0.5)``, clamped to [0, 255])."""
    if dtype == torch.uint8:
        return torch.floor(v + 0.5).clamp_(0, 255).to(torch.uint8)
    return v.to(dtype)


def lam_eff_from_boxes(op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``lam`` for mixup, ``(H*W - h*w) / (H*W)`` (float64, rounded to float32) otherwise."""
    area = boxes[..., 2] * boxes[..., 3]
    from_box = ((H * W - area).to(torch.float64) / (H * W)).to(torch.float32)
    return torch.where(op.view(1, -1) == MIXUP, lam.to(torch.float32).view(1, -1), from_box)


def linear_taps(d: torch.Tensor, size: torch.Tensor, n: int):
    """Source taps of output coordinates ``d`` of an axis of length ``n`` resized to ``size``
    (bilinear, ``align_corners=False``, as ATen computes them), in float32 with one rounding
    per operation: ``scale = n / size``, ``src = max(scale * (d + 0.5) - 0.5, 0)``,
    ``lo = min(floor(src), n - 1)``, ``hi = min(lo + 1, n - 1)``, ``frac = clamp(src - lo, 0, 1)``.

    ``d`` (integers) and ``size`` broadcast; returns ``lo, hi`` (int64) and ``frac`` (float32).
    """
    size = size.clamp(min=1).to(torch.float32)
    scale = torch.full_like(size, n) / size  # a true float32 division (``n / size`` multiplies by a reciprocal)
    src = (scale * (d.to(torch.float32) + 0.5) - 0.5).clamp(min=0)
    lo = src.to(torch.int64).clamp(max=n - 1)
    frac = (src - lo.to(torch.float32)).clamp(0, 1)
    return lo, (lo + 1).clamp(max=n - 1), frac


def resize_bilinear(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``img`` (float32 ``[C, H, W]``) resized to ``[C, h, w]``: each source row resized
    horizontally, then the two rows blended (ATen's order), every product and sum rounded
    to float32. ``F.interpolate(mode="bilinear", align_corners=False)`` computes the same
    formula but may fuse multiply-adds, so it can differ in the last bit."""
    _, H, W = img.shape
    dev = img.device
    ylo, yhi, fy = linear_taps(torch.arange(h, device=dev), torch.tensor(h, device=dev), H)
    xlo, xhi, fx = linear_taps(torch.arange(w, device=dev), torch.tensor(w, device=dev), W)
    rows = img[:, :, xlo] * (1 - fx) + img[:, :, xhi] * fx  # [C, H, w]
    fy = fy.view(h, 1)
    return rows[:, ylo] * (1 - fy) + rows[:, yhi] * fy


def batch_mix_reference(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    """The readable reference: a loop over views and samples (explicit math).

    ``x`` [B, C, H, W] or [V, B, C, H, W]; ``op`` [B]; ``lam`` [B]; ``boxes`` [V, B, 4].
    Returns ``(mixed, lam_eff [V, B] float32)``.
    """
    xv = as_views(x)
    V, B, C, H, W = xv.shape
    out = torch.empty_like(xv)
    lam_eff = torch.empty(V, B, dtype=torch.float32, device=x.device)
    lam32 = lam.to(torch.float32)
    for v in range(V):
        for i in range(B):
            partner = B - 1 - i
            own = xv[v, i].to(torch.float32)
            other = xv[v, partner].to(torch.float32)
            code = int(op[i])
            y0, x0, h, w = (int(t) for t in boxes[v, i])
            if code == MIXUP:
                l = lam32[i]
                mixed = l * own + (1 - l) * other
                lam_eff[v, i] = l
            elif code in (CUTMIX, RESIZEMIX):
                mixed = own.clone()
                if h > 0 and w > 0:
                    if code == CUTMIX:
                        patch = other[:, y0 : y0 + h, x0 : x0 + w]
                    else:
                        patch = resize_bilinear(other, h, w)
                    mixed[:, y0 : y0 + h, x0 : x0 + w] = patch
                lam_eff[v, i] = (H * W - h * w) / (H * W)  # a Python float (double), rounded once
            else:
                raise ValueError(f"op[{i}] = {code} is not an operator code")
            out[v, i] = from_float(mixed, x.dtype)
    return out.view(x.shape), lam_eff


def batch_mix_reference_vectorized(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    """An eager, vectorised PyTorch version (no Python loop over samples).

    It computes all three operators for the whole batch with broadcasting and
    gathers, then selects per sample: a stronger CPU/GPU baseline than the loop.
    """
    xv = as_views(x)
    V, B, C, H, W = xv.shape
    own = xv.to(torch.float32)
    other = own.flip(1)
    lam32 = lam.to(torch.float32).view(1, B, 1, 1, 1)
    code = op.view(1, B, 1, 1, 1)
    mixup = lam32 * own + (1 - lam32) * other

    y0, x0, h, w = boxes.unbind(-1)  # [V, B]
    rows = torch.arange(H, device=x.device).view(1, 1, H)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    in_rows = (rows >= y0.unsqueeze(-1)) & (rows < (y0 + h).unsqueeze(-1))  # [V, B, H]
    in_cols = (cols >= x0.unsqueeze(-1)) & (cols < (x0 + w).unsqueeze(-1))  # [V, B, W]
    inbox = (in_rows.unsqueeze(-1) & in_cols.unsqueeze(-2)).unsqueeze(2)  # [V, B, 1, H, W]
    cutmix = torch.where(inbox, other, own)

    # taps of every image coordinate for the box's offset (meaningful inside the box)
    ylo, yhi, fy = linear_taps(rows - y0.unsqueeze(-1), h.unsqueeze(-1), H)
    xlo, xhi, fx = linear_taps(cols - x0.unsqueeze(-1), w.unsqueeze(-1), W)

    def pick_rows(idx):  # [V, B, H] -> rows of the partner, [V, B, C, H, W]
        return other.gather(3, idx.view(V, B, 1, H, 1).expand(V, B, C, H, W))

    def pick_cols(t, idx):
        return t.gather(4, idx.view(V, B, 1, 1, W).expand(V, B, C, H, W))

    r_lo, r_hi = pick_rows(ylo), pick_rows(yhi)
    wx_hi = fx.view(V, B, 1, 1, W)
    wx_lo = 1 - wx_hi
    top = pick_cols(r_lo, xlo) * wx_lo + pick_cols(r_lo, xhi) * wx_hi
    bot = pick_cols(r_hi, xlo) * wx_lo + pick_cols(r_hi, xhi) * wx_hi
    wy_hi = fy.view(V, B, 1, H, 1)
    resized = top * (1 - wy_hi) + bot * wy_hi
    resizemix = torch.where(inbox, resized, own)

    mixed = torch.where(code == MIXUP, mixup, torch.where(code == CUTMIX, cutmix, resizemix))
    return from_float(mixed, x.dtype).view(x.shape), lam_eff_from_boxes(op, lam, boxes, H, W)
