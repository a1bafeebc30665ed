"""Tests of batch attention (the attention core of BatchFormer).

Every path (``sdpa`` = the CPU fast path, ``triton`` = the Triton kernels, run by
the interpreter on CPU tensors, ``ref`` = the op's explicit-math path) is compared
with :func:`batch_attention_reference` (autograd through explicit math) on fresh
random inputs, forward and gradients. The BatchFormer layers are tested in
tests/engine/test_engine_nn.py, the mask hashing in test_rng_mask.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from _util import DT_ID, TOL, aot, compile_for_cuda, gen, path_params
from _util import FLOAT_DTYPES as DTYPES
from scipy import stats

from batchkin.kernels import batch_attention as ba
from batchkin.kernels import dispatch, rng
from batchkin.kernels.batch_attention import cpu
from batchkin.kernels.rng_mask import float32

SEED = 20240607


def _gen(*salt: int) -> torch.Generator:
    return gen(SEED, *salt)


def _qkv(h, B, d, dtype, gen, requires_grad=True):
    out = []
    for _ in range(3):
        t = torch.randn(h, B, d, generator=gen).to(dtype)
        out.append(t.requires_grad_(requires_grad))
    return out


def _run(path, q, k, v, grad, **kw):
    out = ba.batch_attention_impl(q, k, v, path=path, **kw)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads


def _reference(q, k, v, grad, scale, keep, p):
    out = ba.batch_attention_reference(q, k, v, scale, keep, p)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    return out, grads


def _check_against_reference(path, h, B, d, dtype, p, salt, mask=None, scale=None):
    gen = _gen(h, B, d, salt)
    q, k, v = _qkv(h, B, d, dtype, gen)
    grad = torch.randn(h, B, d, generator=gen).to(dtype)
    seed = 1000 + salt
    out, grads = _run(path, q, k, v, grad, dropout_p=p, seed=seed, dropout_mask=mask, scale=scale)
    keep = None
    if p > 0:
        keep = mask if mask is not None else ba.dropout_keep_mask(ba.attention_key(seed), h, B, p)
    ref_scale = scale if scale is not None else 1.0 / math.sqrt(d)
    ref_out, ref_grads = _reference(q, k, v, grad, ref_scale, keep, p)
    assert out.dtype == dtype and out.shape == (h, B, d)
    torch.testing.assert_close(out, ref_out, **TOL[dtype])
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype and g.shape == (h, B, d), name
        torch.testing.assert_close(g, rg, **TOL[dtype], msg=lambda m: f"d{name}: {m}")

# --------------------------------------------------------------------------- #
# Parity: the CPU fast path (SDPA / explicit blockwise math) and the op's ref path
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("p", [0.0, 0.3], ids=["nodrop", "drop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("d", [16, 32, 64, 128])
@pytest.mark.parametrize("B", [1, 2, 7, 64, 257])
def test_sdpa_path_matches_reference(B, d, dtype, p):
    _check_against_reference("sdpa", 3, B, d, dtype, p, salt=1)


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("B,d", [(1, 16), (7, 32), (64, 64), (257, 16)])
def test_ref_path_matches_reference(B, d, p):
    """The op's ``ref`` path (explicit forward and hand-written backward)."""
    _check_against_reference("ref", 2, B, d, torch.float32, p, salt=2)


def test_sdpa_path_row_blocks(monkeypatch):
    """The explicit path split into many row blocks (odd tail) equals the reference."""
    monkeypatch.setattr(cpu, "_CPU_BLOCK_ELEMS", 3 * 50 * 7)  # 7 rows per block, B = 50
    _check_against_reference("sdpa", 3, 50, 16, torch.float32, 0.4, salt=3)
    mask = torch.rand(3, 50, 50, generator=_gen(4)) > 0.4
    _check_against_reference("sdpa", 3, 50, 16, torch.float32, 0.4, salt=4, mask=mask)


