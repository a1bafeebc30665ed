"""Benchmarks of the reversed class sampler: one epoch of draws per call.

Implementations timed on the same class table and draw count:

* ``cpp``     — the C++ op directly (``reversed_sampler_impl(..., path="cpp")``);
* ``op``      — the public ``sample_epoch`` (argument checks, tables, dispatch);
* ``ref``     — the PyTorch reference (``torch.searchsorted``);
* ``multinomial`` — ``torch.multinomial`` for classes plus ``torch.rand`` for instances;
* ``python_loop`` — one draw at a time in Python, as the original code does it: a
  linear scan over cumulative class weights, then ``random.choice`` in the class.
  It is O(C) per draw, so on the two large sizes it runs on the first
  ``PY_LOOP_DRAWS`` draws only; ``extra_info["scale"]`` is the factor to multiply its
  time by to compare with a full epoch (the loop's cost is linear in the draws);
* ``triton``  — the Triton kernel, on CUDA only.

Sizes: ``small`` (100 classes, 10k draws; the quick one), ``c1000`` and ``c8142``
(1,000,000 draws over 1,000 and 8,142 long-tailed classes, heads first as in
CIFAR-LT). The large sizes are marked ``slow``: ``-m "not slow"`` runs only ``small``.

    pytest bench/test_bench_reversed_sampler.py --benchmark-only
"""

from __future__ import annotations

import random

import pytest
import torch

from batchkin.kernels import reversed_sampler as rs

PY_LOOP_DRAWS = 10_000

SIZES = {
    # name: (classes, n_max, imbalance, draws)
    "small": (100, 500, 10, 10_000),
    "c1000": (1000, 1000, 100, 1_000_000),
    "c8142": (8142, 1000, 500, 1_000_000),
}
SIZE_PARAMS = [pytest.param(name, marks=() if name == "small" else pytest.mark.slow) for name in SIZES]

_CACHE: dict = {}


def _setup(size: str, device: str):
    """Class table, prepared tables and per-class Python lists for one size (cached)."""
    key = (size, device)
    if key not in _CACHE:
        num_classes, n_max, imbalance, draws = SIZES[size]
        expo = torch.arange(num_classes, dtype=torch.float64) / (num_classes - 1)
        counts = torch.floor(n_max * (1.0 / imbalance) ** expo).to(torch.int64).clamp(min=1)
        labels = torch.repeat_interleave(torch.arange(num_classes), counts)
        labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
        sorted_indices, counts = rs.class_sorted_table(labels, num_classes)
        sorted_indices, counts = sorted_indices.to(device), counts.to(device)
        tables = rs.prepare_tables(sorted_indices, counts, "reversed")
        probs = rs.class_probabilities(counts, "reversed").to(device)
        _CACHE[key] = (sorted_indices, counts, tables, probs, draws)
    return _CACHE[key]


def _python_loop(class_members: list[list[int]], class_weight: list[float], num_draws: int, rnd: random.Random):
    total = sum(class_weight)
    num_classes = len(class_weight)
    out = []
    for _ in range(num_draws):
        target, running = rnd.random() * total, 0.0
        chosen = num_classes - 1
        for c in range(num_classes):
            running += class_weight[c]
            if target <= running:
                chosen = c
                break
        out.append(rnd.choice(class_members[chosen]))
    return out


def _multinomial(sorted_indices, tables, probs, num_draws, gen):
    cls = torch.multinomial(probs, num_draws, replacement=True, generator=gen)
    u = torch.rand(num_draws, generator=gen, dtype=torch.float64, device=probs.device)
    n_c = tables.counts[cls]
    inst = torch.minimum((u * n_c).to(torch.int64), n_c - 1)
    return sorted_indices[tables.offsets[cls] + inst]


_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# (implementation, device): the C++ op and the Python loop are CPU-only; Triton is timed on CUDA
# only (the CPU interpreter is a test vehicle, not a fast path).
CASES = [pytest.param(impl, "cpu", id=f"{impl}-cpu") for impl in ("cpp", "op", "ref", "multinomial", "python_loop")]
CASES += [
    pytest.param(impl, "cuda", id=f"{impl}-cuda", marks=_NO_CUDA) for impl in ("triton", "op", "ref", "multinomial")
]


@pytest.mark.parametrize("size", SIZE_PARAMS)
@pytest.mark.parametrize("impl,device", CASES)
def test_bench_reversed_sampler(benchmark, impl, device, size):
    sorted_indices, counts, tables, probs, draws = _setup(size, device)
    key = rs.epoch_key(0, 1)
    benchmark.group = f"reversed_sampler-{size}-{device}"
    benchmark.extra_info.update(
        path=impl, device=device, classes=counts.numel(), dataset=sorted_indices.numel(), draws=draws, scale=1.0
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if impl in ("cpp", "ref", "triton"):

        def run():
            out = rs.reversed_sampler_impl(sorted_indices, *tables, key, 0, draws, path=impl)
            sync()
            return out

    elif impl == "op":

        def run():
            out = rs.sample_epoch(sorted_indices, counts, draws, seed=0, epoch=1)
            sync()
            return out

    elif impl == "multinomial":
        gen = torch.Generator(device=device).manual_seed(0)

        def run():
            out = _multinomial(sorted_indices, tables, probs, draws, gen)
            sync()
            return out

    else:  # python_loop
        loop_draws = min(draws, PY_LOOP_DRAWS)
        benchmark.extra_info.update(draws=loop_draws, scale=draws / loop_draws)
        offsets, cnt = tables.offsets.tolist(), tables.counts.tolist()
        flat = sorted_indices.tolist()
        members = [flat[o : o + n] for o, n in zip(offsets, cnt)]
        weights = [max(cnt) / n for n in cnt]  # w_c = n_max / n_c
        rnd = random.Random(0)
        out = benchmark.pedantic(_python_loop, args=(members, weights, loop_draws, rnd), rounds=3, iterations=1)
        assert len(out) == loop_draws
        return

    out = benchmark(run)
    assert out.shape == (draws,)
