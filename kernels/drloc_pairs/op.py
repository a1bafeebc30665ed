"""DRLoc pair sampling: the paths of every piece, and the registered custom ops with their autograd."""

from __future__ import annotations

import torch

from .. import dispatch
from . import reference as ref
from .reference import grid_grad_shape
from .triton import gather_triton, pairs_triton, positions_triton, scatter_triton

INFO = dispatch.REGISTRY["drloc_pairs"]


def _cpp_ops():
    if not dispatch.load_cpp(INFO):
        raise dispatch.KernelUnavailable(f"op 'drloc_pairs': the C++ build failed: {dispatch.cpp_error(INFO)}")
    return torch.ops.batchkin


def _check_path(path: str) -> str:
    if path not in dispatch.PATHS:
        raise ValueError(f"path must be one of {', '.join(dispatch.PATHS)}; got {path!r}")
    return path


def _check_pos_range(pos: torch.Tensor, H: int, W: int) -> None:
    """Positions inside the grid: a ValueError on the CPU, an async device assert elsewhere."""
    if pos.numel() == 0:
        return
    rows = pos[..., 0::2]
    cols = pos[..., 1::2]
    if pos.device.type == "cpu":
        if bool((rows < 0).any()) or bool((rows >= H).any()):
            raise ValueError(f"pos rows (entries 0 and 2) must lie in [0, H) = [0, {H})")
        if bool((cols < 0).any()) or bool((cols >= W).any()):
            raise ValueError(f"pos cols (entries 1 and 3) must lie in [0, W) = [0, {W})")
    elif pos.device.type != "meta":
        ok = (rows >= 0).all() & (rows < H).all() & (cols >= 0).all() & (cols < W).all()
        torch._assert_async(ok, "drloc_pairs: pos lies outside the grid")


def drloc_positions_impl(B: int, m: int, H: int, W: int, key: int, device, path: str) -> torch.Tensor:
    """The position draw on one path (``ref``, ``cpp`` or ``triton``), no argument checks."""
    device = torch.device(device)
    if _check_path(path) == "triton":
        return positions_triton(B, m, H, W, key, device)
    if path == "cpp":
        if device.type != "cpu":
            raise dispatch.KernelUnavailable(f"op 'drloc_pairs': the C++ path needs CPU tensors, not {device.type}")
        return _cpp_ops()._drloc_positions_cpu(B, m, H, W, key)
    return ref.drloc_positions_reference(B, m, H, W, key, device)