@pytest.mark.parametrize("d", [2, 24])
def test_sdpa_path_odd_head_dims(d):
    _check_against_reference("sdpa", 2, 9, d, torch.float32, 0.0, salt=5)
    _check_against_reference("sdpa", 2, 9, d, torch.float32, 0.2, salt=6)


def test_custom_scale():
    _check_against_reference("sdpa", 2, 11, 16, torch.float32, 0.0, salt=7, scale=0.9)
    _check_against_reference("sdpa", 2, 11, 16, torch.float32, 0.3, salt=8, scale=0.05)


@pytest.mark.parametrize("path", ["sdpa", "ref"])
def test_explicit_mask_matches_reference(path):
    mask = torch.rand(3, 33, 33, generator=_gen(9)) > 0.25
    _check_against_reference(path, 3, 33, 16, torch.float32, 0.25, salt=9, mask=mask)


# --------------------------------------------------------------------------- #
# Parity: Triton (interpreter on CPU tensors)
# --------------------------------------------------------------------------- #

TRITON_CASES = [(B, d) for d in (16, 32) for B in (1, 2, 7, 64, 257)] + [
    (B, d) for d in (64, 128) for B in (1, 7, 64)
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("B,d", TRITON_CASES)
def test_triton_matches_reference(B, d, dtype):
    _check_against_reference("triton", 2, B, d, dtype, 0.0, salt=10)


@pytest.mark.triton
@pytest.mark.parametrize(
    "B,d,dtype",
    [
        (7, 16, torch.float32),
        (70, 32, torch.float32),
        (257, 16, torch.float32),
        (33, 64, torch.bfloat16),
        (20, 128, torch.float16),
    ],
    ids=lambda x: DT_ID.get(x, str(x)) if isinstance(x, torch.dtype) else str(x),
)
def test_triton_dropout_matches_reference(B, d, dtype):
    _check_against_reference("triton", 2, B, d, dtype, 0.3, salt=11)


@pytest.mark.triton
def test_triton_explicit_mask_and_odd_head_dims():
    mask = torch.rand(2, 40, 40, generator=_gen(12)) > 0.5
    _check_against_reference("triton", 2, 40, 16, torch.float32, 0.5, salt=12, mask=mask)
    _check_against_reference("triton", 2, 9, 24, torch.float32, 0.2, salt=13)  # head dim padded to 32
    _check_against_reference("triton", 2, 9, 2, torch.float32, 0.0, salt=14, scale=0.7)  # padded to 16


@pytest.mark.triton
def test_triton_strided_inputs():
    """q, k, v as the layer passes them: strided views of one [B, 3C] projection."""
    gen = _gen(15)
    B, h, d = 37, 2, 16
    qkv = torch.randn(B, 3 * h * d, generator=gen, requires_grad=True)
    grad = torch.randn(h, B, d, generator=gen).transpose(0, 1).contiguous().transpose(0, 1)  # strided too
    outs = []
    for path in ("triton", "ref"):
        q, k, v = qkv.view(B, 3, h, d).permute(1, 2, 0, 3)
        out = ba.batch_attention_impl(q, k, v, dropout_p=0.3, seed=5, path=path)
        (g,) = torch.autograd.grad(out, qkv, grad)
        outs.append((out, g))
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL[torch.float32])
    torch.testing.assert_close(outs[0][1], outs[1][1], **TOL[torch.float32])


# --------------------------------------------------------------------------- #
# Dropout mask
# --------------------------------------------------------------------------- #


def test_keep_mask_definition():
    """dropout_keep_mask is exactly rng.uniform at offset ((head * B) + i) * B + j."""
    key, h, B, p = rng.derive_key(77), 3, 10, 0.3
    keep = ba.dropout_keep_mask(key, h, B, p)
    for head, i, j in [(0, 0, 0), (1, 2, 3), (2, 9, 9), (2, 4, 0)]:
        u = rng.uniform(key, torch.tensor([((head * B) + i) * B + j]))[0].item()
        assert keep[head, i, j].item() == (u >= float32(p))

