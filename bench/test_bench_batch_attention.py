"""Benchmarks of batch attention and the BatchFormer layer (forward + backward).

Layer (``test_bench_layer``): ``BatchFormerLayer(C)`` against
``nn.TransformerEncoderLayer(C, 4, C, 0.5)`` fed ``x.unsqueeze(1)``, both in
training mode (every dropout on), same weights, same input, in one process:

* ``batchkin`` — our layer (the attention through ``batch_attention``'s auto path);
* ``torch``    — ``nn.TransformerEncoderLayer``.

Op (``test_bench_op``): the attention core alone, ``[4, B, d]``, dropout 0 and 0.5:

* ``batchkin``  — ``batch_attention`` (auto path: SDPA / blockwise math on CPU, Triton on CUDA);
* ``reference`` — ``batch_attention_reference`` (explicit math, autograd), given a
  precomputed keep mask (its generation is not timed);
* ``torch_sdpa`` — ``F.scaled_dot_product_attention`` with the same dropout
  probability (torch's own random mask).

Memory, in ``extra_info``: on CUDA ``peak_bytes`` is ``torch.cuda.max_memory_allocated``
during one forward + backward, above what was allocated before; on every device
``saved_bytes`` is the size of the tensors autograd saves for the backward
(measured with ``torch.autograd.graph.saved_tensors_hooks``, each storage counted
once); ``threads`` is torch's intra-op thread count the case ran with. Each case is
timed for about two seconds (its round count follows from one timed step), so the
fast CPU cases get enough rounds for a stable median. The smallest size is the
quick one: ``-m "not slow"`` runs only it.

    pytest bench/test_bench_batch_attention.py --benchmark-only
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchkin.kernels import batch_attention as ba
from batchkin.nn import BatchFormerLayer

_NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=_NO_CUDA)]

LAYER_SIZES = [(B, C) for B in (128, 512, 1024) for C in (64, 512, 2048)]
QUICK = (128, 64)
LAYER_PARAMS = [
    pytest.param(B, C, id=f"B{B}-C{C}", marks=() if (B, C) == QUICK else pytest.mark.slow) for B, C in LAYER_SIZES
]
OP_SIZES = [(B, d) for B in (128, 512, 1024) for d in (16, 128)]
OP_PARAMS = [
    pytest.param(B, d, id=f"B{B}-d{d}", marks=() if (B, d) == (128, 16) else pytest.mark.slow) for B, d in OP_SIZES
]


def _rounds(step, device: str, budget_s: float = 2.0) -> int:
    """Rounds for about ``budget_s`` of timing per case, from one timed step (5 to 200).

    Sized by the measured step time, not by a FLOP estimate, so a fast case gets
    enough rounds for a stable median on a noisy shared CPU (a few milliseconds
    per step at B=128 would otherwise be timed only 20 times), and the slow ones
    still finish in seconds.
    """
    t0 = time.perf_counter()
    step()
    elapsed = time.perf_counter() - t0
    return max(5, min(200, math.ceil(budget_s / max(elapsed, 1e-6))))


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def _memory(step, device: str) -> dict:
    """Saved-for-backward bytes of one step (and the CUDA peak above the baseline)."""
    storages: dict = {}

    def pack(t):
        st = t.untyped_storage()
        storages[(t.device, st.data_ptr())] = st.nbytes()
        return t

    info = {}
    if device == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    if device == "cuda":
        _sync(device)
        info["peak_bytes"] = torch.cuda.max_memory_allocated() - base
    info["saved_bytes"] = sum(storages.values())
    return info


@pytest.mark.parametrize("B,C", LAYER_PARAMS)
@pytest.mark.parametrize("impl", ["batchkin", "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_bench_layer(benchmark, device, impl, B, C):
    gen = torch.Generator().manual_seed(B * 10_000 + C)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(C)
        torch_layer = nn.TransformerEncoderLayer(C, 4, C, 0.5)
    ours = BatchFormerLayer(C, 4, C, 0.5)
    ours.load_state_dict(torch_layer.state_dict())
    layer = (ours if impl == "batchkin" else torch_layer).to(device).train()
    x = torch.randn(B, C, generator=gen).to(device).requires_grad_()
    forward = (lambda: layer(x)) if impl == "batchkin" else (lambda: layer(x.unsqueeze(1)).squeeze(1))

    def step():
        x.grad = None
        forward().sum().backward()
        _sync(device)

    step()  # warm-up (and the first-use costs)
    benchmark.group = f"layer-B{B}-C{C}-{device}"
    benchmark.extra_info.update(path=impl, device=device, B=B, C=C, heads=4, dropout=0.5, baseline="torch")
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if impl == "batchkin":
        benchmark.extra_info["attention_path"] = ba.explain_path(device, C // 4)[0]
    benchmark.extra_info.update(_memory(step, device))
    benchmark.pedantic(step, rounds=_rounds(step, device), iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("p", [0.0, 0.5], ids=["nodrop", "drop"])
@pytest.mark.parametrize("B,d", OP_PARAMS)
@pytest.mark.parametrize("impl", ["batchkin", "reference", "torch_sdpa"])
@pytest.mark.parametrize("device", DEVICES)
def test_bench_op(benchmark, device, impl, B, d, p):
    h = 4
    gen = torch.Generator().manual_seed(B + d)
    q, k, v = (torch.randn(h, B, d, generator=gen).to(device).requires_grad_() for _ in range(3))
    grad = torch.randn(h, B, d, generator=gen).to(device)
    seed = 7
    keep = ba.dropout_keep_mask(ba.attention_key(seed), h, B, p, device) if p > 0 else None
    scale = d**-0.5

    if impl == "batchkin":

        def forward():
            return ba.batch_attention(q, k, v, dropout_p=p, seed=seed)

    elif impl == "reference":

        def forward():
            return ba.batch_attention_reference(q, k, v, scale, keep, p)

    else:

        def forward():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=p)

    def step():
        for t in (q, k, v):
            t.grad = None
        forward().backward(grad)
        _sync(device)

    step()
    benchmark.group = f"op-B{B}-d{d}-p{p}-{device}"
    benchmark.extra_info.update(path=impl, device=device, shape=[h, B, d], dropout=p)
    benchmark.extra_info["threads"] = torch.get_num_threads()
    if impl == "batchkin":
        benchmark.extra_info["attention_path"] = ba.explain_path(device, d)[0]
    benchmark.extra_info.update(_memory(step, device))
    benchmark.pedantic(step, rounds=_rounds(step, device), iterations=1, warmup_rounds=1)
