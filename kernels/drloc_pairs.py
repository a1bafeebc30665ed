"""DRLoc pair sampling: draw token pairs on the grid's device, gather both embeddings, targets.

DRLoc (METHODS.md section 3) samples ``m`` pairs of positions per image from the final
token grid ``x`` of shape ``[B, C, H, W]``, gathers the two embeddings and asks a small
MLP to predict the pair's relative offset. This module is that sampling step as one op
that never synchronises with the host and never copies the whole grid.

Positions
    ``pos[b, j] = (r_a, c_a, r_b, c_b)``, int64, each coordinate uniform in its own range
    (rows in ``[0, H)``, columns in ``[0, W)``), independent, with replacement. Draw ``t``
    of pair ``j`` of image ``b`` uses the counter-based uniform of :mod:`batchkin.kernels.rng`
    at ``offset = (b * m + j) * 4 + t`` (taken mod 2**32)::

        u = rng.uniform(key, offset)                      # float32 in [0, 1), 24 bits
        v = min(floor(u * size), size - 1)                # size = H for t in {0, 2}, W otherwise

    ``u * size`` is one float32 multiplication in every path, so the reference, the C++
    op and the Triton kernel draw bit-identical positions from the same 32-bit ``key``.
    Folding a seed and a step into the key (``rng.derive_key(seed, step)``) is the
    caller's business; a CPU ``torch.Generator`` is also accepted and gives the key.

Targets (float32 ``[B, m, 2]``, ordered (row, col))
    With ``delta = a - b`` (the first member minus the second, per coordinate):
    ``abs`` mode (the paper's setting) ``|delta|`` in ``[0, size - 1]``; ``signed`` mode
    ``delta + (size - 1)`` in ``[0, 2 * size - 2]`` (a class index for ``2 * size - 1``
    bins). ``normalize=True`` divides by ``size - 1`` (by 1 when ``size == 1``, where every
    target is 0), a correctly rounded float32 division in every path.

Gather
    ``e_a[b, j] = x[b, :, r_a, c_a]`` and ``e_b[b, j] = x[b, :, r_b, c_b]`` (``[B, m, C]``,
    the grid's dtype). The grid is read through its strides: a permuted view of ViT tokens
    ``[B, H*W, C]`` (``tokens.transpose(1, 2).unflatten(2, (H, W))``) is used as it is.
    :func:`drloc_gather_cat` writes both members into one ``[B, m, 2C]`` tensor (the
    head's input) without a separate concatenation.
    The gradient w.r.t. the grid is a scatter-add of the two gradients into a zero grid;
    positions drawn several times accumulate. It is accumulated in float32 in a fixed
    order (all ``a`` members in pair order, then all ``b`` members) and cast once to the
    grid's dtype, so the three paths return bit-identical gradients; torch's own autograd of
    the indexing reference sums each member's repeats apart, which agrees up to the order
    of the float additions. The gradient is laid out like the grid: channels-last grids
    (``stride(1) == 1``, the token view) get a channels-last gradient, so the tokens'
    gradient is not copied.

First head layer
    ``drloc_first_layer(grid, pos, weight, bias)`` equals
    ``F.linear(cat(e_a, e_b, -1), weight, bias)``, by one of three strategies:

    * ``gather``: gather both members straight into one ``[B, m, 2C]`` buffer
      (:func:`drloc_gather_cat`, no separate concatenation) and apply the layer as one
      matrix product;
    * ``project``: because ``weight @ [e_a; e_b] = W1a @ e_a + W1b @ e_b`` (``W1a =
      weight[:, :C]``, ``W1b = weight[:, C:]``), project every token once (``P = tokens @
      [W1a; W1b]^T``, ``[B, H*W, 2 * hidden]``) and gather rows: ``out = P_a[b, idx_a] +
      P_b[b, idx_b] + bias`` (``batchkin::drloc_gather_sum`` fuses the gather, the sum and the
      bias);
    * ``unique`` (CPU tensors; ``ref`` and ``cpp`` paths): project only the distinct tokens
      each side uses, ``P_a = X_a @ W1a^T`` over the distinct ``a`` members ``X_a`` (image
      by image, tokens in increasing order), ``P_b`` likewise, ``out = P_a[inv_a] +
      P_b[inv_b] + bias``. Backward: the output gradient is summed per distinct row (pairs in
      order, float32) into ``G_a``, ``G_b``; ``grad W1a = G_a^T X_a``; the grid gradient of a
      token is ``(G_a W1a)[its a row] + (G_b W1b)[its b row]``, every grid element written
      once. Its products run over ``D = H*W (1 - (1 - 1/(H*W))^m)`` rows per side and image
      in expectation (``m`` for ``gather``, ``H*W`` for ``project``). The C++ op works
      through chunks of consecutive images (about 2,048 rows each, chunks in parallel): it
      gathers a chunk's rows, multiplies and writes that chunk's output or grid gradient, so
      ``X``, ``P`` and ``G`` never exist at full size; its products and sums are float32
      for every grid dtype. The row counts are data-dependent, so accelerators (no host
      synchronisation) do not use it.

    ``"auto"`` picks the cheapest by :func:`choose_first_layer_strategy`: the matrix
    products' FLOPs plus ``FLOPS_PER_BYTE[device]`` times the bytes the other steps move
    (:func:`first_layer_costs`, from ``B``, ``C``, ``hidden``, ``m`` and ``H*W``).

Paths (see :mod:`batchkin.kernels.dispatch`): Triton on CUDA tensors, the C++ ops
``batchkin::_drloc_*_cpu`` on CPU tensors, the PyTorch reference otherwise. All accept
float32, float16 and bfloat16 grids. Out-of-range positions passed to
:func:`drloc_gather` are a ``ValueError`` for CPU tensors; on an accelerator they are
checked with an asynchronous device assertion (no host synchronisation) and the Triton
kernels clamp indices so they never read outside the grid. Double backward is not
supported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from batchkin.kernels import checks, dispatch, rng

INFO = dispatch.register_op("drloc_pairs", cpp_library="drloc_pairs", cpp_sources=("drloc_pairs.cpp",), triton=True)

MODES = ("abs", "signed")
GRID_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
STRATEGIES = ("auto", "gather", "project", "unique")
#: Draw counters are 32-bit: B * m * 4 may not exceed this.
MAX_DRAWS = 2**32

try:  # Triton is optional: the kernels below are only defined where it imports
    import triton
    import triton.language as tl

    from batchkin.kernels.rng import tl_uniform
except ImportError:  # pragma: no cover - triton is absent on some platforms
    triton = None


# --------------------------------------------------------------------------- #
# PyTorch reference (readable, explicit math; what the fast paths are tested against)
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #

if triton is not None:

    # The key and the sizes are never specialised (a key or a size equal to 1 would otherwise
    # become a compile-time constant and a separate compilation).
    @triton.jit(do_not_specialize=["total", "H", "W", "key"])
    def _drloc_positions_kernel(pos_ptr, total, H, W, key, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < total
        t = offs % 4
        size = tl.where(t % 2 == 0, H, W)
        u = tl_uniform(key, offs)
        v = (u * size.to(tl.float32)).to(tl.int32)
        v = tl.minimum(v, size - 1)
        tl.store(pos_ptr + offs, v.to(tl.int64), mask=mask)

    @triton.jit(do_not_specialize=["N", "m", "H", "W"])
    def _drloc_gather_kernel(
        grid_ptr, pos_ptr, ea_ptr, eb_ptr, bias_ptr,
        N, m, NCH, OFF_B, H, W, O_STRIDE,
        s_b, s_c, s_h, s_w,
        SUM: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        k = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        nm = n < N
        km = k < NCH
        # clamped so that a bad position can never address memory outside the grid
        ra = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 0, mask=nm, other=0), 0), H - 1)
        ca = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 1, mask=nm, other=0), 0), W - 1)
        rb = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 2, mask=nm, other=0), 0), H - 1)
        cb = tl.minimum(tl.maximum(tl.load(pos_ptr + n * 4 + 3, mask=nm, other=0), 0), W - 1)
        b = n // m
        base_a = b * s_b + ra * s_h + ca * s_w
        base_b = b * s_b + rb * s_h + cb * s_w + OFF_B * s_c
        kc = k.to(tl.int64)[None, :] * s_c
        mask = nm[:, None] & km[None, :]
        va = tl.load(grid_ptr + base_a[:, None] + kc, mask=mask, other=0)
        vb = tl.load(grid_ptr + base_b[:, None] + kc, mask=mask, other=0)
        out = n[:, None] * O_STRIDE + k[None, :]
        if SUM:
            s = va.to(tl.float32) + vb.to(tl.float32)  # upcast: the interpreter's bf16 math is wrong
            if HAS_BIAS:
                s = s + tl.load(bias_ptr + k, mask=km, other=0).to(tl.float32)[None, :]
            tl.store(ea_ptr + out, s.to(ea_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(ea_ptr + out, va, mask=mask)
            tl.store(eb_ptr + out, vb, mask=mask)

    @triton.jit
    def _drloc_target(a, b, size_m1, denom, SIGNED: tl.constexpr, NORMALIZE: tl.constexpr):
        d = a - b
        if SIGNED:
            t = d + size_m1
        else:
            t = tl.abs(d)
        f = t.to(tl.float32)
        if NORMALIZE:
            f = tl.math.div_rn(f, denom)
        return f

    @triton.jit(do_not_specialize=["N", "m", "H", "W", "key"])
    def _drloc_pairs_kernel(
        grid_ptr, ea_ptr, eb_ptr, tgt_ptr, pos_ptr,
        N, m, C, H, W, Hf, Wf, denom_h, denom_w, key,
        s_b, s_c, s_h, s_w,
        SIGNED: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        n = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
        pid_c = tl.program_id(1)
        k = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        nm = n < N
        km = k < C
        off = n * 4
        ra = tl.minimum((tl_uniform(key, off + 0) * Hf).to(tl.int32), H - 1).to(tl.int64)
        ca = tl.minimum((tl_uniform(key, off + 1) * Wf).to(tl.int32), W - 1).to(tl.int64)
        rb = tl.minimum((tl_uniform(key, off + 2) * Hf).to(tl.int32), H - 1).to(tl.int64)
        cb = tl.minimum((tl_uniform(key, off + 3) * Wf).to(tl.int32), W - 1).to(tl.int64)
        if pid_c == 0:  # one column of programs writes the positions and targets
            tl.store(pos_ptr + off + 0, ra, mask=nm)
            tl.store(pos_ptr + off + 1, ca, mask=nm)
            tl.store(pos_ptr + off + 2, rb, mask=nm)
            tl.store(pos_ptr + off + 3, cb, mask=nm)
            tl.store(tgt_ptr + n * 2 + 0, _drloc_target(ra, rb, H - 1, denom_h, SIGNED, NORMALIZE), mask=nm)
            tl.store(tgt_ptr + n * 2 + 1, _drloc_target(ca, cb, W - 1, denom_w, SIGNED, NORMALIZE), mask=nm)
        b = n // m
        base_a = b * s_b + ra * s_h + ca * s_w
        base_b = b * s_b + rb * s_h + cb * s_w
        kc = k.to(tl.int64)[None, :] * s_c
        mask = nm[:, None] & km[None, :]
        va = tl.load(grid_ptr + base_a[:, None] + kc, mask=mask, other=0)
        vb = tl.load(grid_ptr + base_b[:, None] + kc, mask=mask, other=0)
        out = n[:, None] * C + k[None, :]
        tl.store(ea_ptr + out, va, mask=mask)
        tl.store(eb_ptr + out, vb, mask=mask)

    @triton.jit(do_not_specialize=["m", "W"])
    def _drloc_scatter_kernel(
        acc_ptr, ga_ptr, gb_ptr, pos_ptr,
        m, NCH, OFF_B, W,
        o_b, o_p, o_c,
        a_sb, a_sm, a_sc, b_sb, b_sm, b_sc,
        BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        # One program owns the float32 accumulator of (image b, a block of channels) and
        # adds its terms in a fixed order: deterministic, no cross-program races.
        b = tl.program_id(0).to(tl.int64)
        k = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
        km = k < NCH
        base = acc_ptr + b * o_b
        for j in range(0, m):
            pj = pos_ptr + (b * m + j) * 4
            p = tl.load(pj + 0) * W + tl.load(pj + 1)
            g = tl.load(ga_ptr + b * a_sb + j * a_sm + k * a_sc, mask=km, other=0).to(tl.float32)
            tl.atomic_add(base + p * o_p + k * o_c, g, mask=km, sem="relaxed")
        for j in range(0, m):
            pj = pos_ptr + (b * m + j) * 4
            p = tl.load(pj + 2) * W + tl.load(pj + 3)
            g = tl.load(gb_ptr + b * b_sb + j * b_sm + k * b_sc, mask=km, other=0).to(tl.float32)
            tl.atomic_add(base + p * o_p + (k + OFF_B) * o_c, g, mask=km, sem="relaxed")


def _require_triton() -> None:
    if triton is None:
        raise dispatch.KernelUnavailable("op 'drloc_pairs': triton cannot be imported")


def _blocks(nch: int) -> tuple[int, int]:
    """(BLOCK_P, BLOCK_C): about 4096 elements per tile."""
    block_c = min(256, triton.next_power_of_2(max(int(nch), 1)))
    return max(1, 4096 // block_c), block_c


def _positions_triton(B, m, H, W, key, device) -> torch.Tensor:
    _require_triton()
    pos = torch.empty(B, m, 4, dtype=torch.int64, device=device)
    total = B * m * 4
    block = 1024
    _drloc_positions_kernel[(triton.cdiv(total, block),)](pos, total, H, W, key, BLOCK=block)
    return pos


def _gather_triton(grid, pos, nch, off_b, kind, bias=None):
    """``kind``: ``pair`` -> (e_a, e_b); ``cat`` -> [B, m, 2 * nch]; ``sum`` -> e_a + e_b (+ bias)."""
    _require_triton()
    B, _, H, W = grid.shape
    m = pos.shape[1]
    pos = pos.contiguous()
    width = 2 * nch if kind == "cat" else nch
    e_a = torch.empty(B, m, width, dtype=grid.dtype, device=grid.device)
    if kind == "pair":
        e_b = torch.empty_like(e_a)
    else:
        e_b = e_a[..., nch:] if kind == "cat" else e_a  # (unused by the sum)
    N = B * m
    bp, bc = _blocks(nch)
    launch = (triton.cdiv(N, bp), triton.cdiv(nch, bc))
    _drloc_gather_kernel[launch](
        grid, pos, e_a, e_b, e_a if bias is None else bias.contiguous(),
        N, m, nch, off_b, H, W, width, *grid.stride(),
        SUM=kind == "sum", HAS_BIAS=bias is not None, BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    return e_a, e_b


def _pairs_triton(grid, m, key, signed_mode, normalize):
    _require_triton()
    B, C, H, W = grid.shape
    e_a = torch.empty(B, m, C, dtype=grid.dtype, device=grid.device)
    e_b = torch.empty_like(e_a)
    tgt = torch.empty(B, m, 2, dtype=torch.float32, device=grid.device)
    pos = torch.empty(B, m, 4, dtype=torch.int64, device=grid.device)
    N = B * m
    bp, bc = _blocks(C)
    launch = (triton.cdiv(N, bp), triton.cdiv(C, bc))
    _drloc_pairs_kernel[launch](
        grid, e_a, e_b, tgt, pos,
        N, m, C, H, W, float(H), float(W), float(max(H - 1, 1)), float(max(W - 1, 1)), key,
        *grid.stride(),
        SIGNED=signed_mode, NORMALIZE=normalize, BLOCK_P=bp, BLOCK_C=bc,
    )  # fmt: skip
    return e_a, e_b, tgt, pos


def _scatter_triton(grad_a, grad_b, pos, channels, H, W, off_b, channels_last):
    _require_triton()
    B, m, nch = grad_a.shape
    pos = pos.contiguous()
    shape = (B, H, W, channels) if channels_last else (B, channels, H, W)
    acc = torch.zeros(shape, dtype=torch.float32, device=grad_a.device)
    HW = H * W
    o_b, o_p, o_c = (HW * channels, channels, 1) if channels_last else (HW * channels, 1, HW)
    block_c = min(256, triton.next_power_of_2(max(nch, 1)))
    _drloc_scatter_kernel[(B, triton.cdiv(nch, block_c))](
        acc, grad_a, grad_b, pos, m, nch, off_b, W, o_b, o_p, o_c,
        *grad_a.stride(), *grad_b.stride(), BLOCK_C=block_c,
    )  # fmt: skip
    return acc if grad_a.dtype == torch.float32 else acc.to(grad_a.dtype)


# --------------------------------------------------------------------------- #
# Path selection
# --------------------------------------------------------------------------- #


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
        return _positions_triton(B, m, H, W, key, device)
    if path == "cpp":
        if device.type != "cpu":
            raise dispatch.KernelUnavailable(f"op 'drloc_pairs': the C++ path needs CPU tensors, not {device.type}")
        return _cpp_ops()._drloc_positions_cpu(B, m, H, W, key)
    return drloc_positions_reference(B, m, H, W, key, device)


def drloc_gather_impl(grid: torch.Tensor, pos: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The gather on one path (forward only)."""
    if _check_path(path) == "triton":
        return _gather_triton(grid, pos, grid.shape[1], 0, "pair")
    if path == "cpp":
        e_a, e_b = _cpp_ops()._drloc_gather_cpu(grid, pos)
        return e_a, e_b
    e_a, e_b = drloc_gather_reference(grid, pos)
    return e_a.contiguous(), e_b.contiguous()