@pytest.mark.parametrize("p", [0.0, 0.4])
def test_eager_autograd_equals_registered_op(p):
    """Eager calls run the op's bodies through an autograd.Function (no custom-op dispatch):
    outputs and gradients are bitwise those of the registered op and its autograd."""
    gen = _gen(56, int(p * 10))
    q, k, v = _qkv(3, 40, 16, torch.float32, gen)
    grad = torch.randn(3, 40, 16, generator=gen)
    out = ba.batch_attention(q, k, v, dropout_p=p, seed=21)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    key = ba.attention_key(21) if p > 0 else 0
    mask = ba.dropout_keep_mask(key, 3, 40, p) if p > 0 else None
    op_out, _ = torch.ops.batchkin.batch_attention(q, k, v, 0.25, p, key, mask, "auto")
    op_grads = torch.autograd.grad(op_out, (q, k, v), grad)
    assert torch.equal(out, op_out)
    for g, og in zip(grads, op_grads):
        assert torch.equal(g, og)

def _mask_seen_by(path, h, B, p, seed):
    """The keep mask a path applies, read back exactly: q = k = 0 gives P = 1/B, v = I."""
    q = torch.zeros(h, B, B)
    v = torch.eye(B).expand(h, B, B).contiguous()
    out = ba.batch_attention_impl(q, q.clone(), v, dropout_p=p, seed=seed, path=path)
    scaled = out * (B * (1.0 - p))
    keep = scaled > 0.5
    torch.testing.assert_close(scaled, keep.float(), rtol=0, atol=1e-5)
    return keep


@pytest.mark.parametrize("path", path_params("sdpa", "ref", "triton"))
def test_path_applies_exact_mask(path):
    h, B, p, seed = 2, 32, 0.5, 31337
    seen = _mask_seen_by(path, h, B, p, seed)
    assert torch.equal(seen, ba.dropout_keep_mask(ba.attention_key(seed), h, B, p))


def test_dropout_determinism_and_seeds():
    q, k, v = _qkv(2, 40, 16, torch.float32, _gen(20), requires_grad=False)
    a = ba.batch_attention(q, k, v, dropout_p=0.4, seed=1)
    b = ba.batch_attention(q, k, v, dropout_p=0.4, seed=1)
    c = ba.batch_attention(q, k, v, dropout_p=0.4, seed=2)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    m1 = ba.dropout_keep_mask(ba.attention_key(1), 2, 40, 0.4)
    m2 = ba.dropout_keep_mask(ba.attention_key(2), 2, 40, 0.4)
    assert (m1 != m2).float().mean() > 0.3  # independent masks differ in about 48% of places
    # dropout_p = 0 ignores the seed
    assert torch.equal(ba.batch_attention(q, k, v, seed=1), ba.batch_attention(q, k, v, seed=2))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_fraction_binomial(p):
    keep = ba.dropout_keep_mask(rng.derive_key(5, int(p * 10)), 4, 128, p)
    n, kept = keep.numel(), int(keep.sum())
    assert stats.binomtest(kept, n, 1.0 - p).pvalue > 1e-3


