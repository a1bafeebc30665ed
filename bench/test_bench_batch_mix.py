"""Microbenchmarks of in-batch mixing (SDMP): the op against its baselines.

One test per (device, size, operator, implementation), all on the same inputs in
the same process, so ``pytest bench/test_bench_batch_mix.py --benchmark-only``
prints one table per group (device, size, operator). Implementations:

* ``op``       -- :func:`batch_mix` as dispatched (C++ on CPU, Triton on CUDA);
* ``ref``      -- the loop reference :func:`batch_mix_reference`;
* ``ref_vec``  -- the eager vectorised reference :func:`batch_mix_reference_vectorized`;
* ``loop``     -- the original code's style: a Python loop over samples, per-sample
  ``F.interpolate`` and slice paste, in place on a clone;
* ``timm``     -- timm's style: ``x.flip(0)``, one lam and one box for the whole batch;
* ``copy``     -- ``out.copy_(x)``, the device's copy bandwidth for the same bytes.

``extra_info`` records the path, shape, operator, dtype, the thread count, the ideal
bytes moved (every element read once and written once) and the achieved GB/s from
the median. The smallest size runs quickly (``-m "not slow"`` leaves out 224x224).
``test_bench_batch_mix_ssl_views`` times the SSL pipeline's own case: both uint8
views ``[2, B, 3, H, W]`` mixed in one call.

Every implementation returns a freshly allocated output (~150 MB at 224x224), whose
first touch can cost more than the mixing (docs/kernels/batch_mix.md, "Large outputs"):
the C++ path reuses huge-page blocks, the references use PyTorch's default allocation
(``THP_MEM_ALLOC_ENABLE=1`` in the environment makes PyTorch itself request huge
pages for every allocation of 2 MiB or more, the references' included).

Timings on a loaded machine: wall time includes the time other processes hold the
cores, and with more threads than free cores each parallel region of an eager
reference can stall on a descheduled OpenMP thread. ``OMP_NUM_THREADS=1`` with
``--benchmark-timer time.process_time`` (CPU time of the process) is the
load-insensitive comparison.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchkin.kernels import batch_mix as bm

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
SIZES = [
    pytest.param((16, 3, 32, 32), id="16x3x32x32"),
    pytest.param((256, 3, 32, 32), id="256x3x32x32"),
    pytest.param((256, 3, 224, 224), id="256x3x224x224", marks=pytest.mark.slow),
]
OPS = ["mixup", "cutmix", "resizemix"]
IMPLS = ["op", "ref", "ref_vec", "loop", "timm", "copy"]


def loop_style(x, op_code, lam, boxes):
    """The original code's style: per sample, in place on a clone."""
    B = x.shape[0]
    out = x.clone()
    for i in range(B):
        j = B - 1 - i
        if op_code == bm.MIXUP:
            out[i] = lam[i] * x[i] + (1 - lam[i]) * x[j]
            continue
        y0, x0, h, w = boxes[0, i].tolist()
        if h == 0 or w == 0:
            continue
        if op_code == bm.CUTMIX:
            out[i, :, y0 : y0 + h, x0 : x0 + w] = x[j, :, y0 : y0 + h, x0 : x0 + w]
        else:
            out[i, :, y0 : y0 + h, x0 : x0 + w] = F.interpolate(
                x[j : j + 1], size=(h, w), mode="bilinear", align_corners=False
            )[0]
    return out


def timm_style(x, op_code, lam, boxes):
    """timm's style: flip the batch, one lam and one box for the whole batch."""
    flipped = x.flip(0)
    if op_code == bm.MIXUP:
        return x.mul(lam).add_(flipped.mul_(1.0 - lam))
    y0, x0, h, w = boxes
    out = x.clone()
    if op_code == bm.CUTMIX:
        out[:, :, y0 : y0 + h, x0 : x0 + w] = flipped[:, :, y0 : y0 + h, x0 : x0 + w]
    else:
        out[:, :, y0 : y0 + h, x0 : x0 + w] = F.interpolate(flipped, size=(h, w), mode="bilinear", align_corners=False)
    return out


