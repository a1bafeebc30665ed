"""DRLoc pair sampling in plain PyTorch (readable, explicit math): what the fast paths are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import rng


def grid_grad_shape(B: int, C: int, H: int, W: int, channels_last: bool) -> tuple[int, int, int, int]:
    """The shape of a grid gradient: ``[B, H, W, C]`` channels-last, else ``[B, C, H, W]``."""
    return (B, H, W, C) if channels_last else (B, C, H, W)


def drloc_positions_reference(B: int, m: int, H: int, W: int, key: int, device=None) -> torch.Tensor:
    """``[B, m, 4]`` int64 positions ``(r_a, c_a, r_b, c_b)`` drawn from ``key``."""
    offsets = torch.arange(B * m * 4, dtype=torch.int64, device=device)
    u = rng.uniform(key, offsets).view(B, m, 4)
    t = torch.arange(4, device=device)
    sizes = torch.where(t % 2 == 0, H, W)  # (H, W, H, W)
    idx = torch.floor(u * sizes.to(torch.float32)).to(torch.int64)
    return torch.minimum(idx, sizes - 1)


def drloc_targets_reference(
    pos: torch.Tensor, H: int, W: int, mode: str = "abs", normalize: bool = False
) -> torch.Tensor:
    """float32 ``[B, m, 2]`` targets (row, col) of ``delta = a - b``; see the module docstring."""
    sizes = torch.where(torch.arange(2, device=pos.device) == 0, H, W)  # (H, W), built on the device
    delta = pos[..., 0:2] - pos[..., 2:4]
    t = delta.abs() if mode == "abs" else delta + (sizes - 1)
    t = t.to(torch.float32)
    if normalize:
        t = t / (sizes - 1).clamp_min(1).to(torch.float32)
    return t


def drloc_gather_reference(grid: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``e_a[b, j] = grid[b, :, r_a, c_a]``, ``e_b[b, j] = grid[b, :, r_b, c_b]`` (differentiable)."""
    b = torch.arange(grid.shape[0], device=grid.device).view(-1, 1)
    # advanced indices around a slice: the indexed dimensions come first -> [B, m, C]
    e_a = grid[b, :, pos[..., 0], pos[..., 1]]
    e_b = grid[b, :, pos[..., 2], pos[..., 3]]
    return e_a, e_b


def drloc_pairs_reference(grid: torch.Tensor, m: int, key: int, mode: str = "abs", normalize: bool = False):
    """Draw, gather and targets in plain PyTorch: ``(e_a, e_b, targets, pos)``."""
    B, _, H, W = grid.shape
    pos = drloc_positions_reference(B, m, H, W, key, grid.device)
    e_a, e_b = drloc_gather_reference(grid, pos)
    return e_a, e_b, drloc_targets_reference(pos, H, W, mode, normalize), pos


