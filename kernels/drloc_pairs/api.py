"""DRLoc pair sampling: the public functions (argument checks, then the registered ops)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import checks, dispatch
from .cost import choose_first_layer_strategy
from .op import (
    drloc_first_layer_unique_op,
    drloc_gather_cat_op,
    drloc_gather_op,
    drloc_gather_sum_op,
    drloc_pairs_op,
    drloc_positions_op,
)
from .reference import drloc_targets_reference

MODES = ("abs", "signed")
GRID_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STRATEGIES = ("auto", "gather", "project", "unique")
#: Draw counters are 32-bit: B * m * 4 may not exceed this.
MAX_DRAWS = 2**32


def _check_grid(grid, name: str = "grid") -> torch.Tensor:
    return checks.check_tensor(name, grid, ndim=4, dtypes=GRID_DTYPES, min_numel=1)


def _check_mode(mode, normalize) -> bool:
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    return mode == "signed"


def _check_key(key) -> int:
    """``key`` as a 32-bit int; a CPU ``torch.Generator`` yields one draw of its stream."""
    if isinstance(key, torch.Generator):
        if key.device.type != "cpu":
            raise ValueError(f"key: a torch.Generator must live on the CPU (no device sync); got {key.device}")
        return int(torch.randint(0, 2**32, (1,), generator=key, dtype=torch.int64))
    return checks.check_int("key", key, min_value=0, max_value=2**32 - 1)


def _check_counts(B: int, m: int) -> None:
    if B * m * 4 > MAX_DRAWS:
        raise ValueError(f"B * m * 4 must be <= 2**32 (32-bit draw counters); got B={B}, m={m}")


def _check_pos(pos, grid: torch.Tensor) -> torch.Tensor:
    checks.check_tensor("pos", pos, dtypes=(torch.int64,), shape=(grid.shape[0], None, 4), device=grid.device)
    if pos.shape[1] < 1:
        raise ValueError(f"pos must hold at least one pair per image; got shape {list(pos.shape)}")
    return pos


def drloc_positions(B: int, m: int, H: int, W: int, key, device=None) -> torch.Tensor:
    """Draw ``m`` position pairs per image on ``device``: int64 ``[B, m, 4]`` = ``(r_a, c_a, r_b, c_b)``.

    ``key`` is a 32-bit int (e.g. ``rng.derive_key(seed, step)``) or a CPU ``torch.Generator``.
    """
    for name, value in (("B", B), ("m", m), ("H", H), ("W", W)):
        checks.check_int(name, value, min_value=1)
    _check_counts(B, m)
    key = _check_key(key)
    device = torch.device("cpu") if device is None else torch.device(device)
    return drloc_positions_op(B, m, H, W, key, device)


def drloc_targets(pos: torch.Tensor, H: int, W: int, mode: str = "abs", normalize: bool = False) -> torch.Tensor:
    """float32 ``[B, m, 2]`` targets (row, col) of ``delta = a - b`` for positions ``pos``.

    ``abs``: ``|delta|``; ``signed``: ``delta + (size - 1)``; ``normalize`` divides by
    ``max(size - 1, 1)``. Elementwise on ``pos``'s device (no host sync).
    """
    checks.check_int("H", H, min_value=1)
    checks.check_int("W", W, min_value=1)
    checks.check_tensor("pos", pos, dtypes=(torch.int64, torch.int32), ndim=3)
    if pos.shape[-1] != 4:
        raise ValueError(f"pos must have shape [B, m, 4]; got {list(pos.shape)}")
    _check_mode(mode, normalize)
    return drloc_targets_reference(pos, H, W, mode, normalize)


def drloc_gather(grid: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e_a, e_b)``, each ``[B, m, C]``: the grid's embeddings at both members of every pair.

    Differentiable w.r.t. ``grid`` (scatter-add backward; repeated positions accumulate).
    """
    _check_grid(grid)
    _check_pos(pos, grid)
    return drloc_gather_op(grid, pos)