def _inputs(shape, name, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    V = shape[0] if len(shape) == 5 else 1
    B, C, H, W = shape[-4:]
    x = torch.randn(shape, generator=g)
    x = (x * 40 + 128).clamp_(0, 255).to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
    params = bm.sample_mix_params(B, H, W, generator=g, ops=(name,), num_views=V, device=device)
    return x.to(device), params


def _cuda_synced(fn, device):
    if device != "cuda":
        return fn

    def synced():
        r = fn()
        torch.cuda.synchronize()
        return r

    return synced


def _record(benchmark, x, impl, name, device):
    benchmark.extra_info.update(
        path=impl if impl != "op" else ("triton" if device == "cuda" else "cpp"),
        shape=list(x.shape),
        operator=name,
        dtype=str(x.dtype).removeprefix("torch."),
        device=device,
        threads=torch.get_num_threads(),
        bytes=bm.bytes_moved(x),
    )


def _gbps(benchmark, x):
    benchmark.extra_info["GBps"] = round(bm.bytes_moved(x) / benchmark.stats.stats.median / 1e9, 3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_bench_batch_mix(benchmark, device, shape, name, impl):
    x, params = _inputs(shape, name, device)
    code = bm.OPERATORS[name]
    big = shape[-1] >= 224
    if impl == "op":
        fn = lambda: bm.batch_mix(x, *params, check_values=False)  # noqa: E731
    elif impl == "ref":
        fn = lambda: bm.batch_mix_reference(x, *params)  # noqa: E731
    elif impl == "ref_vec":
        fn = lambda: bm.batch_mix_reference_vectorized(x, *params)  # noqa: E731
    elif impl == "loop":
        lam_cpu, boxes_cpu = params.lam.cpu(), params.boxes.cpu()
        fn = lambda: loop_style(x, code, lam_cpu.tolist(), boxes_cpu)  # noqa: E731
    elif impl == "timm":
        lam0 = float(params.lam[0])
        box0 = tuple(int(t) for t in params.boxes[0, 0])
        fn = lambda: timm_style(x, code, lam0, box0)  # noqa: E731
    else:
        out = torch.empty_like(x)
        fn = lambda: out.copy_(x)  # noqa: E731

    fn = _cuda_synced(fn, device)
    benchmark.group = f"batch_mix {device} {'x'.join(map(str, shape))} {name}"
    _record(benchmark, x, impl, name, device)
    slow_baseline = big and impl in ("ref", "ref_vec", "loop")
    rounds = 3 if slow_baseline else (7 if big else 20)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)  # two: steady state holds two outputs
    _gbps(benchmark, x)


SSL_SIZES = [
    pytest.param((2, 256, 3, 32, 32), id="2x256x3x32x32"),
    pytest.param((2, 256, 3, 224, 224), id="2x256x3x224x224", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("impl", ["op", "ref", "copy"])
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("shape", SSL_SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_bench_batch_mix_ssl_views(benchmark, device, shape, name, impl):
    """The SSL pipeline's call: both uint8 global views mixed in one pass."""
    x, params = _inputs(shape, name, device, torch.uint8)
    if impl == "op":
        fn = lambda: bm.batch_mix(x, *params, check_values=False)  # noqa: E731
    elif impl == "ref":
        fn = lambda: bm.batch_mix_reference(x, *params)  # noqa: E731
    else:
        out = torch.empty_like(x)
        fn = lambda: out.copy_(x)  # noqa: E731
    fn = _cuda_synced(fn, device)
    big = shape[-1] >= 224
    benchmark.group = f"batch_mix {device} uint8 views {'x'.join(map(str, shape))} {name}"
    _record(benchmark, x, impl, name, device)
    rounds = (3 if impl == "ref" else 7) if big else 20
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=2)  # two: steady state holds two outputs
    _gbps(benchmark, x)
