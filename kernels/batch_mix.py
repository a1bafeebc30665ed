"""In-batch mixing for SDMP: mixup, cutmix and resizemix with the flip partner.

METHODS.md section 4 ("Mixing") is the specification. Sample ``i`` of a batch of
``B`` mixes with its *partner* ``B-1-i`` (the batch flipped; the middle sample of
an odd batch pairs with itself). Every sample has its own operator, its own
``lam`` (shared by all views) and, per view, its own integer box ``(y0, x0, h, w)``
lying fully inside the image:

* ``MIXUP`` (0):     ``lam * x_i + (1 - lam) * x_partner`` over the whole image;
* ``CUTMIX`` (1):    the partner's pixels inside the box replace x_i's;
* ``RESIZEMIX`` (2): the *whole* partner image, bilinearly resized to the box size
  (exactly ``F.interpolate(mode="bilinear", align_corners=False)``, no antialias),
  is pasted into the box.

The op also returns ``lam_eff`` ``[V, B]``: ``lam`` for mixup, and for cutmix and
resizemix the fraction of x_i's pixels that stay untouched, recomputed from the
integer box actually pasted, ``(H*W - h*w) / (H*W)`` (computed in float64 and
rounded once to float32). A zero-area box leaves x_i unchanged (``lam_eff = 1``).

Both views of a two-view batch ``[V, B, C, H, W]`` are mixed in one pass; each view
mixes within itself (the partner of ``x[v, i]`` is ``x[v, B-1-i]``).

Numerics: values are upcast to float32 after loading, mixed in float32 and
rounded once when stored. For ``uint8`` images (mixing before normalisation) the
result is rounded half up, ``floor(v + 0.5)`` -- i.e. half away from zero, since
mixing non-negative values gives non-negative values -- and clamped to
``[0, 255]``. The op is not differentiable (it mixes input images).

Paths (see :mod:`batchkin.kernels.dispatch`): a Triton kernel for CUDA tensors,
a C++ extension (``csrc/batch_mix.cpp``) for CPU tensors, and the PyTorch
references below. The C++ path writes every output element once, in one parallel
pass over the image planes (so each thread first-touches the output pages it
writes) and resizes each partner row once per plane from per-sample tap tables. At
224x224 an output is ~150 MB, and a fresh one costs more than the mixing: ~37,000
4 KiB page faults, or with transparent huge pages the zeroing of every page, plus (in a
virtual machine with free page reporting) up to ~1 s when the host has reclaimed the
free 2 MiB blocks. So on Linux outputs of 32 MiB or more are 2 MiB-aligned blocks
advised to use huge pages, and the C++ path keeps the two most recently freed ones
and hands them to the next outputs of the same size (a training loop mixes batches
of one shape): the process holds up to two such blocks after their tensors are gone.
The mixup loop is also compiled for AVX2 (float16 with F16C conversions) and chosen at
run time; non-NaN results are bit-identical to the baseline loop (NaN stays NaN, its
sign and payload bits may differ). The random parameters are drawn on the host by
:func:`sample_mix_params` from an explicit ``torch.Generator`` (they are tiny)
and then moved to the image's device.

Usage::

    g = torch.Generator().manual_seed(0)
    params = sample_mix_params(B, H, W, generator=g, num_views=2, device=x.device)
    mixed, lam_eff = batch_mix(views, *params)      # views: [2, B, C, H, W]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchkin.kernels import checks, dispatch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None

INFO = dispatch.register_op("batch_mix", cpp_library="batch_mix", cpp_sources=("batch_mix.cpp",), triton=True)

MIXUP = 0
CUTMIX = 1
RESIZEMIX = 2
OPERATORS = {"mixup": MIXUP, "cutmix": CUTMIX, "resizemix": RESIZEMIX}
OPERATOR_NAMES = {code: name for name, code in OPERATORS.items()}

IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
INDEX_DTYPES = (torch.int64, torch.int32)
LAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IMPL_PATHS = ("ref", "ref_vec", "cpp", "triton")

__all__ = [
    "MIXUP",
    "CUTMIX",
    "RESIZEMIX",
    "OPERATORS",
    "MixParams",
    "sample_mix_params",
    "partner_index",
    "batch_mix",
    "batch_mix_impl",
    "batch_mix_reference",
    "batch_mix_reference_vectorized",
]


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixParams:
    """The random parameters of one mixing step.

    ``op`` ``[B]`` int64 operator codes, ``lam`` ``[B]`` float32 (the same for every
    view), ``boxes`` ``[V, B, 4]`` int64 ``(y0, x0, h, w)``. Iterating yields
    ``op, lam, boxes`` so that ``batch_mix(x, *params)`` works.
    """

    op: torch.Tensor
    lam: torch.Tensor
    boxes: torch.Tensor

    def __iter__(self):
        yield self.op
        yield self.lam
        yield self.boxes

    def to(self, device) -> MixParams:
        return MixParams(self.op.to(device), self.lam.to(device), self.boxes.to(device))


def partner_index(batch_size: int, device=None) -> torch.Tensor:
    """Index of every sample's partner: ``B-1-i`` (the batch flipped)."""
    checks.check_int("batch_size", batch_size, min_value=1)
    return torch.arange(batch_size - 1, -1, -1, device=device)