def drloc_gather_cat_impl(grid: torch.Tensor, pos: torch.Tensor, path: str) -> torch.Tensor:
    """``cat(e_a, e_b, -1)`` (``[B, m, 2C]``) on one path (forward only)."""
    if _check_path(path) == "triton":
        return _gather_triton(grid, pos, grid.shape[1], 0, "cat")[0]
    if path == "cpp":
        return _cpp_ops()._drloc_gather_cat_cpu(grid, pos)
    return torch.cat(drloc_gather_reference(grid, pos), dim=-1)


def drloc_gather_sum_impl(
    table: torch.Tensor, pos: torch.Tensor, split: int, bias: torch.Tensor | None, path: str
) -> torch.Tensor:
    """``(table[b, :split, a] + table[b, split:, b]) + bias`` on one path (forward only)."""
    if _check_path(path) == "triton":
        return _gather_triton(table, pos, split, split, "sum", bias)[0]
    if path == "cpp":
        return _cpp_ops()._drloc_gather_sum_cpu(table, pos, split, bias)
    return drloc_gather_sum_reference(table, pos, split, bias)


def drloc_pairs_impl(grid: torch.Tensor, m: int, key: int, mode: str, normalize: bool, path: str):
    """The fused draw + gather + targets on one path (forward only): ``(e_a, e_b, targets, pos)``."""
    signed_mode = mode == "signed"
    if _check_path(path) == "triton":
        return _pairs_triton(grid, m, key, signed_mode, normalize)
    if path == "cpp":
        return tuple(_cpp_ops()._drloc_pairs_cpu(grid, m, key, signed_mode, normalize))
    e_a, e_b, tgt, pos = drloc_pairs_reference(grid, m, key, mode, normalize)
    return e_a.contiguous(), e_b.contiguous(), tgt, pos


