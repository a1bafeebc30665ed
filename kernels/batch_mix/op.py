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


_IMAGE_DTYPES = frozenset(IMAGE_DTYPES)
_INDEX_DTYPES = frozenset(INDEX_DTYPES)
_LAM_DTYPES = frozenset(LAM_DTYPES)


def _structure(name: str, t, dtypes: frozenset, allowed: tuple, shape: tuple, device) -> None:
    """The cheap checks of one argument (type, dtype, shape, device): no tensor is read."""
    if type(t) is not torch.Tensor and not isinstance(t, torch.Tensor):
        checks.check_tensor(name, t)  # raises the TypeError
    if t.dtype not in dtypes:
        checks.check_tensor(name, t, dtypes=allowed)
    if t.shape != shape:
        checks.check_tensor(name, t, shape=shape)
    if t.device != device:
        checks.check_tensor(name, t, device=device)


def _check_args(x, op, lam, boxes):
    """Validate the arguments' structure and normalise them; returns (x, op, lam, boxes [V,B,4], squeeze)."""
    if type(x) is not torch.Tensor and not isinstance(x, torch.Tensor):
        checks.check_tensor("x", x)
    if x.dtype not in _IMAGE_DTYPES:
        checks.check_tensor("x", x, dtypes=IMAGE_DTYPES)
    shape = x.shape
    nd = len(shape)
    if nd != 4 and nd != 5:
        raise ValueError(f"x must have shape [B, C, H, W] or [V, B, C, H, W]; got {list(shape)}")
    V = shape[0] if nd == 5 else 1
    B = shape[-4]
    if 0 in shape:
        raise ValueError(f"x must not have an empty dimension; got {list(shape)}")
    device = x.device
    if isinstance(op, str) or (isinstance(op, int) and not isinstance(op, bool)):
        (code,) = operator_codes((op,))
        op = torch.full((B,), code, dtype=torch.int64, device=device)
    _structure("op", op, _INDEX_DTYPES, INDEX_DTYPES, (B,), device)
    _structure("lam", lam, _LAM_DTYPES, LAM_DTYPES, (B,), device)
    squeeze = nd == 4 and isinstance(boxes, torch.Tensor) and boxes.dim() == 2
    _structure("boxes", boxes, _INDEX_DTYPES, INDEX_DTYPES, (B, 4) if squeeze else (V, B, 4), device)
    if squeeze:
        boxes = boxes.unsqueeze(0)
    if op.dtype is not torch.int64 or not op.is_contiguous():
        op = op.to(torch.int64).contiguous()
    if lam.dtype is not torch.float32 or not lam.is_contiguous():
        lam = lam.to(torch.float32).contiguous()
    if boxes.dtype is not torch.int64 or not boxes.is_contiguous():
        boxes = boxes.to(torch.int64).contiguous()
    return x, op, lam, boxes, squeeze


def _check_values(op, lam, boxes, H: int, W: int) -> None:
    """Op codes, lam and boxes by value (one host sync on CUDA): a ValueError naming the first bad entry."""
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
        raise ValueError(f"boxes[{v}, {i}] = {boxes[v, i].tolist()} (y0, x0, h, w) is not inside the {H}x{W} image")


def batch_mix(
    x: torch.Tensor,
    op,
    lam: torch.Tensor,
    boxes: torch.Tensor,
    *,
    check_values: bool | None = None,
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
        check_values: check op codes, lam and boxes by value. ``None`` (the default)
            checks where it costs nothing: the C++ kernel checks them as it reads them and
            the CPU references are checked before they run, while the Triton kernel (which
            stays inside the images whatever the values) is not checked, as that would wait
            for the device. ``True`` checks on every path (a host sync on CUDA; also turned on
            by ``BATCHKIN_CHECKS=1``), ``False`` skips the checks made before the kernel.
            Skipped under ``torch.compile``. The structure (types, dtypes, shapes, devices)
            is always checked.

    Returns:
        ``(mixed, lam_eff)``: ``mixed`` has ``x``'s shape and dtype (a new tensor);
        ``lam_eff`` is float32 with ``boxes``' leading shape (``[V, B]``, or ``[B]``
        when boxes were given as ``[B, 4]``).
    """
    x, op, lam, boxes, squeeze = _check_args(x, op, lam, boxes)
    if torch.compiler.is_compiling():
        out, lam_eff = batch_mix_op(x, op, lam, boxes)
    else:
        path = dispatch.select("batch_mix", x.device)
        if path == "cpp":  # the C++ kernel checks the values itself, whatever check_values says
            pass
        elif check_values or (check_values is None and (path != "triton" or checks.debug_checks())):
            _check_values(op, lam, boxes, x.shape[-2], x.shape[-1])
        if (x.requires_grad or lam.requires_grad) and torch.is_grad_enabled():
            out, lam_eff = batch_mix_op(x, op, lam, boxes)  # the registered op refuses a backward through it
        else:
            out, lam_eff = _IMPLS[path](x, op, lam, boxes)  # eager: the path itself, without the op's dispatch
    return out, (lam_eff[0] if squeeze else lam_eff)


def batch_mix_impl(x, op, lam, boxes, *, path: str = "ref"):
    """Run one implementation directly (``ref``, ``ref_vec``, ``cpp`` or ``triton``),
    bypassing dispatch, after the same argument checks as :func:`batch_mix` (values
    included). Returns ``(mixed, lam_eff [V, B])``."""
    if path not in _IMPLS:
        raise ValueError(f"path must be one of {', '.join(IMPL_PATHS)}; got {path!r}")
    if path == "triton":
        ok, why = dispatch.triton_can_run(x.device)
        if not ok:
            raise dispatch.KernelUnavailable(f"batch_mix: {why}")
    x, op, lam, boxes, _ = _check_args(x, op, lam, boxes)
    _check_values(op, lam, boxes, x.shape[-2], x.shape[-1])
    return _IMPLS[path](x, op, lam, boxes)


def bytes_moved(x: torch.Tensor) -> int:
    """Ideal traffic of one mixing pass: every image element read once and written once."""
    return 2 * x.numel() * x.element_size()