def _operator_codes(ops) -> list[int]:
    if isinstance(ops, (str, int)):
        ops = (ops,)
    if not isinstance(ops, Sequence) or len(ops) == 0:
        raise ValueError("ops must be a non-empty sequence of operator names or codes")
    codes = []
    for item in ops:
        if isinstance(item, str):
            if item.lower() not in OPERATORS:
                raise ValueError(f"ops: unknown operator {item!r}; expected one of {', '.join(OPERATORS)}")
            code = OPERATORS[item.lower()]
        elif isinstance(item, int) and not isinstance(item, bool):
            if item not in OPERATOR_NAMES:
                raise ValueError(f"ops: unknown operator code {item}; expected 0 (mixup), 1 (cutmix) or 2 (resizemix)")
            code = item
        else:
            raise TypeError(f"ops entries must be str or int, got {type(item).__name__}")
        if code in codes:
            raise ValueError(f"ops: operator {OPERATOR_NAMES[code]!r} is listed twice")
        codes.append(code)
    return codes


def sample_mix_params(
    B: int,
    H: int,
    W: int,
    *,
    generator: torch.Generator,
    ops=("mixup", "cutmix", "resizemix"),
    per_sample_op: bool = False,
    num_views: int = 1,
    device=None,
) -> MixParams:
    """Draw SDMP's mixing parameters for a batch of ``B`` images of size ``H x W``.

    * ``lam_raw ~ Beta(1, 1)`` (= Uniform(0, 1)) per sample, ``lam = 0.8 * lam_raw + 0.1``
      (so ``lam`` is in ``[0.1, 0.9]``), the same for every view;
    * the operator is chosen uniformly from ``ops`` once for the batch, or per sample
      when ``per_sample_op``;
    * one box per view and sample, side ratio ``sqrt(1 - lam)``:
      ``h = round(H * sqrt(1 - lam))``, ``w = round(W * sqrt(1 - lam))`` (round half to
      even, as ``torch.round``; clamped to ``[0, H]`` / ``[0, W]``), its top-left corner
      uniform among the positions that keep it inside the image, independently per view.
      Boxes are drawn whatever the operator (mixup ignores them), so the generator is
      consumed the same way for every operator.

    Everything is drawn on the CPU from ``generator`` (which must be a CPU generator)
    in this order: ``lam_raw`` [B], the operator, then for each view the row and column
    positions [B] each; the results are moved to ``device``.
    """
    checks.check_int("B", B, min_value=1)
    checks.check_int("H", H, min_value=1)
    checks.check_int("W", W, min_value=1)
    checks.check_int("num_views", num_views, min_value=1)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU generator (the parameters are drawn on the host); got {generator.device}")
    codes = _operator_codes(ops)

    lam_raw = torch.rand(B, generator=generator, dtype=torch.float64)
    lam = (0.8 * lam_raw + 0.1).to(torch.float32)
    choice = torch.randint(len(codes), (B if per_sample_op else 1,), generator=generator)
    op = torch.tensor(codes, dtype=torch.int64)[choice].expand(B).contiguous()

    side = torch.sqrt(1.0 - lam.to(torch.float64))
    h = torch.round(H * side).to(torch.int64).clamp_(0, H)
    w = torch.round(W * side).to(torch.int64).clamp_(0, W)
    boxes = torch.empty(num_views, B, 4, dtype=torch.int64)
    for v in range(num_views):
        uy = torch.rand(B, generator=generator, dtype=torch.float64)
        ux = torch.rand(B, generator=generator, dtype=torch.float64)
        # uniform over the H-h+1 (W-w+1) valid positions; the min guards u*(n) rounding up to n
        y0 = torch.minimum(torch.floor(uy * (H - h + 1)).to(torch.int64), H - h)
        x0 = torch.minimum(torch.floor(ux * (W - w + 1)).to(torch.int64), W - w)
        boxes[v] = torch.stack((y0, x0, h, w), dim=-1)
    params = MixParams(op, lam, boxes)
    return params.to(device) if device is not None else params