def drloc_scatter_impl(grad_a, grad_b, pos, channels, H, W, off_b, channels_last, path: str) -> torch.Tensor:
    """The gathers' backward on one path (see :func:`drloc_scatter_reference`)."""
    if _check_path(path) == "triton":
        return _scatter_triton(grad_a, grad_b, pos, channels, H, W, off_b, channels_last)
    if path == "cpp":
        return _cpp_ops()._drloc_scatter_cpu(grad_a, grad_b, pos, channels, H, W, off_b, channels_last)
    return drloc_scatter_reference(grad_a, grad_b, pos, channels, H, W, off_b, channels_last)


def drloc_first_layer_unique_impl(grid, pos, weight, bias, path: str) -> torch.Tensor:
    """The ``unique`` first layer on one path (forward only; ``ref`` or ``cpp``)."""
    if _check_path(path) == "triton":
        raise dispatch.KernelUnavailable(
            "op 'drloc_pairs': the 'unique' first layer has no Triton kernel (its row counts are only known "
            "on the host); use strategy 'gather' or 'project' on accelerators"
        )
    if path == "cpp":
        return _cpp_ops()._drloc_first_layer_unique_cpu(grid, pos, weight, bias)
    return drloc_first_layer_unique_reference(grid, pos, weight, bias)