def drloc_gather_sum_reference(
    table: torch.Tensor, pos: torch.Tensor, split: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[b, j] = (table[b, :split, r_a, c_a] + table[b, split:, r_b, c_b]) + bias`` (in float32)."""
    e_a, e_b = drloc_gather_reference(table, pos)
    out = e_a[..., :split].float() + e_b[..., split:].float()
    if bias is not None:
        out = out + bias.float()
    return out.to(table.dtype)


def drloc_scatter_reference(
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    pos: torch.Tensor,
    channels: int,
    H: int,
    W: int,
    off_b: int = 0,
    channels_last: bool = False,
) -> torch.Tensor:
    """Backward of the gathers: a zero grid receiving ``grad_a`` at the ``a`` members'
    channels ``[0, n)`` and ``grad_b`` at the ``b`` members' channels ``[off_b, off_b + n)``.

    Accumulated in float32 (all ``a`` terms in pair order, then all ``b`` terms), cast to
    the grads' dtype. Shape ``[B, H, W, channels]`` if ``channels_last`` else
    ``[B, channels, H, W]``, contiguous.
    """
    B, m, n = grad_a.shape
    acc = torch.zeros(B, H, W, channels, dtype=torch.float32, device=grad_a.device)
    b = torch.arange(B, device=grad_a.device).view(B, 1).expand(B, m)
    acc[..., 0:n].index_put_((b, pos[..., 0], pos[..., 1]), grad_a.float(), accumulate=True)
    acc[..., off_b : off_b + n].index_put_((b, pos[..., 2], pos[..., 3]), grad_b.float(), accumulate=True)
    out = acc.to(grad_a.dtype)
    return out if channels_last else out.permute(0, 3, 1, 2).contiguous()


def drloc_first_layer_reference(grid, pos, weight, bias=None) -> torch.Tensor:
    """``Linear(cat(e_a, e_b))``: the plain first head layer on the gathered pairs."""
    e_a, e_b = drloc_gather_reference(grid, pos)
    return F.linear(torch.cat([e_a, e_b], dim=-1), weight, bias)


def drloc_unique_rows_reference(pos: torch.Tensor, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct tokens of each side: ``(rows_a, rows_b, inv)``.

    ``rows_a`` (int64 ``[U_a]``) lists the flat tokens ``b * H * W + r * W + c`` that are the
    ``a`` member of some pair, in increasing order (image by image, tokens in increasing
    ``r * W + c``); ``rows_b`` likewise for the ``b`` members; ``inv[b, j]`` (``[B, m, 2]``)
    is the row of pair ``j``'s ``a`` member in ``rows_a`` and of its ``b`` member in ``rows_b``.
    """
    B = pos.shape[0]
    base = torch.arange(B, device=pos.device).view(B, 1) * (H * W)
    flat_a = base + pos[..., 0] * W + pos[..., 1]
    flat_b = base + pos[..., 2] * W + pos[..., 3]
    rows_a, inv_a = torch.unique(flat_a, sorted=True, return_inverse=True)
    rows_b, inv_b = torch.unique(flat_b, sorted=True, return_inverse=True)
    return rows_a, rows_b, torch.stack([inv_a, inv_b], dim=-1)


def drloc_first_layer_unique_reference(grid, pos, weight, bias=None) -> torch.Tensor:
    """``Linear(cat(e_a, e_b))`` computed over the distinct tokens of each side (differentiable).

    ``P_a = X_a @ W1a^T`` over the distinct ``a`` tokens ``X_a`` (``P_b`` likewise), then
    ``out[b, j] = P_a[inv_a] + P_b[inv_b] + bias``.
    """
    B, C, H, W = grid.shape
    rows_a, rows_b, inv = drloc_unique_rows_reference(pos, H, W)
    tokens = grid.permute(0, 2, 3, 1).reshape(B * H * W, C)
    p_a = tokens.index_select(0, rows_a) @ weight[:, :C].t()
    p_b = tokens.index_select(0, rows_b) @ weight[:, C:].t()
    out = (p_a[inv[..., 0]].float() + p_b[inv[..., 1]].float())
    if bias is not None:
        out = out + bias.float()
    return out.to(grid.dtype)


def drloc_first_layer_unique_backward_reference(grad, grid, pos, weight, has_bias: bool, channels_last: bool):
    """``(grad_grid, grad_weight, grad_bias)`` of :func:`drloc_first_layer_unique_reference`.

    The grid gradient is laid out ``[B, H, W, C]`` if ``channels_last`` else ``[B, C, H, W]``
    (contiguous); ``grad_bias`` is zeros without a bias.
    """
    B, C, H, W = grid.shape
    hidden = weight.shape[0]
    rows_a, rows_b, inv = drloc_unique_rows_reference(pos, H, W)
    g = grad.reshape(-1, hidden).float()
    g_a = torch.zeros(rows_a.numel(), hidden, device=grad.device).index_add_(0, inv[..., 0].reshape(-1), g)
    g_b = torch.zeros(rows_b.numel(), hidden, device=grad.device).index_add_(0, inv[..., 1].reshape(-1), g)
    g_a, g_b = g_a.to(grid.dtype), g_b.to(grid.dtype)
    tokens = grid.permute(0, 2, 3, 1).reshape(B * H * W, C)
    grad_weight = torch.cat([g_a.t() @ tokens.index_select(0, rows_a), g_b.t() @ tokens.index_select(0, rows_b)], 1)
    acc = torch.zeros(B * H * W, C, dtype=torch.float32, device=grad.device)
    acc.index_add_(0, rows_a, (g_a @ weight[:, :C]).float())
    acc.index_add_(0, rows_b, (g_b @ weight[:, C:]).float())
    grad_grid = acc.to(grid.dtype).view(B, H, W, C)
    if not channels_last:
        grad_grid = grad_grid.permute(0, 3, 1, 2).contiguous()
    grad_bias = grad.sum(dim=(0, 1)) if has_bias else grad.new_zeros(hidden)
    return grad_grid, grad_weight, grad_bias