# --------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------


def _as_views(x: torch.Tensor) -> torch.Tensor:
    return x if x.dim() == 5 else x.unsqueeze(0)


def _from_float(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round a float32 result to the image dtype (uint8: floor(v + 0.5), clamped)."""
    if dtype == torch.uint8:
        return torch.floor(v + 0.5).clamp_(0, 255).to(torch.uint8)
    return v.to(dtype)


def _lam_eff_from_boxes(op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """``lam`` for mixup, ``(H*W - h*w) / (H*W)`` (float64, rounded to float32) otherwise."""
    area = boxes[..., 2] * boxes[..., 3]
    from_box = ((H * W - area).to(torch.float64) / (H * W)).to(torch.float32)
    return torch.where(op.view(1, -1) == MIXUP, lam.to(torch.float32).view(1, -1), from_box)


def batch_mix_reference(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    """The readable reference: a loop over views and samples (explicit math).

    ``x`` [B, C, H, W] or [V, B, C, H, W]; ``op`` [B]; ``lam`` [B]; ``boxes`` [V, B, 4].
    Returns ``(mixed, lam_eff [V, B] float32)``.
    """
    xv = _as_views(x)
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
                        patch = F.interpolate(other[None], size=(h, w), mode="bilinear", align_corners=False)[0]
                    mixed[:, y0 : y0 + h, x0 : x0 + w] = patch
                lam_eff[v, i] = (H * W - h * w) / (H * W)  # a Python float (double), rounded once
            else:
                raise ValueError(f"op[{i}] = {code} is not an operator code")
            out[v, i] = _from_float(mixed, x.dtype)
    return out.view(x.shape), lam_eff


def _linear_taps(pos0: torch.Tensor, size: torch.Tensor, n: int):
    """Source taps of every output coordinate 0..n-1 for boxes starting at ``pos0`` of
    length ``size`` ([V, B] each): the partner axis (length n) resized to ``size``.

    Returns ``lo, hi`` (int64) and ``frac`` (float32), each [V, B, n]; meaningful only
    inside the box (clamped into range elsewhere).
    """
    scale = n / size.clamp(min=1).to(torch.float32)  # float32 division, as ATen's scale
    d = (torch.arange(n, device=pos0.device).view(1, 1, n) - pos0.unsqueeze(-1)).to(torch.float32)
    src = (scale.unsqueeze(-1) * (d + 0.5) - 0.5).clamp(min=0)
    lo = src.to(torch.int64).clamp(max=n - 1)
    frac = (src - lo.to(torch.float32)).clamp(0, 1)
    hi = (lo + 1).clamp(max=n - 1)
    return lo, hi, frac


def batch_mix_reference_vectorized(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    """An eager, vectorised PyTorch version (no Python loop over samples).

    It computes all three operators for the whole batch with broadcasting and
    gathers, then selects per sample: a stronger CPU/GPU baseline than the loop.
    """
    xv = _as_views(x)
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

    ylo, yhi, fy = _linear_taps(y0, h, H)
    xlo, xhi, fx = _linear_taps(x0, w, W)

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
    return _from_float(mixed, x.dtype).view(x.shape), _lam_eff_from_boxes(op, lam, boxes, H, W)


# --------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------

if triton is not None:

    # the sizes stay runtime scalars (a size of 1 would otherwise become a constexpr)
    @triton.jit(do_not_specialize=["B", "C", "H", "W", "HW"])
    def _batch_mix_kernel(
        x_ptr,
        out_ptr,
        op_ptr,
        lam_ptr,
        box_ptr,
        lam_eff_ptr,
        B,
        C,
        H,
        W,
        HW,
        IS_UINT8: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
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


def _batch_mix_triton(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    if triton is None:
        raise dispatch.KernelUnavailable("batch_mix: triton is not importable")
    xv = _as_views(x).contiguous()
    V, B, C, H, W = xv.shape
    out = torch.empty_like(xv)
    lam_eff = torch.empty(V, B, dtype=torch.float32, device=x.device)
    if xv.numel() > 0:
        HW = H * W
        block = min(1024, triton.next_power_of_2(HW))
        grid = (V * B * C, triton.cdiv(HW, block))
        _batch_mix_kernel[grid](
            xv,
            out,
            op.contiguous(),
            lam.contiguous(),
            boxes.contiguous(),
            lam_eff,
            B,
            C,
            H,
            W,
            HW,
            IS_UINT8=x.dtype == torch.uint8,
            BLOCK=block,
            num_warps=4 if block >= 512 else 1,
            # separate multiply and add roundings, as the reference and the C++ path
            enable_fp_fusion=False,
        )
    return out.view(x.shape), lam_eff


def _batch_mix_cpp(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    if not dispatch.load_cpp(INFO):
        raise dispatch.KernelUnavailable(f"batch_mix: the C++ extension is unavailable: {dispatch.cpp_error(INFO)}")
    return torch.ops.batchkin._batch_mix_cpu(x, op, lam, boxes)


_IMPLS = {
    "ref": batch_mix_reference,
    "ref_vec": batch_mix_reference_vectorized,
    "cpp": _batch_mix_cpp,
    "triton": _batch_mix_triton,
}


# --------------------------------------------------------------------------------------
# The registered op
# --------------------------------------------------------------------------------------


@torch.library.custom_op("batchkin::batch_mix", mutates_args=())
def batch_mix_op(
    x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The custom op: ``x`` [B,C,H,W] or [V,B,C,H,W], ``op`` int64 [B], ``lam`` float32 [B],
    ``boxes`` int64 [V,B,4] -> ``(mixed, lam_eff [V,B] float32)``. No argument checks:
    call :func:`batch_mix`."""
    path = dispatch.select("batch_mix", x.device)
    out, lam_eff = _IMPLS[path](x, op, lam, boxes)
    return out, lam_eff


@batch_mix_op.register_fake
def _(x, op, lam, boxes):
    V = x.shape[0] if x.dim() == 5 else 1
    B = x.shape[1] if x.dim() == 5 else x.shape[0]
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((V, B), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------


def _check_args(x, op, lam, boxes, check_values: bool):
    """Validate and normalise the arguments; returns (x, op, lam, boxes [V,B,4], squeeze)."""
    checks.check_tensor("x", x, dtypes=IMAGE_DTYPES)
    if x.dim() not in (4, 5):
        raise ValueError(f"x must have shape [B, C, H, W] or [V, B, C, H, W]; got {list(x.shape)}")
    V = x.shape[0] if x.dim() == 5 else 1
    B, C, H, W = x.shape[-4:]
    if min(V, B, C, H, W) < 1:
        raise ValueError(f"x must not have an empty dimension; got {list(x.shape)}")
    if isinstance(op, str) or (isinstance(op, int) and not isinstance(op, bool)):
        (code,) = _operator_codes((op,))
        op = torch.full((B,), code, dtype=torch.int64, device=x.device)
    checks.check_tensor("op", op, dtypes=INDEX_DTYPES, shape=(B,), device=x.device)
    checks.check_tensor("lam", lam, dtypes=LAM_DTYPES, shape=(B,), device=x.device)
    checks.check_tensor("boxes", boxes, dtypes=INDEX_DTYPES, device=x.device)
    squeeze = False
    if boxes.dim() == 2 and x.dim() == 4:
        checks.check_tensor("boxes", boxes, shape=(B, 4))
        boxes = boxes.unsqueeze(0)
        squeeze = True
    checks.check_tensor("boxes", boxes, shape=(V, B, 4))
    op = op.to(torch.int64).contiguous()
    lam = lam.to(torch.float32).contiguous()
    boxes = boxes.to(torch.int64).contiguous()
    if check_values and not torch.compiler.is_compiling():
        y0, x0, h, w = boxes.unbind(-1)
        bad_op = (op < MIXUP) | (op > RESIZEMIX)
        bad_lam = ~((lam >= 0) & (lam <= 1))  # NaN is refused too
        bad_box = (y0 < 0) | (x0 < 0) | (h < 0) | (w < 0) | (y0 + h > H) | (x0 + w > W)
        any_op, any_lam, any_box = torch.stack((bad_op.any(), bad_lam.any(), bad_box.any())).tolist()  # one sync
        if any_op:
            i = int(bad_op.nonzero()[0, 0])
            raise ValueError(f"op[{i}] = {int(op[i])} is not an operator code (0 mixup, 1 cutmix, 2 resizemix)")
        if any_lam:
            i = int(bad_lam.nonzero()[0, 0])
            raise ValueError(f"lam[{i}] = {float(lam[i])} is outside [0, 1]")
        if any_box:
            v, i = (int(t) for t in bad_box.nonzero()[0])
            raise ValueError(
                f"boxes[{v}, {i}] = {boxes[v, i].tolist()} (y0, x0, h, w) is not inside the {H}x{W} image"
            )
    return x, op, lam, boxes, squeeze


def batch_mix(
    x: torch.Tensor,
    op,
    lam: torch.Tensor,
    boxes: torch.Tensor,
    *,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix a batch (or both views of one) with its flipped self.

    Args:
        x: images ``[B, C, H, W]`` or views ``[V, B, C, H, W]``; float32, float16,
            bfloat16 or uint8.
        op: operator per sample, int tensor ``[B]`` of ``MIXUP``/``CUTMIX``/``RESIZEMIX``
            (or one name / code for the whole batch).
        lam: ``[B]`` float, in ``[0, 1]``: the weight of x_i itself in mixup.
        boxes: ``[V, B, 4]`` int ``(y0, x0, h, w)`` inside the image (``[B, 4]`` is
            accepted for a 4-D ``x``). Ignored for mixup samples.
        check_values: check op codes, lam and boxes by value (a host sync on CUDA;
            skipped automatically under ``torch.compile``).

    Returns:
        ``(mixed, lam_eff)``: ``mixed`` has ``x``'s shape and dtype (a new tensor);
        ``lam_eff`` is float32 with ``boxes``' leading shape (``[V, B]``, or ``[B]``
        when boxes were given as ``[B, 4]``).
    """
    x, op, lam, boxes, squeeze = _check_args(x, op, lam, boxes, check_values)
    out, lam_eff = batch_mix_op(x, op, lam, boxes)
    return out, (lam_eff[0] if squeeze else lam_eff)


def batch_mix_impl(x, op, lam, boxes, *, path: str = "ref"):
    """Run one implementation directly (``ref``, ``ref_vec``, ``cpp`` or ``triton``),
    bypassing dispatch, after the same argument checks as :func:`batch_mix`.
    Returns ``(mixed, lam_eff [V, B])``."""
    if path not in _IMPLS:
        raise ValueError(f"path must be one of {', '.join(IMPL_PATHS)}; got {path!r}")
    if path == "triton":
        ok, why = dispatch.triton_can_run(x.device)
        if not ok:
            raise dispatch.KernelUnavailable(f"batch_mix: {why}")
    x, op, lam, boxes, _ = _check_args(x, op, lam, boxes, True)
    return _IMPLS[path](x, op, lam, boxes)


def bytes_moved(x: torch.Tensor) -> int:
    """Ideal traffic of one mixing pass: every image element read once and written once."""
    return 2 * x.numel() * x.element_size()