def drloc_first_layer_unique_backward_impl(grad, grid, pos, weight, has_bias, channels_last, path: str):
    """The ``unique`` first layer's backward on one path: ``(grad_grid, grad_weight, grad_bias)``."""
    if _check_path(path) == "triton":
        raise dispatch.KernelUnavailable("op 'drloc_pairs': the 'unique' first layer has no Triton kernel")
    if path == "cpp":
        return tuple(
            _cpp_ops()._drloc_first_layer_unique_backward_cpu(grad, grid, pos, weight, has_bias, channels_last)
        )
    return drloc_first_layer_unique_backward_reference(grad, grid, pos, weight, has_bias, channels_last)


def _select(device: torch.device) -> str:
    return dispatch.select("drloc_pairs", device)


# --------------------------------------------------------------------------- #
# Registered custom ops (fake impls for torch.compile, autograd)
# --------------------------------------------------------------------------- #


@torch.library.custom_op("batchkin::drloc_positions", mutates_args=())
def drloc_positions_op(B: int, m: int, H: int, W: int, key: int, device: torch.device) -> torch.Tensor:
    return drloc_positions_impl(B, m, H, W, key, device, _select(device))


@drloc_positions_op.register_fake
def _(B, m, H, W, key, device):
    return torch.empty(B, m, 4, dtype=torch.int64, device=device)


