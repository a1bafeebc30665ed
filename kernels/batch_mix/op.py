"""In-batch mixing: the registered custom op and the public functions."""

from __future__ import annotations

import torch

from .. import checks, dispatch
from .params import MIXUP, RESIZEMIX, operator_codes
from .reference import batch_mix_reference, batch_mix_reference_vectorized
from .triton import batch_mix_triton

INFO = dispatch.REGISTRY["batch_mix"]

IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)
INDEX_DTYPES = (torch.int64, torch.int32)
LAM_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
IMPL_PATHS = ("ref", "ref_vec", "cpp", "triton")


def _batch_mix_cpp(x: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, boxes: torch.Tensor):
    if not dispatch.load_cpp(INFO):
        raise dispatch.KernelUnavailable(f"batch_mix: the C++ extension is unavailable: {dispatch.cpp_error(INFO)}")
    return torch.ops.batchkin._batch_mix_cpu(x, op, lam, boxes)


_IMPLS = {
    "ref": batch_mix_reference,
    "ref_vec": batch_mix_reference_vectorized,
    "cpp": _batch_mix_cpp,
    "triton": batch_mix_triton,
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
        (code,) = operator_codes((op,))
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