def test_keep_mask_chi_square_uniform_and_independent():
    """Kept counts are uniform over rows/columns/heads and neighbours are independent."""
    p = 0.5
    keep = ba.dropout_keep_mask(rng.derive_key(6), 4, 256, p)
    h, B, _ = keep.shape
    col_bins = keep.view(h * B, 16, B // 16).sum(dim=(0, 2)).double().numpy()
    assert stats.chisquare(col_bins).pvalue > 1e-3
    row_bins = keep.view(h, 16, B // 16, B).sum(dim=(0, 2, 3)).double().numpy()
    assert stats.chisquare(row_bins).pvalue > 1e-3
    head_counts = keep.sum(dim=(1, 2)).double().numpy()
    assert stats.chisquare(head_counts).pvalue > 1e-3
    a, b = keep[..., :-1:2].reshape(-1), keep[..., 1::2].reshape(-1)  # disjoint horizontal pairs
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    assert stats.chi2_contingency(table).pvalue > 1e-3
    a, b = keep[:, :-1:2, :].reshape(-1), keep[:, 1::2, :].reshape(-1)  # vertical pairs (offset B apart)
    table = [[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]]
    assert stats.chi2_contingency(table).pvalue > 1e-3

# --------------------------------------------------------------------------- #
# Hand-worked examples
# --------------------------------------------------------------------------- #

EXACT_PATHS = path_params("sdpa", "ref", "triton")


@pytest.mark.parametrize("path", EXACT_PATHS)
def test_two_token_example(path):
    """scores [ln 3, 0] -> P = [3/4, 1/4]; scores [0, 0] -> P = [1/2, 1/2]."""
    q = torch.tensor([[[math.log(3.0), 0.0], [0.0, 0.0]]])
    k = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    v = torch.tensor([[[4.0, 0.0], [0.0, 8.0]]])
    out = ba.batch_attention_impl(q, k, v, scale=1.0, path=path)
    torch.testing.assert_close(out, torch.tensor([[[3.0, 2.0], [2.0, 4.0]]]), rtol=0, atol=1e-5)
    # dropout with an explicit mask: drop P[0, 0, 1] and P[0, 1, 0]; kept values scale by 2
    mask = torch.tensor([[[True, False], [False, True]]])
    out = ba.batch_attention_impl(q, k, v, scale=1.0, dropout_p=0.5, dropout_mask=mask, path=path)
    torch.testing.assert_close(out, torch.tensor([[[6.0, 0.0], [0.0, 8.0]]]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", EXACT_PATHS)
def test_single_token_and_zero_query(path):
    gen = _gen(30)
    q, k, v = _qkv(2, 1, 16, torch.float32, gen, requires_grad=False)
    torch.testing.assert_close(ba.batch_attention_impl(q, k, v, path=path), v, rtol=0, atol=1e-6)  # B = 1: P = 1
    q = torch.zeros(2, 5, 16)
    k, v = torch.randn(2, 5, 16, generator=gen), torch.randn(2, 5, 16, generator=gen)
    out = ba.batch_attention_impl(q, k, v, path=path)  # uniform attention: every row is the mean of v
    torch.testing.assert_close(out, v.mean(dim=1, keepdim=True).expand_as(v), rtol=0, atol=1e-6)


def test_gradient_finite_differences():
    """The hand-written backward (sdpa path) agrees with finite differences in float64-free form."""
    gen = _gen(31)
    q, k, v = _qkv(1, 5, 16, torch.float32, gen)
    grad = torch.randn(1, 5, 16, generator=gen)
    _, (dq, _, _) = _run("sdpa", q, k, v, grad, dropout_p=0.3, seed=3)
    eps = 1e-2
    for idx in [(0, 0, 0), (0, 3, 7), (0, 4, 15)]:
        qp, qm = q.detach().clone(), q.detach().clone()
        qp[idx] += eps
        qm[idx] -= eps
        fp = (ba.batch_attention_impl(qp, k.detach(), v.detach(), dropout_p=0.3, seed=3) * grad).sum()
        fm = (ba.batch_attention_impl(qm, k.detach(), v.detach(), dropout_p=0.3, seed=3) * grad).sum()
        assert abs((fp - fm).item() / (2 * eps) - dq[idx].item()) < 2e-3


# --------------------------------------------------------------------------- #
# Registration: opcheck, torch.compile, dispatch
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("p,with_mask", [(0.0, False), (0.3, False), (0.3, True)])
@pytest.mark.parametrize("path", ["auto", "ref"])
def test_opcheck_forward(path, p, with_mask):
    gen = _gen(40)
    q, k, v = _qkv(2, 9, 16, torch.float32, gen)
    mask = (torch.rand(2, 9, 9, generator=gen) > p) if with_mask else None
    args = (q, k, v, 0.25, p, ba.attention_key(3), mask, path)
    torch.library.opcheck(torch.ops.batchkin.batch_attention.default, args)


def test_opcheck_backward_and_feature_mask():
    gen = _gen(41)
    q, k, v = _qkv(2, 9, 16, torch.float32, gen, requires_grad=False)
    key = ba.attention_key(4)
    out, lse = torch.ops.batchkin.batch_attention(q, k, v, 0.25, 0.3, key, None, "auto")
    grad = torch.randn(2, 9, 16, generator=gen)
    torch.library.opcheck(
        torch.ops.batchkin.batch_attention_backward.default, (grad, q, k, v, out, lse, 0.25, 0.3, key, None, "auto")
    )
    torch.library.opcheck(torch.ops.batchkin.batch_attention_keep_mask.default, (5, [3, 4], 0.5, torch.device("cpu")))


def test_torch_compile_op():
    gen = _gen(42)
    q, k, v = _qkv(2, 13, 16, torch.float32, gen)

    def f(q, k, v):
        return ba.batch_attention(q, k, v, dropout_p=0.3, seed=11) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = f(q, k, v)
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    torch.testing.assert_close(out, ref)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg)

def test_backward_without_grad_of_lse_is_clean():
    """lse is a non-differentiable output: using only the attention output works."""
    q, k, v = _qkv(1, 4, 16, torch.float32, _gen(44))
    out, lse = torch.ops.batchkin.batch_attention(q, k, v, 0.25, 0.0, 0, None, "auto")
    assert not lse.requires_grad
    out.sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize(
    "mode,want",
    [("auto", "sdpa"), ("ref", "ref"), ("cpp", "sdpa"), pytest.param("triton", "triton", marks=pytest.mark.triton)],
)
def test_dispatch_paths(monkeypatch, mode, want):
    monkeypatch.setenv(dispatch.ENV_MODE, mode)
    path, why = ba.explain_path("cpu", 16)
    assert path == want and why
    q, k, v = _qkv(2, 8, 16, torch.float32, _gen(45), requires_grad=False)
    out = ba.batch_attention(q, k, v, dropout_p=0.2, seed=9)
    assert torch.equal(out, ba.batch_attention_impl(q, k, v, dropout_p=0.2, seed=9, path=want))


def test_dispatch_triton_head_dim_limit(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_MODE, "triton")
    with pytest.raises(dispatch.KernelUnavailable, match="head dim"):
        ba.explain_path("cpu", 512)
    monkeypatch.setenv(dispatch.ENV_MODE, "auto")
    assert ba.explain_path("cpu", 512)[0] == "sdpa"


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #


def _ok():
    return [torch.randn(2, 5, 16) for _ in range(3)]


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a: a.update(q=torch.randn(5, 16)), ValueError, "q must have 3 dimensions"),
        (lambda a: a.update(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
        (lambda a: a.update(q=torch.zeros(2, 5, 16, dtype=torch.int64)), TypeError, "q must have dtype"),
        (lambda a: a.update(q=torch.zeros(2, 0, 16)), ValueError, "q must have at least"),
        (lambda a: a.update(k=torch.randn(2, 6, 16)), ValueError, r"k must have shape \[2, 5, 16\]"),
        (lambda a: a.update(v=torch.randn(2, 5, 8)), ValueError, "v must have shape"),
        (lambda a: a.update(k=torch.randn(2, 5, 16, 1)), ValueError, "k must have 3 dimensions"),
        (lambda a: a.update(v=torch.randn(2, 5, 16, dtype=torch.float64)), TypeError, "v must have dtype float32"),
        (lambda a: a.update(k=torch.randn(2, 5, 16).half()), TypeError, "k must have dtype float32"),
        (lambda a: a.update(k=torch.empty(2, 5, 16, device="meta")), ValueError, "k is on meta"),
        (lambda a: a.update(dropout_p=1.0), ValueError, "dropout_p must be in"),
        (lambda a: a.update(dropout_p=-0.1), ValueError, "dropout_p must be in"),
        (lambda a: a.update(dropout_p="0.1"), TypeError, "dropout_p must be a float"),
        (lambda a: a.update(scale=-1.0), ValueError, "scale must be"),
        (lambda a: a.update(scale=float("nan")), ValueError, "scale must be"),
        (lambda a: a.update(scale="x"), TypeError, "scale must be"),
        (lambda a: a.update(seed=1.5), TypeError, "seed must be an int"),
        (
            lambda a: a.update(dropout_p=0.5, dropout_mask=torch.ones(2, 5, 4, dtype=torch.bool)),
            ValueError,
            "dropout_mask must have shape",
        ),
        (
            lambda a: a.update(dropout_p=0.5, dropout_mask=torch.ones(2, 5, 5)),
            TypeError,
            "dropout_mask must have dtype bool",
        ),
        (
            lambda a: a.update(dropout_mask=torch.ones(2, 5, 5, dtype=torch.bool)),
            ValueError,
            "dropout_mask needs dropout_p > 0",
        ),
    ],
)
def test_bad_inputs(mutate, exc, match):
    q, k, v = _ok()
    args = dict(q=q, k=k, v=v)
    mutate(args)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        ba.batch_attention(q, k, v, **args)


def test_bad_path():
    with pytest.raises(ValueError, match="path must be one of"):
        ba.batch_attention_impl(*_ok(), path="cuda")

# --------------------------------------------------------------------------- #
# Extra CUDA-only coverage (defined only where a GPU exists, so nothing is skipped here)
# --------------------------------------------------------------------------- #

if torch.cuda.is_available():

    @pytest.mark.parametrize("p", [0.0, 0.3])
    @pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
    @pytest.mark.parametrize("d", [16, 32, 64, 128])
    @pytest.mark.parametrize("B", [1, 2, 7, 64, 257])
    def test_cuda_triton_matches_reference(B, d, dtype, p):
        gen = _gen(60, B, d)
        q, k, v = (t.detach().cuda().requires_grad_() for t in _qkv(4, B, d, dtype, gen))
        grad = torch.randn(4, B, d, generator=gen).to(dtype).cuda()
        out, grads = _run("triton", q, k, v, grad, dropout_p=p, seed=3)
        keep = ba.dropout_keep_mask(ba.attention_key(3), 4, B, p, "cuda") if p > 0 else None
        ref_out, ref_grads = _reference(q, k, v, grad, 1.0 / math.sqrt(d), keep, p)
        torch.testing.assert_close(out, ref_out, **TOL[dtype])
        for g, rg in zip(grads, ref_grads):
            torch.testing.assert_close(g, rg, **TOL[dtype])


_AOT_SCRIPT = r"""
import batchkin.kernels.batch_attention.triton as bak

scalars = {"s_h": i32, "s_b": i32, "s_d": i32, "B": i32, "D": i32, "scale": "fp32", "dropout_p": "fp32",
           "inv_keep": "fp32", "key": "u32"}
# float32 with an explicit mask, bfloat16 with the hashed one
for dt, block_d, has_mask in (("fp32", 16, True), ("bf16", 32, False)):
    block = 64 if block_d <= 64 else 32
    consts = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, "DROPOUT": True, "HAS_MASK": has_mask}
    ptrs = {"Q": "*" + dt, "K": "*" + dt, "V": "*" + dt, "LSE": "*fp32", "MASK": "*u8"}
    build(bak._attn_fwd_kernel, dict(ptrs, O="*" + dt, **scalars), consts)
    ptrs.update(DO="*" + dt, DELTA="*fp32")
    build(bak._attn_bwd_dkdv_kernel, dict(ptrs, DK="*" + dt, DV="*" + dt, **scalars), consts)
    build(bak._attn_bwd_dq_kernel, dict(ptrs, DQ="*" + dt, **scalars), consts)
build(bak._attn_bwd_preprocess_kernel, {"O": "*fp32", "DO": "*fp32", "DELTA": "*fp32", "B": i32, "D": i32},
      {"BLOCK_M": 64, "BLOCK_D": 16})
print("compiled")
"""


@aot
def test_triton_kernels_compile_for_cuda():
    """The forward and backward kernels compile to sm_90 code (no GPU needed, interpreter off)."""
    compile_for_cuda(_AOT_SCRIPT)