@torch.library.custom_op("batchkin::drloc_scatter", mutates_args=())
def drloc_scatter_op(
    grad_a: torch.Tensor,
    grad_b: torch.Tensor,
    pos: torch.Tensor,
    channels: int,
    H: int,
    W: int,
    off_b: int,
    channels_last: bool,
) -> torch.Tensor:
    return drloc_scatter_impl(grad_a, grad_b, pos, channels, H, W, off_b, channels_last, _select(grad_a.device))


@drloc_scatter_op.register_fake
def _(grad_a, grad_b, pos, channels, H, W, off_b, channels_last):
    B = grad_a.shape[0]
    shape = (B, H, W, channels) if channels_last else (B, channels, H, W)
    return grad_a.new_empty(shape)


def _channels_last(grid: torch.Tensor) -> bool:
    """Whether the grid's gradient should be laid out channels-last (like the grid)."""
    return grid.shape[1] > 1 and grid.stride(1) == 1


def _grid_grad(ctx, grad_a, grad_b, off_b: int) -> torch.Tensor:
    (pos,) = ctx.saved_tensors
    channels, H, W = ctx.grid_chw
    grad = drloc_scatter_op(grad_a, grad_b, pos, channels, H, W, off_b, ctx.channels_last)
    return grad.permute(0, 3, 1, 2) if ctx.channels_last else grad