def drloc_gather_impl(grid: torch.Tensor, pos: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather on one path (forward only)."""
    if _check_path(path) == "triton":
        return gather_triton(grid, pos, grid.shape[1], 0, "pair")
    if path == "cpp":
        e_a, e_b = _cpp_ops()._drloc_gather_cpu(grid, pos)
        return e_a, e_b
    e_a, e_b = ref.drloc_gather_reference(grid, pos)
    return e_a.contiguous(), e_b.contiguous()


def drloc_gather_cat_impl(grid: torch.Tensor, pos: torch.Tensor, path: str) -> torch.Tensor:
    """``cat(e_a, e_b, -1)`` (``[B, m, 2C]``) on one path (forward only)."""
    if _check_path(path) == "triton":
        return gather_triton(grid, pos, grid.shape[1], 0, "cat")[0]
    if path == "cpp":
        return _cpp_ops()._drloc_gather_cat_cpu(grid, pos)
    return torch.cat(ref.drloc_gather_reference(grid, pos), dim=-1)


def drloc_gather_sum_impl(
    table: torch.Tensor, pos: torch.Tensor, split: int, bias: torch.Tensor | None, path: str
) -> torch.Tensor:
    """``(table[b, :split, a] + table[b, split:, b]) + bias`` on one path (forward only)."""
    if _check_path(path) == "triton":
        return gather_triton(table, pos, split, split, "sum", bias)[0]
    if path == "cpp":
        return _cpp_ops()._drloc_gather_sum_cpu(table, pos, split, bias)
    return ref.drloc_gather_sum_reference(table, pos, split, bias)


def drloc_pairs_impl(grid: torch.Tensor, m: int, key: int, mode: str, normalize: bool, path: str):
    """The fused draw + gather + targets on one path (forward only): ``(e_a, e_b, targets, pos)``."""
    signed_mode = mode == "signed"
    if _check_path(path) == "triton":
        return pairs_triton(grid, m, key, signed_mode, normalize)
    if path == "cpp":
        return tuple(_cpp_ops()._drloc_pairs_cpu(grid, m, key, signed_mode, normalize))
    e_a, e_b, tgt, pos = ref.drloc_pairs_reference(grid, m, key, mode, normalize)
    return e_a.contiguous(), e_b.contiguous(), tgt, pos


def drloc_scatter_impl(grad_a, grad_b, pos, channels, H, W, off_b, channels_last, path: str) -> torch.Tensor:
    """The gathers' backward on one path (see :func:`drloc_scatter_reference`)."""
    if _check_path(path) == "triton":
        return scatter_triton(grad_a, grad_b, pos, channels, H, W, off_b, channels_last)
    if path == "cpp":
        return _cpp_ops()._drloc_scatter_cpu(grad_a, grad_b, pos, channels, H, W, off_b, channels_last)
    return ref.drloc_scatter_reference(grad_a, grad_b, pos, channels, H, W, off_b, channels_last)


def drloc_first_layer_unique_impl(grid, pos, weight, bias, path: str) -> torch.Tensor:
    """The ``unique`` first layer on one path (forward only; ``ref`` or ``cpp``)."""
    if _check_path(path) == "triton":
        raise dispatch.KernelUnavailable(
            "op 'drloc_pairs': the 'unique' first layer has no Triton kernel (its row counts are only known "
            "on the host); use strategy 'gather' or 'project' on accelerators"
        )
    if path == "cpp":
        return _cpp_ops()._drloc_first_layer_unique_cpu(grid, pos, weight, bias)
    return ref.drloc_first_layer_unique_reference(grid, pos, weight, bias)


def drloc_first_layer_unique_backward_impl(grad, grid, pos, weight, has_bias, channels_last, path: str):
    """The ``unique`` first layer's backward on one path: ``(grad_grid, grad_weight, grad_bias)``."""
    if _check_path(path) == "triton":
        raise dispatch.KernelUnavailable("op 'drloc_pairs': the 'unique' first layer has no Triton kernel")
    if path == "cpp":
        return tuple(
            _cpp_ops()._drloc_first_layer_unique_backward_cpu(grad, grid, pos, weight, has_bias, channels_last)
        )
    return ref.drloc_first_layer_unique_backward_reference(grad, grid, pos, weight, has_bias, channels_last)


def _select(device: torch.device) -> str:
    return dispatch.select("drloc_pairs", device)


# --------------------------------------------------------------------------- #
# Registered custom ops (fake impls for torch.compile, autograd)
# --------------------------------------------------------------------------- #


def _checked(impl, grid, pos, *args):
    """``impl(grid, pos, *args, path)`` on the dispatched path, the positions checked first."""
    _check_pos_range(pos, grid.shape[2], grid.shape[3])
    return impl(grid, pos, *args, _select(grid.device))


def _channels_last(grid: torch.Tensor) -> bool:
    """Whether the grid's gradient should be laid out channels-last (like the grid)."""
    return grid.shape[1] > 1 and grid.stride(1) == 1


def _save_grid(ctx, grid: torch.Tensor, pos: torch.Tensor) -> None:
    """What a gather's backward needs: the positions, the grid's shape and layout."""
    ctx.save_for_backward(pos)
    ctx.grid_chw = tuple(grid.shape[1:])
    ctx.channels_last = _channels_last(grid)


def _grid_grad(ctx, grad_a, grad_b, off_b: int) -> torch.Tensor:
    (pos,) = ctx.saved_tensors
    channels, H, W = ctx.grid_chw
    grad = drloc_scatter_op(grad_a, grad_b, pos, channels, H, W, off_b, ctx.channels_last)
    return grad.permute(0, 3, 1, 2) if ctx.channels_last else grad


@torch.library.custom_op("batchkin::drloc_positions", mutates_args=())
def drloc_positions_op(B: int, m: int, H: int, W: int, key: int, device: torch.device) -> torch.Tensor:
    return drloc_positions_impl(B, m, H, W, key, device, _select(device))


@drloc_positions_op.register_fake
def _(B, m, H, W, key, device):
    return torch.empty(B, m, 4, dtype=torch.int64, device=device)


@torch.library.custom_op("batchkin::drloc_scatter", mutates_args=())
def drloc_scatter_op(
    grad_a: torch.Tensor, grad_b: torch.Tensor, pos: torch.Tensor, channels: int, H: int, W: int, off_b: int,
    channels_last: bool,
) -> torch.Tensor:  # fmt: skip
    return drloc_scatter_impl(grad_a, grad_b, pos, channels, H, W, off_b, channels_last, _select(grad_a.device))


@drloc_scatter_op.register_fake
def _(grad_a, grad_b, pos, channels, H, W, off_b, channels_last):
    return grad_a.new_empty(grid_grad_shape(grad_a.shape[0], channels, H, W, channels_last))


@torch.library.custom_op("batchkin::drloc_gather", mutates_args=())
def drloc_gather_op(grid: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _checked(drloc_gather_impl, grid, pos)


@drloc_gather_op.register_fake
def _(grid, pos):
    shape = (grid.shape[0], pos.shape[1], grid.shape[1])
    return grid.new_empty(shape), grid.new_empty(shape)


def _gather_backward(ctx, grad_a, grad_b):
    return _grid_grad(ctx, grad_a, grad_b, 0), None


drloc_gather_op.register_autograd(_gather_backward, setup_context=lambda ctx, inputs, output: _save_grid(ctx, *inputs))


@torch.library.custom_op("batchkin::drloc_gather_cat", mutates_args=())
def drloc_gather_cat_op(grid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return _checked(drloc_gather_cat_impl, grid, pos)


@drloc_gather_cat_op.register_fake
def _(grid, pos):
    return grid.new_empty(grid.shape[0], pos.shape[1], 2 * grid.shape[1])


def _gather_cat_backward(ctx, grad):
    C = ctx.grid_chw[0]
    return _grid_grad(ctx, grad[..., :C], grad[..., C:], 0), None


drloc_gather_cat_op.register_autograd(
    _gather_cat_backward, setup_context=lambda ctx, inputs, output: _save_grid(ctx, *inputs)
)


@torch.library.custom_op("batchkin::drloc_gather_sum", mutates_args=())
def drloc_gather_sum_op(
    table: torch.Tensor, pos: torch.Tensor, split: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _checked(drloc_gather_sum_impl, table, pos, split, bias)


@drloc_gather_sum_op.register_fake
def _(table, pos, split, bias=None):
    return table.new_empty(table.shape[0], pos.shape[1], split)


def _gather_sum_setup(ctx, inputs, output):
    table, pos, split, bias = inputs
    _save_grid(ctx, table, pos)
    ctx.split, ctx.has_bias = split, bias is not None


def _gather_sum_backward(ctx, grad):
    grad_bias = grad.sum(dim=(0, 1)) if ctx.has_bias else None
    return _grid_grad(ctx, grad, grad, ctx.split), None, None, grad_bias


drloc_gather_sum_op.register_autograd(_gather_sum_backward, setup_context=_gather_sum_setup)


@torch.library.custom_op("batchkin::drloc_pairs", mutates_args=())
def drloc_pairs_op(
    grid: torch.Tensor, m: int, key: int, signed_mode: bool, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    mode = "signed" if signed_mode else "abs"
    return drloc_pairs_impl(grid, m, key, mode, normalize, _select(grid.device))


@drloc_pairs_op.register_fake
def _(grid, m, key, signed_mode, normalize):
    B, C = grid.shape[:2]
    targets, pos = grid.new_empty(B, m, 2, dtype=torch.float32), grid.new_empty(B, m, 4, dtype=torch.int64)
    return grid.new_empty(B, m, C), grid.new_empty(B, m, C), targets, pos


def _pairs_setup(ctx, inputs, output):
    _, _, targets, pos = output
    ctx.mark_non_differentiable(targets, pos)
    _save_grid(ctx, inputs[0], pos)


def _pairs_backward(ctx, grad_a, grad_b, grad_targets, grad_pos):
    return _grid_grad(ctx, grad_a, grad_b, 0), None, None, None, None


drloc_pairs_op.register_autograd(_pairs_backward, setup_context=_pairs_setup)


@torch.library.custom_op("batchkin::drloc_first_layer_unique", mutates_args=())
def drloc_first_layer_unique_op(
    grid: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    return _checked(drloc_first_layer_unique_impl, grid, pos, weight, bias)


@drloc_first_layer_unique_op.register_fake
def _(grid, pos, weight, bias=None):
    return grid.new_empty(grid.shape[0], pos.shape[1], weight.shape[0])


@torch.library.custom_op("batchkin::drloc_first_layer_unique_backward", mutates_args=())
def drloc_first_layer_unique_backward_op(
    grad: torch.Tensor, grid: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, has_bias: bool,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    path = _select(grid.device)
    return drloc_first_layer_unique_backward_impl(grad, grid, pos, weight, has_bias, channels_last, path)


@drloc_first_layer_unique_backward_op.register_fake
def _(grad, grid, pos, weight, has_bias, channels_last):
    grad_grid = grid.new_empty(grid_grad_shape(*grid.shape, channels_last))
    return grad_grid, weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


def _unique_setup(ctx, inputs, output):
    grid, pos, weight, bias = inputs
    ctx.save_for_backward(grid, pos, weight)
    ctx.has_bias = bias is not None
    ctx.channels_last = _channels_last(grid)


def _unique_backward(ctx, grad):
    grid, pos, weight = ctx.saved_tensors
    grad_grid, grad_weight, grad_bias = drloc_first_layer_unique_backward_op(
        grad, grid, pos, weight, ctx.has_bias, ctx.channels_last
    )
    if ctx.channels_last:
        grad_grid = grad_grid.permute(0, 3, 1, 2)
    return grad_grid, None, grad_weight, grad_bias if ctx.has_bias else None


drloc_first_layer_unique_op.register_autograd(_unique_backward, setup_context=_unique_setup)
