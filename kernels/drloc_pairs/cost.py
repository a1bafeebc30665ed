"""The cost model that picks the DRLoc head's first-layer strategy (docs/kernels/drloc_pairs.md)."""

from __future__ import annotations

import math

#: GEMM FLOPs that take as long as moving one byte through a gather, scatter or sum, per device
#: type (how 16 and 24 were found: docs/kernels/drloc_pairs.md, "Cost model").
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