def drloc_gather_cat(grid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``cat(e_a, e_b, -1)`` as one ``[B, m, 2C]`` tensor, gathered in place (the head's input).

    Differentiable w.r.t. ``grid``.
    """
    _check_grid(grid)
    _check_pos(pos, grid)
    return drloc_gather_cat_op(grid, pos)


def drloc_pairs(grid: torch.Tensor, m: int, key, mode: str = "abs", normalize: bool = False):
    """Draw ``m`` pairs per image, gather both members and their targets in one pass.

    Returns ``(e_a, e_b, targets, pos)``: ``[B, m, C]`` twice (the grid's dtype,
    differentiable w.r.t. ``grid``), float32 ``[B, m, 2]`` targets and int64 ``[B, m, 4]``
    positions, all on the grid's device. ``key``: 32-bit int or CPU ``torch.Generator``.
    The positions equal ``drloc_positions(B, m, H, W, key)`` and the targets
    ``drloc_targets(pos, H, W, mode, normalize)``.
    """
    _check_grid(grid)
    checks.check_int("m", m, min_value=1)
    _check_counts(grid.shape[0], m)
    signed_mode = _check_mode(mode, normalize)
    key = _check_key(key)
    return drloc_pairs_op(grid, m, key, signed_mode, normalize)


def _project(grid: torch.Tensor, w_ab: torch.Tensor) -> torch.Tensor:
    """``P[b, k, h, w] = sum_c w_ab[k, c] * grid[b, c, h, w]`` as a ``[B, 2 * hidden, H, W]`` tensor.

    Token-layout grids (a view of contiguous ``[B, H*W, C]``) give one matrix product over
    ``[B*H*W, C]`` and a channels-last result; contiguous ``[B, C, H, W]`` grids one
    batched product over ``[B, C, H*W]``. Neither copies the grid; other layouts go
    through ``einsum``, which may.
    """
    B, C, H, W = grid.shape
    k = w_ab.shape[0]
    tokens = grid.permute(0, 2, 3, 1)
    if tokens.is_contiguous():
        return (tokens.reshape(B * H * W, C) @ w_ab.t()).view(B, H, W, k).permute(0, 3, 1, 2)
    if grid.is_contiguous():
        return torch.matmul(w_ab, grid.reshape(B, C, H * W)).view(B, k, H, W)
    return torch.einsum("bchw,kc->bkhw", grid, w_ab)


def _unique_allowed(grid: torch.Tensor) -> bool:
    """``unique`` runs on CPU tensors unless the Triton path is forced (it has no Triton kernel)."""
    return grid.device.type == "cpu" and dispatch.requested_mode() != "triton"


def drloc_first_layer(
    grid: torch.Tensor,
    pos: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    strategy: str = "auto",
) -> torch.Tensor:
    """The DRLoc head's first layer on the pairs ``pos``: ``[B, m, hidden]``.

    Equals ``F.linear(cat(e_a, e_b, -1), weight, bias)`` with ``weight [hidden, 2C]``.
    Strategies: ``"gather"`` gathers the pairs into ``[B, m, 2C]`` and applies the layer;
    ``"project"`` projects every token once and gathers rows; ``"unique"`` (CPU tensors,
    ``ref`` / ``cpp`` paths) projects only the distinct tokens each side uses.
    ``"auto"`` picks the cheapest by the cost model :func:`choose_first_layer_strategy`.
    Differentiable w.r.t. ``grid``, ``weight`` and ``bias``.
    """
    _check_grid(grid)
    _check_pos(pos, grid)
    B, C, H, W = grid.shape
    checks.check_tensor("weight", weight, ndim=2, dtypes=(grid.dtype,), device=grid.device)
    if weight.shape[1] != 2 * C or weight.shape[0] < 1:
        raise ValueError(f"weight must have shape [hidden, 2*C] = [hidden, {2 * C}]; got {list(weight.shape)}")
    hidden = weight.shape[0]
    if bias is not None:
        checks.check_tensor("bias", bias, shape=(hidden,), dtypes=(grid.dtype,), device=grid.device)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    m = pos.shape[1]
    if strategy == "auto":
        strategy = choose_first_layer_strategy(
            B, C, hidden, m, H * W, device_type=grid.device.type, elem_size=grid.element_size(),
            allow_unique=_unique_allowed(grid),
        )
    if strategy == "unique":
        if grid.device.type != "cpu":
            raise ValueError(f"strategy 'unique' needs CPU tensors (data-dependent row counts); got {grid.device}")
        return drloc_first_layer_unique_op(grid, pos, weight, bias)
    if strategy == "project":
        # [W1a; W1b]: [2 * hidden, C]; the table's channels [0, hidden) project the a
        # members, channels [hidden, 2 * hidden) the b members; the bias joins in the gather
        w_ab = torch.cat([weight[:, :C], weight[:, C:]], dim=0)
        return drloc_gather_sum_op(_project(grid, w_ab), pos, hidden, bias)
    return F.linear(drloc_gather_cat_op(grid, pos), weight, bias)
