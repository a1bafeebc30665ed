"""DRLoc pair sampling: draw token pairs on the grid's device, gather both embeddings, targets.

DRLoc (METHODS.md section 3) samples ``m`` pairs of positions per image from the final token
grid ``grid [B, C, H, W]`` (float32, float16 or bfloat16; any strides — a permuted view of ViT
tokens ``[B, H*W, C]`` is used as it is) and asks a small MLP to predict each pair's relative
offset. The op never synchronises with the host and never copies the whole grid.

Positions: int64 ``pos [B, m, 4] = (r_a, c_a, r_b, c_b)``, each coordinate uniform in its range,
independent, with replacement. Draw ``t`` of pair ``j`` of image ``b`` is
``v = min(floor(rng.uniform(key, (b * m + j) * 4 + t) * size), size - 1)`` (one float32
multiplication; ``size`` = H for t in {0, 2}, W otherwise), so every path draws the same
positions from the same 32-bit ``key`` (``rng.derive_key(seed, step)``, or one draw of a CPU
``torch.Generator``).

Targets: float32 ``[B, m, 2]`` (row, col) of ``delta = a - b``: ``abs`` mode ``|delta|``,
``signed`` mode ``delta + (size - 1)``; ``normalize`` divides by ``max(size - 1, 1)``.

Gathers: ``e_a[b, j] = grid[b, :, r_a, c_a]``, ``e_b`` likewise (``[B, m, C]``, the grid's
dtype; :func:`drloc_gather_cat` writes ``[B, m, 2C]``). Gradient w.r.t. the grid only: a
scatter-add accumulated in float32 in a fixed order, so every path returns the same bits, laid
out like the grid. Double backward is not supported.

First head layer: :func:`drloc_first_layer` equals ``F.linear(cat(e_a, e_b, -1), weight, bias)``
by the cheapest of three strategies (``gather``, ``project``, ``unique``; see
:func:`choose_first_layer_strategy`), differentiable w.r.t. grid, weight and bias.

Paths: ``triton`` (CUDA), ``cpp`` (CPU, ``batchkin::_drloc_*_cpu`` from ``csrc/drloc_pairs.cpp``),
``ref`` (the PyTorch references). Out-of-range positions are a ``ValueError`` for CPU tensors
and an asynchronous device assertion elsewhere. Registered ops: ``batchkin::drloc_pairs``,
``drloc_positions``, ``drloc_gather``, ``drloc_gather_cat``, ``drloc_gather_sum``,
``drloc_scatter``, ``drloc_first_layer_unique`` (and its backward). Design notes:
docs/kernels/drloc_pairs.md.
"""

from .api import (
    GRID_DTYPES,
    MAX_DRAWS,
    MODES,
    STRATEGIES,
    drloc_first_layer,
    drloc_gather,
    drloc_gather_cat,
    drloc_pairs,
    drloc_positions,
    drloc_targets,
)
from .cost import FLOPS_PER_BYTE, choose_first_layer_strategy, expected_distinct, first_layer_costs
from .op import (
    INFO,
    drloc_first_layer_unique_backward_impl,
    drloc_first_layer_unique_backward_op,
    drloc_first_layer_unique_impl,
    drloc_first_layer_unique_op,
    drloc_gather_cat_impl,
    drloc_gather_cat_op,
    drloc_gather_impl,
    drloc_gather_op,
    drloc_gather_sum_impl,
    drloc_gather_sum_op,
    drloc_pairs_impl,
    drloc_pairs_op,
    drloc_positions_impl,
    drloc_positions_op,
    drloc_scatter_impl,
    drloc_scatter_op,
)
from .reference import (
    drloc_first_layer_reference,
    drloc_first_layer_unique_backward_reference,
    drloc_first_layer_unique_reference,
    drloc_gather_reference,
    drloc_gather_sum_reference,
    drloc_pairs_reference,
    drloc_positions_reference,
    drloc_scatter_reference,
    drloc_targets_reference,
    drloc_unique_rows_reference,
)
