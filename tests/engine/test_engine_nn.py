"""Tests of batchkin.nn: the BatchFormer layers against ``nn.TransformerEncoderLayer``
and against the layer written out by hand with its documented dropout masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from batchkin import nn as bnn
from batchkin.kernels import batch_attention as ba
from batchkin.kernels import rng


def _gen(*salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(rng.derive_key(20240607, *salt))


def test_layer_feature_mask_definition():
    seed, stream, p = 99, bnn.STREAM_FFN, 0.5
    mask = bnn.layer_dropout_mask(seed, stream, (7, 13), p)
    want = rng.uniform(rng.derive_key(seed, stream), torch.arange(7 * 13)).view(7, 13) >= p
    assert mask.dtype == torch.bool and torch.equal(mask, want)

def test_feature_mask_chi_square():
    keep = bnn.layer_dropout_mask(7, bnn.STREAM_RESIDUAL1, (512, 64), 0.5)
    assert stats.binomtest(int(keep.sum()), keep.numel(), 0.5).pvalue > 1e-3
    assert stats.chisquare(keep.sum(0).double().numpy()).pvalue > 1e-3
    other = bnn.layer_dropout_mask(7, bnn.STREAM_RESIDUAL2, (512, 64), 0.5)
    a, b = keep.reshape(-1), other.reshape(-1)  # two streams of one seed are independent
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    assert stats.chi2_contingency(table).pvalue > 1e-3

def test_torch_compile_layer():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layer = bnn.BatchFormerLayer(32).train()
    x = torch.randn(9, 32, generator=_gen(43), requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y = compiled(x, seed=5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    y_ref = layer(x, seed=5)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)

def test_layer_bad_inputs():
    layer = bnn.BatchFormerLayer(16)
    with pytest.raises(ValueError, match="x must have 2 dimensions"):
        layer(torch.randn(4, 1, 16))
    with pytest.raises(ValueError, match=r"x must have shape \[\*, 16\]"):
        layer(torch.randn(4, 8))
    with pytest.raises(TypeError, match="generator must be"):
        layer(torch.randn(4, 16), generator=3)
    with pytest.raises(TypeError, match="seed must be an int"):
        layer(torch.randn(4, 16), seed=0.5)
    with pytest.raises(ValueError, match="nhead"):
        bnn.BatchFormerLayer(18, nhead=4)
    with pytest.raises(ValueError, match="dropout"):
        bnn.BatchFormerLayer(16, dropout=1.0)
    with pytest.raises(ValueError, match="num_layers"):
        bnn.BatchFormer(16, num_layers=0)


# --------------------------------------------------------------------------- #
# The BatchFormer layer against nn.TransformerEncoderLayer
# --------------------------------------------------------------------------- #


def _layer_pair(C, dropout):
    with torch.random.fork_rng():
        torch.manual_seed(C)
        torch_layer = nn.TransformerEncoderLayer(C, 4, C, dropout)
        ours = bnn.BatchFormerLayer(C, 4, C, dropout)
    ours.load_state_dict(torch_layer.state_dict())
    return torch_layer, ours


def test_layer_parameter_names_and_shapes():
    torch_layer, ours = _layer_pair(16, 0.5)
    theirs = {k: v.shape for k, v in torch_layer.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert mine == theirs
    torch_layer.load_state_dict(ours.state_dict())  # both ways
    assert bnn.BatchFormerLayer(16).linear1.out_features == 16  # dim_feedforward defaults to d_model


def _compare_layers(torch_layer, ours, x, gen, tol):
    y_t = torch_layer(x.unsqueeze(1)).squeeze(1)
    y_o = ours(x)
    torch.testing.assert_close(y_o, y_t, **tol)
    w = torch.randn(y_t.shape, generator=gen)
    names = [n for n, _ in ours.named_parameters()]
    g_t = torch.autograd.grad((y_t * w).sum(), [x, *[dict(torch_layer.named_parameters())[n] for n in names]])
    g_o = torch.autograd.grad((y_o * w).sum(), [x, *[dict(ours.named_parameters())[n] for n in names]])
    for name, a, b in zip(["x", *names], g_o, g_t):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("mode", ["eval", "train_without_dropout"])
@pytest.mark.parametrize("B", [1, 7, 33])
@pytest.mark.parametrize("C", [16, 64])
def test_layer_matches_torch(C, B, mode):
    training = mode != "eval"
    torch_layer, ours = _layer_pair(C, 0.0 if training else 0.5)
    torch_layer.train(training)
    ours.train(training)
    gen = _gen(51 if training else 50, C, B)
    x = torch.randn(B, C, generator=gen, requires_grad=True)
    _compare_layers(torch_layer, ours, x, gen, dict(rtol=1e-5, atol=1e-5))
    if not training:
        with torch.no_grad():  # torch's inference fast path
            torch.testing.assert_close(ours(x), torch_layer(x.unsqueeze(1)).squeeze(1), rtol=1e-5, atol=1e-5)


def _hand_built_layer(layer, x, seed):
    """The layer in training mode written out by hand with the documented masks."""
    p, h = layer.dropout_p, layer.nhead
    B, C = x.shape
    d = C // h
    sa_mod = layer.self_attn
    qkv = x @ sa_mod.in_proj_weight.t() + sa_mod.in_proj_bias
    q, k, v = (t.reshape(B, h, d).transpose(0, 1) for t in qkv.split(C, dim=1))
    keep = ba.dropout_keep_mask(rng.derive_key(seed), h, B, p)
    attn = ba.batch_attention_reference(q, k, v, 1.0 / math.sqrt(d), keep, p).transpose(0, 1).reshape(B, C)
    sa = attn @ sa_mod.out_proj.weight.t() + sa_mod.out_proj.bias

    def drop(t, stream):
        u = rng.uniform(rng.derive_key(seed, stream), torch.arange(t.numel())).view(t.shape)
        return t * (u >= p).float() / (1.0 - p)

    x1 = F.layer_norm(x + drop(sa, 1), (C,), layer.norm1.weight, layer.norm1.bias, layer.norm1.eps)
    ff = torch.relu(x1 @ layer.linear1.weight.t() + layer.linear1.bias)
    ff = drop(ff, 2) @ layer.linear2.weight.t() + layer.linear2.bias
    return F.layer_norm(x1 + drop(ff, 3), (C,), layer.norm2.weight, layer.norm2.bias, layer.norm2.eps)


@pytest.mark.parametrize("p", [0.5, 0.25])
@pytest.mark.parametrize("B,C", [(7, 16), (33, 64)])
def test_layer_dropout_matches_hand_built_reference(B, C, p):
    _, layer = _layer_pair(C, p)
    layer.train()
    gen = _gen(52, B, C)
    x = torch.randn(B, C, generator=gen, requires_grad=True)
    seed = 4242 + B
    y = layer(x, seed=seed)
    y_ref = _hand_built_layer(layer, x, seed)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn(B, C, generator=gen)
    params = [x, *layer.parameters()]
    for a, b in zip(torch.autograd.grad((y * w).sum(), params), torch.autograd.grad((y_ref * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # dropout is really on: without it the output differs
    assert not torch.allclose(y, layer.eval()(x), atol=1e-3)


def test_layer_generator_seeds():
    _, layer = _layer_pair(16, 0.5)
    layer.train()
    x = torch.randn(9, 16, generator=_gen(53))
    a = layer(x, generator=torch.Generator().manual_seed(1))
    b = layer(x, generator=torch.Generator().manual_seed(1))
    c = layer(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    seed = bnn.draw_seed(torch.Generator().manual_seed(1))
    assert torch.equal(a, layer(x, seed=seed))
    # without a generator the seed comes from the default generator
    with torch.random.fork_rng():
        torch.manual_seed(3)
        d = layer(x)
        torch.manual_seed(3)
        e = layer(x, seed=bnn.draw_seed())
    assert torch.equal(d, e)


@pytest.mark.parametrize("mode", ["eval", "train_nodrop"])
def test_layer_permutation_equivariant(mode):
    _, layer = _layer_pair(32, 0.0 if mode == "train_nodrop" else 0.5)
    layer.train(mode != "eval")
    gen = _gen(54)
    x = torch.randn(21, 32, generator=gen)
    perm = torch.randperm(21, generator=gen)
    torch.testing.assert_close(layer(x[perm]), layer(x)[perm], rtol=1e-5, atol=1e-5)


def test_batchformer_stack():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = bnn.BatchFormer(16, num_layers=3, nhead=2, dropout=0.5)
    assert len(model.layers) == 3 and "layers.2.self_attn.in_proj_weight" in model.state_dict()
    x = torch.randn(10, 16, generator=_gen(55))
    model.train()
    y = model(x, seed=8)
    z = x
    for i, layer in enumerate(model.layers):
        z = layer(z, seed=rng.derive_key(8, i))
    assert torch.equal(y, z)
    model.eval()
    z = x
    for layer in model.layers:
        z = layer(z)
    torch.testing.assert_close(model(x), z)

# CUDA-only coverage (defined only where a GPU exists, so nothing is skipped here)
if torch.cuda.is_available():

    def test_cuda_layer_matches_cpu():
        _, layer = _layer_pair(64, 0.5)
        layer.train()
        x = torch.randn(33, 64, generator=_gen(61))
        y_cpu = layer(x, seed=5)
        y_gpu = layer.cuda()(x.cuda(), seed=5)
        torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-4)
