"""The training step's cheap checks: the loss read once, the gradients' finiteness in one fused pass."""

from __future__ import annotations

import math

import pytest
import torch

from batchkin.trainer import _grads_finite, _read_loss


def _params(*grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        params.append(p)
    return params


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_grads_finite_fused_pass_leaves_the_gradients_bit_for_bit(bad, dtype):
    g1 = torch.tensor([1e-40, -0.0, 3.5, -2.0]).to(dtype)  # a float32 subnormal and a negative zero
    g2 = torch.arange(6, dtype=dtype).view(2, 3)
    params = _params(g1.clone(), g2.clone())
    assert _grads_finite(params)
    assert all(torch.equal(p.grad.view(torch.uint8), g.view(torch.uint8)) for p, g in zip(params, (g1, g2)))
    params[1].grad[1, 2] = bad
    assert not _grads_finite(params)
    params[1].grad[1, 2] = 1.0
    assert _grads_finite(params)  # the flag is reset between calls


def test_grads_finite_checks_one_tensor_at_a_time_where_the_fused_kernel_refuses():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 3])).sum().backward()
    dense = _params(torch.ones(2))
    assert emb.weight.grad.is_sparse
    assert _grads_finite([emb.weight, *dense])
    emb.weight.grad = torch.sparse_coo_tensor(torch.tensor([[1]]), torch.tensor([[float("nan"), 0.0, 0.0]]), (5, 3))
    assert not _grads_finite([emb.weight, *dense])
    assert _grads_finite([])


def test_read_loss_reads_the_loss_and_each_terms_mean_at_once_and_names_the_bad_terms():
    a, b = torch.tensor(1.5), torch.tensor(2.25)
    assert _read_loss(a + b, {"a": a, "b": b}) == (3.75, [1.5, 2.25], [True, True])
    for bad in (float("inf"), float("nan")):
        c = torch.tensor(bad)
        value, _, finite = _read_loss(a + c, {"a": a, "c": c})
        assert not math.isfinite(value) and finite == [True, False]
    big = torch.tensor(3e38)  # finite terms whose float32 sum overflows: every term is finite
    value, means, finite = _read_loss(big + big, {"x": big, "y": big})
    assert value == math.inf and finite == [True, True] and means == [float(big)] * 2
    # a term with +inf and -inf elements (mean NaN) and one with a single NaN among finite values
    v = torch.tensor([1.0, float("inf"), float("-inf")])
    w = torch.tensor([[0.5, float("nan")], [2.0, 3.0]])
    value, means, finite = _read_loss(torch.ones(2), {"v": v, "w": w, "a": a})
    assert value is None and finite == [False, False, True] and means[2] == 1.5