@torch.library.custom_op("batchkin::drloc_gather", mutates_args=())
def drloc_gather_op(grid: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pos_range(pos, grid.shape[2], grid.shape[3])
    return drloc_gather_impl(grid, pos, _select(grid.device))


@drloc_gather_op.register_fake
def _(grid, pos):
    B, C = grid.shape[:2]
    shape = (B, pos.shape[1], C)
    return grid.new_empty(shape), grid.new_empty(shape)


def _gather_setup(ctx, inputs, output):
    grid, pos = inputs
    ctx.save_for_backward(pos)
    ctx.grid_chw = tuple(grid.shape[1:])
    ctx.channels_last = _channels_last(grid)


def _gather_backward(ctx, grad_a, grad_b):
    return _grid_grad(ctx, grad_a, grad_b, 0), None


drloc_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)


@torch.library.custom_op("batchkin::drloc_gather_cat", mutates_args=())
def drloc_gather_cat_op(grid: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    _check_pos_range(pos, grid.shape[2], grid.shape[3])
    return drloc_gather_cat_impl(grid, pos, _select(grid.device))


@drloc_gather_cat_op.register_fake
def _(grid, pos):
    B, C = grid.shape[:2]
    return grid.new_empty(B, pos.shape[1], 2 * C)


def _gather_cat_backward(ctx, grad):
    C = ctx.grid_chw[0]
    return _grid_grad(ctx, grad[..., :C], grad[..., C:], 0), None


drloc_gather_cat_op.register_autograd(_gather_cat_backward, setup_context=_gather_setup)


@torch.library.custom_op("batchkin::drloc_gather_sum", mutates_args=())
def drloc_gather_sum_op(
    table: torch.Tensor, pos: torch.Tensor, split: int, bias: torch.Tensor | None = None
) -> torch.Tensor:
    _check_pos_range(pos, table.shape[2], table.shape[3])
    return drloc_gather_sum_impl(table, pos, split, bias, _select(table.device))


@drloc_gather_sum_op.register_fake
def _(table, pos, split, bias=None):
    return table.new_empty(table.shape[0], pos.shape[1], split)


def _gather_sum_setup(ctx, inputs, output):
    table, pos, split, bias = inputs
    ctx.save_for_backward(pos)
    ctx.grid_chw = tuple(table.shape[1:])
    ctx.channels_last = _channels_last(table)
    ctx.split = split
    ctx.has_bias = bias is not None


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
    e = grid.new_empty(B, m, C)
    return e, grid.new_empty(B, m, C), grid.new_empty(B, m, 2, dtype=torch.float32), grid.new_empty(
        B, m, 4, dtype=torch.int64
    )


def _pairs_setup(ctx, inputs, output):
    grid = inputs[0]
    _, _, targets, pos = output
    ctx.mark_non_differentiable(targets, pos)
    ctx.save_for_backward(pos)
    ctx.grid_chw = tuple(grid.shape[1:])
    ctx.channels_last = _channels_last(grid)


def _pairs_backward(ctx, grad_a, grad_b, grad_targets, grad_pos):
    return _grid_grad(ctx, grad_a, grad_b, 0), None, None, None, None


drloc_pairs_op.register_autograd(_pairs_backward, setup_context=_pairs_setup)


@torch.library.custom_op("batchkin::drloc_first_layer_unique", mutates_args=())
def drloc_first_layer_unique_op(
    grid: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    _check_pos_range(pos, grid.shape[2], grid.shape[3])
    return drloc_first_layer_unique_impl(grid, pos, weight, bias, _select(grid.device))


@drloc_first_layer_unique_op.register_fake
def _(grid, pos, weight, bias=None):
    return grid.new_empty(grid.shape[0], pos.shape[1], weight.shape[0])


@torch.library.custom_op("batchkin::drloc_first_layer_unique_backward", mutates_args=())
def drloc_first_layer_unique_backward_op(
    grad: torch.Tensor, grid: torch.Tensor, pos: torch.Tensor, weight: torch.Tensor, has_bias: bool,
    channels_last: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return drloc_first_layer_unique_backward_impl(
        grad, grid, pos, weight, has_bias, channels_last, _select(grid.device)
    )


@drloc_first_layer_unique_backward_op.register_fake
def _(grad, grid, pos, weight, has_bias, channels_last):
    B, C, H, W = grid.shape
    shape = (B, H, W, C) if channels_last else (B, C, H, W)
    return grid.new_empty(shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])


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


# --------------------------------------------------------------------------- #
# Public API (argument checks, then the ops)
# --------------------------------------------------------------------------- #


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


#: The cost model's exchange rate: how many GEMM FLOPs take as long as moving one byte through
#: a gather, scatter or sum (per device type). On the CPU a fp32 GEMM runs at tens of GFLOP/s
#: per core while the index-driven copies move a few GB/s: 16 reproduces the measured
#: gather/project crossovers of the benchmark sizes (B = 256, m = 64, hidden = 512) on a 2-core
#: AVX2 machine. ``unique`` never multiplies more than either and, with its chunked C++ op,
#: moves fewer bytes, so on the host it wins wherever it may run. On a GPU the gap between
#: compute and memory is wider.
FLOPS_PER_BYTE = {"cpu": 16.0, "cuda": 24.0}
_DEFAULT_FLOPS_PER_BYTE = 16.0


def expected_distinct(m: int, n: int) -> float:
    """Expected number of distinct values among ``m`` uniform draws from ``n``: ``n (1 - (1 - 1/n)^m)``."""
    return n * -math.expm1(m * math.log1p(-1.0 / n)) if n > 1 else 1.0


def first_layer_costs(B: int, C: int, hidden: int, m: int, HW: int, elem_size: int = 4) -> dict:
    """The cost model of the first layer's strategies, forward + backward: ``{strategy: (flops, bytes)}``.

    ``flops`` counts the three matrix products (output, grid gradient, weight gradient) at
    2 FLOPs per multiply-add; ``bytes`` the memory traffic of everything else (gathers,
    scatters, sums, ``elem_size`` bytes per element), per step:

    * ``gather``: products over ``2m`` rows of ``C`` per image; gather the pairs into
      ``[B, m, 2C]`` (read + write), write the output, read its gradient, read the pairs'
      gradient back and write the grid gradient;
    * ``project``: products over all ``2 H*W`` token rows; write and read the token table
      ``[B, H*W, 2 hidden]`` (forward: gather-sum reads ``2m`` rows, writes ``m``; backward:
      reads the output gradient twice, writes the table's gradient);
    * ``unique``: products over the distinct tokens of each side, ``2 D`` rows with
      ``D = expected_distinct(m, H*W)``; read those rows twice (forward and backward), write
      the output, read its gradient, write the grid gradient (the C++ op keeps every
      intermediate of a chunk in cache).
    """
    D = expected_distinct(m, HW)
    mm = 3 * 2 * C * hidden  # FLOPs per row of one side (C inputs, hidden outputs), three products
    costs = {
        "gather": (B * 2 * m * mm, B * (2 * m * 2 * C + m * 2 * C + 2 * m * hidden + HW * C)),
        "project": (B * 2 * HW * mm, B * (3 * m * hidden + 2 * m * hidden + 2 * HW * hidden)),
        "unique": (B * 2 * D * mm, B * (2 * (2 * D * C) + 2 * m * hidden + HW * C)),
    }
    return {k: (flops, nbytes * elem_size) for k, (flops, nbytes) in costs.items()}


def choose_first_layer_strategy(
    B: int, C: int, hidden: int, m: int, HW: int, *, device_type: str = "cpu", elem_size: int = 4,
    allow_unique: bool = True,
) -> str:
    """The strategy ``"auto"`` runs: the cheapest of :func:`first_layer_costs` at
    ``flops + FLOPS_PER_BYTE[device_type] * bytes`` (ties go to ``gather``, then ``project``).

    ``unique`` competes only where ``allow_unique`` (CPU tensors on a non-Triton path: its row
    counts are data-dependent, known for free only on the host).
    """
    rate = FLOPS_PER_BYTE.get(device_type, _DEFAULT_FLOPS_PER_BYTE)
    costs = first_layer_costs(B, C, hidden, m, HW, elem_size)
    best, best_cost = None, math.inf
    for name in ("gather", "project", "unique"):
        if name == "unique" and not allow_unique:
            continue
        flops, nbytes = costs[name]
        cost = flops + rate * nbytes
        if cost < best_cost:
            best, best_cost = name, cost
    return best


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
