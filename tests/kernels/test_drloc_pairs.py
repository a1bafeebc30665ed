"""Tests of DRLoc pair sampling: position draws, targets, gathers, the fused draw + gather,
the first head layer, their gradients, parity of the ref/cpp/triton paths, distribution
(chi-square), argument checks, opcheck and torch.compile."""

from __future__ import annotations

import functools
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _util import DEVICES, FLOAT_DTYPES, TOL, aot, compile_for_cuda, gen, path_params
from scipy import stats

from batchkin.kernels import dispatch, rng
from batchkin.kernels import drloc_pairs as dp
from batchkin.kernels.drloc_pairs import api

PATHS = ("ref", "cpp", "triton")
DTYPES = FLOAT_DTYPES
GRIDS = ((7, 7), (14, 14), (8, 16), (1, 5), (3, 1))
ALL_PATHS = path_params(*PATHS)
FAST_PATHS = path_params("cpp", "triton")


def _tol(dtype) -> float:
    return TOL[dtype]["rtol"]


def _assert_close(actual, expected, dtype, *, scale_tol: float | None = None):
    """Relative tolerance per dtype; absolute tolerance relative to the reference's scale."""
    tol = _tol(dtype) if scale_tol is None else scale_tol
    scale = float(expected.detach().abs().max().float()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol * max(scale, 1e-6))


def _make_grid(B, C, H, W, dtype=torch.float32, layout="tokens", *, seed=0, device="cpu"):
    """A [B, C, H, W] grid laid out as ViT tokens (a permuted view), NCHW, or strided."""
    g = gen(seed)
    if layout == "tokens":
        base = torch.randn(B, H * W, C, generator=g).to(device=device, dtype=dtype)
        return base.transpose(1, 2).unflatten(2, (H, W))
    if layout == "contiguous":
        return torch.randn(B, C, H, W, generator=g).to(device=device, dtype=dtype)
    # "strided": every other channel and column of a larger map, its first row dropped
    base = torch.randn(B, 2 * C, H + 1, 2 * W, generator=g).to(device=device, dtype=dtype)
    return base[:, 1::2, 1:, ::2]


@pytest.fixture
def force_path(monkeypatch):
    """Force every op of the session onto one path (as BATCHKIN_KERNELS does)."""

    def _force(path):
        monkeypatch.setenv(dispatch.ENV_MODE, path)

    return _force


# --------------------------------------------------------------------------- #
# Position draws
# --------------------------------------------------------------------------- #


def _py_position(key: int, offset: int, size: int) -> int:
    """The documented draw, on Python ints and numpy float32 (independent of torch)."""
    h = rng.lowbias32_int(rng.lowbias32_int((offset ^ key) & rng.MASK32) + key)
    u = np.float32(h >> 8) * np.float32(2.0**-24)
    return min(int(np.floor(np.float32(u) * np.float32(size))), size - 1)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_positions_hand_worked(path):
    B, m, H, W, key = 2, 3, 5, 7, rng.derive_key(11, 4)
    expected = torch.tensor(
        [
            [[_py_position(key, (b * m + j) * 4 + t, (H, W, H, W)[t]) for t in range(4)] for j in range(m)]
            for b in range(B)
        ]
    )
    got = dp.drloc_positions_impl(B, m, H, W, key, "cpu", path)
    assert got.dtype == torch.int64 and got.shape == (B, m, 4)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("B,m", [(1, 1), (3, 5), (5, 17)])
def test_positions_parity(path, B, m, H, W):
    key = rng.derive_key(B * 1000 + m, H * 100 + W)
    ref = dp.drloc_positions_impl(B, m, H, W, key, "cpu", "ref")
    got = dp.drloc_positions_impl(B, m, H, W, key, "cpu", path)
    assert torch.equal(got, ref)
    assert ref[..., 0::2].min() >= 0 and ref[..., 0::2].max() < H
    assert ref[..., 1::2].min() >= 0 and ref[..., 1::2].max() < W


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("key", [0, 1, 2**31, 2**32 - 1])
def test_positions_key_edges(path, key):
    for H, W in ((1, 1), (4, 5)):
        want = dp.drloc_positions_impl(2, 3, H, W, key, "cpu", "ref")
        assert torch.equal(dp.drloc_positions_impl(2, 3, H, W, key, "cpu", path), want)
    grid = _make_grid(2, 3, 4, 5, seed=key % 7)
    want = dp.drloc_pairs_impl(grid, 3, key, "signed", True, "ref")
    got = dp.drloc_pairs_impl(grid, 3, key, "signed", True, path)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_positions_device_and_determinism(device):
    a = dp.drloc_positions(4, 33, 8, 16, 123, device)
    assert a.device.type == device and a.dtype == torch.int64
    assert torch.equal(a, dp.drloc_positions(4, 33, 8, 16, 123, device))
    assert not torch.equal(a, dp.drloc_positions(4, 33, 8, 16, 124, device))
    k1, k2 = rng.derive_key(7, 0), rng.derive_key(7, 1)
    assert not torch.equal(dp.drloc_positions(4, 33, 8, 16, k1, device), dp.drloc_positions(4, 33, 8, 16, k2, device))
    # a prefix of images is drawn identically whatever B is (counters are per pair)
    assert torch.equal(dp.drloc_positions(2, 33, 8, 16, 123, device), a[:2])
    if device == "cuda":
        assert torch.equal(a.cpu(), dp.drloc_positions(4, 33, 8, 16, 123, "cpu"))


def test_positions_from_generator():
    a = dp.drloc_positions(3, 9, 7, 5, gen(5))
    b = dp.drloc_positions(3, 9, 7, 5, gen(5))
    assert torch.equal(a, b)
    g = gen(5)
    key = int(torch.randint(0, 2**32, (1,), generator=gen(5), dtype=torch.int64))
    assert torch.equal(dp.drloc_positions(3, 9, 7, 5, g), dp.drloc_positions(3, 9, 7, 5, key))
    # the generator advanced: the next call draws different positions
    assert not torch.equal(dp.drloc_positions(3, 9, 7, 5, g), a)


def _chi2_p(values: torch.Tensor, bins: int) -> float:
    counts = torch.bincount(values.reshape(-1), minlength=bins).numpy()
    assert counts.shape[0] == bins
    return stats.chisquare(counts).pvalue


@pytest.mark.parametrize("H,W", [(7, 5), (8, 16), (14, 14), (3, 1)])
@pytest.mark.parametrize("seed", [0, 1])
def test_positions_uniform_chi_square(H, W, seed):
    B, m = 64, 512  # 32768 pairs: 65536 row draws and 65536 column draws
    pos = dp.drloc_positions(B, m, H, W, rng.derive_key(seed, H, W))
    rows, cols = pos[..., 0::2], pos[..., 1::2]
    alpha = 1e-4  # the draws are deterministic for the key, so this cannot flake
    if H > 1:
        assert _chi2_p(rows, H) > alpha
    if W > 1:
        assert _chi2_p(cols, W) > alpha
    if H * W > 1:
        assert _chi2_p(rows * W + cols, H * W) > alpha  # flat position r * W + c
        # independence of the two members: the joint (flat_a, flat_b) is uniform too
        if H * W <= 64:
            flat = pos[..., 0] * W + pos[..., 1], pos[..., 2] * W + pos[..., 3]
            assert _chi2_p(flat[0] * (H * W) + flat[1], (H * W) ** 2) > alpha


def test_chi_square_detects_a_biased_draw():
    # the same statistic rejects columns drawn from the row range (a square-grid assumption)
    H, W = 8, 16
    biased = torch.randint(H, (64, 512, 2), generator=gen(0))
    assert _chi2_p(biased, W) < 1e-12
    ok = dp.drloc_positions(64, 512, H, W, 5)[..., 1::2]
    assert _chi2_p(ok, W) > 1e-4


# --------------------------------------------------------------------------- #
# Targets
# --------------------------------------------------------------------------- #


def test_targets_hand_worked():
    pos = torch.tensor([[[3, 1, 0, 4], [0, 5, 4, 0], [2, 2, 2, 2]]])  # H = 5, W = 6
    expected = {
        ("abs", False): [[3, 3], [4, 5], [0, 0]],
        ("signed", False): [[3 + 4, -3 + 5], [-4 + 4, 5 + 5], [4, 5]],
        ("abs", True): [[3 / 4, 3 / 5], [1, 1], [0, 0]],
        ("signed", True): [[7 / 4, 2 / 5], [0, 2], [1, 1]],
    }
    for (mode, normalize), want in expected.items():
        got = dp.drloc_targets(pos, 5, 6, mode, normalize)
        assert got.dtype == torch.float32 and got.shape == (1, 3, 2)
        torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float32), rtol=0, atol=0)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mode", dp.MODES)
def test_targets_size_one_grid_is_zero(mode, normalize):
    pos = dp.drloc_positions(2, 6, 1, 1, 3)
    t = dp.drloc_targets(pos, 1, 1, mode, normalize)
    assert torch.equal(t, torch.zeros(2, 6, 2))


@pytest.mark.parametrize("H,W", [(7, 7), (8, 16), (1, 5), (3, 1)])
def test_target_ranges_per_mode(H, W):
    pos = dp.drloc_positions(32, 256, H, W, rng.derive_key(3, H, W))
    size = torch.tensor([H, W], dtype=torch.float32)
    for mode, hi in (("abs", size - 1), ("signed", 2 * (size - 1))):
        t = dp.drloc_targets(pos, H, W, mode)
        assert torch.equal(t, t.round())  # integers
        assert (t >= 0).all() and (t <= hi).all()
        assert torch.equal(t.amax(dim=(0, 1)), hi)  # both extremes are reached in 8192 pairs
        assert torch.equal(t.amin(dim=(0, 1)), torch.zeros(2))
        tn = dp.drloc_targets(pos, H, W, mode, normalize=True)
        torch.testing.assert_close(tn, t / (size - 1).clamp_min(1), rtol=0, atol=0)
        assert (tn <= (2.0 if mode == "signed" else 1.0)).all()
    # signed targets are a - b: swapping the members mirrors them around size - 1
    swapped = pos[..., [2, 3, 0, 1]]
    ts, tw = dp.drloc_targets(pos, H, W, "signed"), dp.drloc_targets(swapped, H, W, "signed")
    torch.testing.assert_close(ts + tw, (2 * (size - 1)).expand_as(ts), rtol=0, atol=0)
    d = (pos[..., 0:2] - pos[..., 2:4]).float()
    torch.testing.assert_close(ts, d + (size - 1), rtol=0, atol=0)


# --------------------------------------------------------------------------- #
# Gathers (forward)
# --------------------------------------------------------------------------- #


def test_gather_hand_worked():
    B, C, H, W = 2, 3, 4, 5
    b, c, h, w = torch.meshgrid(*(torch.arange(n) for n in (B, C, H, W)), indexing="ij")
    grid = (1000 * b + 100 * c + 10 * h + w).float()
    pos = torch.tensor([[[2, 3, 0, 1]], [[3, 4, 3, 4]]])
    e_a, e_b = dp.drloc_gather(grid, pos)
    torch.testing.assert_close(e_a, torch.tensor([[[23.0, 123, 223]], [[1034, 1134, 1234]]]), rtol=0, atol=0)
    torch.testing.assert_close(e_b, torch.tensor([[[1.0, 101, 201]], [[1034, 1134, 1234]]]), rtol=0, atol=0)
    torch.testing.assert_close(dp.drloc_gather_cat(grid, pos), torch.cat([e_a, e_b], -1), rtol=0, atol=0)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("layout", ["tokens", "contiguous", "strided"])
def test_gather_equals_indexing(path, H, W, layout):
    B, C, m = 3, 5, 11
    grid = _make_grid(B, C, H, W, layout=layout, seed=H * W)
    pos = dp.drloc_positions(B, m, H, W, rng.derive_key(H, W))
    e_a, e_b = dp.drloc_gather_impl(grid, pos, path)
    cat = dp.drloc_gather_cat_impl(grid, pos, path)
    assert e_a.shape == e_b.shape == (B, m, C) and cat.shape == (B, m, 2 * C)
    for b in range(B):
        for j in range(m):
            ra, ca, rb, cb = pos[b, j].tolist()
            assert torch.equal(e_a[b, j], grid[b, :, ra, ca])
            assert torch.equal(e_b[b, j], grid[b, :, rb, cb])
    assert torch.equal(cat, torch.cat([e_a, e_b], -1))


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W", GRIDS)
def test_gather_parity(path, dtype, H, W):
    B, C, m = 3, 7, 9
    grid = _make_grid(B, C, H, W, dtype, seed=1)
    pos = dp.drloc_positions(B, m, H, W, rng.derive_key(1, H, W))
    for want, got in zip(dp.drloc_gather_impl(grid, pos, "ref"), dp.drloc_gather_impl(grid, pos, path)):
        assert got.dtype == dtype and torch.equal(got, want)  # gathers are copies: bit-exact
    assert torch.equal(dp.drloc_gather_cat_impl(grid, pos, path), dp.drloc_gather_cat_impl(grid, pos, "ref"))
    table = _make_grid(B, 2 * C, H, W, dtype, seed=2)
    for bias in (None, torch.randn(C, generator=gen(3)).to(dtype)):
        got = dp.drloc_gather_sum_impl(table, pos, C, bias, path)
        want = dp.drloc_gather_sum_impl(table, pos, C, bias, "ref")
        assert got.shape == (B, m, C) and got.dtype == dtype
        if path == "triton" and dtype == torch.bfloat16:
            # the interpreter rounds float32 -> bfloat16 toward zero (CUDA rounds to nearest)
            _assert_close(got, want, dtype, scale_tol=2e-2)
        else:
            assert torch.equal(got, want)
        e_a, e_b = dp.drloc_gather_reference(table.double(), pos)
        exact = e_a[..., :C] + e_b[..., C:] + (0 if bias is None else bias.double())
        _assert_close(got, exact, dtype, scale_tol=2e-2 if dtype == torch.bfloat16 else None)


# --------------------------------------------------------------------------- #
# Fused draw + gather
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W", GRIDS)
def test_pairs_parity(path, dtype, H, W):
    B, C, m = 3, 6, 13
    grid = _make_grid(B, C, H, W, dtype, seed=3)
    key = rng.derive_key(5, H, W)
    for mode in dp.MODES:
        for normalize in (False, True):
            e_a, e_b, tgt, pos = dp.drloc_pairs_impl(grid, m, key, mode, normalize, path)
            assert torch.equal(pos, dp.drloc_positions_impl(B, m, H, W, key, "cpu", "ref"))
            assert tgt.dtype == torch.float32
            torch.testing.assert_close(tgt, dp.drloc_targets(pos, H, W, mode, normalize), rtol=0, atol=0)
            want_a, want_b = dp.drloc_gather_reference(grid, pos)
            assert e_a.dtype == dtype and torch.equal(e_a, want_a) and torch.equal(e_b, want_b)


@pytest.mark.parametrize("device", DEVICES)
def test_pairs_public_api(device):
    B, C, H, W, m = 4, 8, 8, 16, 21
    grid = _make_grid(B, C, H, W, device=device, seed=4)
    key = rng.derive_key(9, 2)
    e_a, e_b, tgt, pos = dp.drloc_pairs(grid, m, key, "signed", normalize=True)
    for t in (e_a, e_b, tgt, pos):
        assert t.device.type == device
    assert torch.equal(pos, dp.drloc_positions(B, m, H, W, key, device))
    assert torch.equal(tgt, dp.drloc_targets(pos, H, W, "signed", True))
    want = dp.drloc_gather(grid, pos)
    assert torch.equal(e_a, want[0]) and torch.equal(e_b, want[1])
    # same key: same draw; another key: another draw
    assert torch.equal(dp.drloc_pairs(grid, m, key)[3], pos)
    assert not torch.equal(dp.drloc_pairs(grid, m, key + 1)[3], pos)


# --------------------------------------------------------------------------- #
# Gradients w.r.t. the grid
# --------------------------------------------------------------------------- #


def _grid_leaf(B, C, H, W, dtype, layout, seed):
    """(leaf, grid): the grid is a view of the leaf in the requested layout."""
    grid = _make_grid(B, C, H, W, dtype, layout, seed=seed)
    if layout == "tokens":
        leaf = grid.permute(0, 2, 3, 1).reshape(B, H * W, C).detach().requires_grad_(True)
        return leaf, leaf.transpose(1, 2).unflatten(2, (H, W))
    leaf = grid.detach().clone().requires_grad_(True)
    return leaf, leaf


def _upstream_grads(B, m, C, dtype, seed):
    g = gen(seed)
    return torch.randn(B, m, C, generator=g).to(dtype), torch.randn(B, m, C, generator=g).to(dtype)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W", GRIDS)
def test_gather_grad_parity(force_path, path, dtype, H, W):
    # more draws than positions (repeats must accumulate); fewer pairs in the slow interpreter
    B, C, m = 3, 6, 2 * H * W + 3 if path != "triton" else min(2 * H * W + 3, 37)
    layout = "tokens" if (H + W) % 2 else "contiguous"
    leaf, grid = _grid_leaf(B, C, H, W, dtype, layout, seed=5)
    pos = dp.drloc_positions(B, m, H, W, rng.derive_key(6, H, W))
    ga, gb = _upstream_grads(B, m, C, dtype, seed=7)
    ref_a, ref_b = dp.drloc_gather_reference(grid, pos)
    (want,) = torch.autograd.grad([ref_a, ref_b], [leaf], [ga, gb])
    # exact: float32 accumulation in a fixed order, one rounding (what every path does)
    exact = dp.drloc_scatter_reference(ga, gb, pos, C, H, W, 0, layout == "tokens")
    exact = exact.reshape(B, H * W, C) if layout == "tokens" else exact
    force_path(path)
    e_a, e_b = dp.drloc_gather(grid, pos)
    (got,) = torch.autograd.grad([e_a, e_b], [leaf], [ga, gb])
    assert got.dtype == dtype and got.shape == leaf.shape
    assert torch.equal(got, exact)
    # torch's autograd sums each member's repeats apart (and in the low precision for
    # fp16/bf16): the same values up to the order of the float additions
    _assert_close(got, want, dtype)
    # the fused op and the concatenated gather have the same backward
    e_a, e_b, _, pos2 = dp.drloc_pairs(grid, m, rng.derive_key(6, H, W))
    assert torch.equal(pos2, pos)
    assert torch.equal(torch.autograd.grad([e_a, e_b], [leaf], [ga, gb])[0], exact)
    cat = dp.drloc_gather_cat(grid, pos)
    assert torch.equal(torch.autograd.grad(cat, leaf, torch.cat([ga, gb], -1))[0], exact)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_gather_grad_duplicates_hand_worked(force_path, path):
    grid = torch.zeros(1, 2, 2, 3, requires_grad=True)
    # pair 0: a = (1, 2), b = (1, 2); pair 1: a = (1, 2), b = (0, 0)
    pos = torch.tensor([[[1, 2, 1, 2], [1, 2, 0, 0]]])
    ga = torch.tensor([[[1.0, 2.0], [10.0, 20.0]]])
    gb = torch.tensor([[[100.0, 200.0], [1000.0, 2000.0]]])
    force_path(path)
    e_a, e_b = dp.drloc_gather(grid, pos)
    (got,) = torch.autograd.grad([e_a, e_b], [grid], [ga, gb])
    want = torch.zeros(1, 2, 2, 3)
    want[0, :, 1, 2] = torch.tensor([1 + 10 + 100, 2 + 20 + 200.0])
    want[0, :, 0, 0] = torch.tensor([1000.0, 2000.0])
    assert torch.equal(got, want)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_grad_layout_follows_the_grid(force_path, path):
    B, C, H, W, m = 2, 4, 3, 5, 7
    force_path(path)
    pos = dp.drloc_positions(B, m, H, W, 1)
    tokens = torch.randn(B, H * W, C, requires_grad=True)
    grid = tokens.transpose(1, 2).unflatten(2, (H, W))
    (g_view,) = torch.autograd.grad(dp.drloc_gather(grid, pos)[0].sum(), grid)
    assert g_view.stride(1) == 1  # channels-last, like the token view: no copy back to tokens
    assert g_view.permute(0, 2, 3, 1).is_contiguous()
    nchw = torch.randn(B, C, H, W, requires_grad=True)
    (g_nchw,) = torch.autograd.grad(dp.drloc_gather(nchw, pos)[0].sum(), nchw)
    assert g_nchw.is_contiguous()


@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_scatter_parity(path, dtype, channels_last):
    B, m, n, H, W = 3, 40, 5, 4, 3
    pos = dp.drloc_positions(B, m, H, W, 8)
    g = torch.randn(B, m, 2 * n + 3, generator=gen(8)).to(dtype)
    ga, gb = g[..., :n], g[..., n + 1 : 2 * n + 1]  # strided views, as the backward passes them
    for channels, off_b in ((n, 0), (2 * n, n), (2 * n + 1, n + 1)):
        want = dp.drloc_scatter_impl(ga, gb, pos, channels, H, W, off_b, channels_last, "ref")
        got = dp.drloc_scatter_impl(ga, gb, pos, channels, H, W, off_b, channels_last, path)
        assert got.shape == want.shape and got.is_contiguous() and torch.equal(got, want)


# --------------------------------------------------------------------------- #
# First head layer
# --------------------------------------------------------------------------- #


def _first_layer_case(B, C, H, W, m, hidden, dtype, layout, seed):
    leaf, grid = _grid_leaf(B, C, H, W, dtype, layout, seed)
    g = gen(seed + 1)
    weight = (torch.randn(hidden, 2 * C, generator=g) / (2 * C) ** 0.5).to(dtype).requires_grad_(True)
    bias = torch.randn(hidden, generator=g).to(dtype).requires_grad_(True)
    pos = dp.drloc_positions(B, m, H, W, rng.derive_key(seed, m))
    grad_out = torch.randn(B, m, hidden, generator=g).to(dtype)
    return leaf, grid, weight, bias, pos, grad_out


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("strategy", ["gather", "project"])
def test_first_layer_parity(force_path, path, dtype, H, W, strategy):
    B, C, hidden = 3, 6, 10
    many = H * W + 2 if path != "triton" else min(H * W + 2, 40)  # the interpreter is slow
    for m, layout in ((5, "tokens"), (many, "contiguous")):
        leaf, grid, weight, bias, pos, grad_out = _first_layer_case(B, C, H, W, m, hidden, dtype, layout, seed=m)
        want = dp.drloc_first_layer_reference(grid, pos, weight, bias)
        want_grads = torch.autograd.grad(want, [leaf, weight, bias], grad_out)
        force_path(path)
        got = dp.drloc_first_layer(grid, pos, weight, bias, strategy=strategy)
        assert got.shape == (B, m, hidden) and got.dtype == dtype
        if strategy == "gather" and dtype == torch.float32:
            assert torch.equal(got, want)  # the same Linear on bit-identical inputs
        _assert_close(got, want, dtype)
        for a, b in zip(torch.autograd.grad(got, [leaf, weight, bias], grad_out), want_grads):
            _assert_close(a, b, dtype)
        force_path("auto")


@pytest.mark.parametrize("strategy", dp.STRATEGIES)
def test_first_layer_without_bias_and_auto_choice(monkeypatch, strategy):
    B, C, H, W, hidden = 2, 5, 3, 4, 7
    calls = {"project": [], "unique": []}
    real_sum, real_unique = dp.drloc_gather_sum_op, dp.drloc_first_layer_unique_op
    monkeypatch.setattr(api, "drloc_gather_sum_op", lambda *a: calls["project"].append(1) or real_sum(*a))
    monkeypatch.setattr(api, "drloc_first_layer_unique_op", lambda *a: calls["unique"].append(1) or real_unique(*a))
    for m in (1, H * W - 1, H * W, H * W + 5, 200):
        for v in calls.values():
            v.clear()
        leaf, grid, weight, _, pos, grad_out = _first_layer_case(B, C, H, W, m, hidden, torch.float32, "tokens", 3)
        got = dp.drloc_first_layer(grid, pos, weight, strategy=strategy)
        want = dp.drloc_first_layer_reference(grid, pos, weight)
        _assert_close(got, want, torch.float32)
        for a, b in zip(
            torch.autograd.grad(got, [leaf, weight], grad_out), torch.autograd.grad(want, [leaf, weight], grad_out)
        ):
            _assert_close(a, b, torch.float32)
        ran = strategy
        if strategy == "auto":
            ran = dp.choose_first_layer_strategy(B, C, hidden, m, H * W, device_type="cpu")
        assert bool(calls["project"]) == (ran == "project")
        assert bool(calls["unique"]) == (ran == "unique")


# --------------------------------------------------------------------------- #
# The "unique" strategy and the cost model
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("B,m,H,W", [(3, 40, 4, 5), (2, 7, 1, 1), (4, 1, 6, 3), (2, 300, 14, 14)])
def test_unique_rows_reference(B, m, H, W):
    pos = dp.drloc_positions(B, m, H, W, rng.derive_key(B, m))
    rows_a, rows_b, inv = dp.drloc_unique_rows_reference(pos, H, W)
    for side, rows in ((0, rows_a), (1, rows_b)):
        flat = torch.arange(B).view(B, 1) * H * W + pos[..., 2 * side] * W + pos[..., 2 * side + 1]
        want = sorted(set(flat.flatten().tolist()))
        assert rows.tolist() == want  # distinct, increasing (image by image)
        assert torch.equal(rows[inv[..., side]], flat)  # every pair maps to its own token


@pytest.mark.parametrize("path", ["ref", "cpp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,W", GRIDS)
@pytest.mark.parametrize("layout", ["tokens", "contiguous", "strided"])
def test_unique_first_layer_parity(force_path, path, dtype, H, W, layout):
    B, C, hidden = 3, 6, 10
    for m, with_bias in ((5, True), (H * W + 7, False)):
        leaf, grid, weight, bias, pos, grad_out = _first_layer_case(B, C, H, W, m, hidden, dtype, layout, seed=m)
        bias = bias if with_bias else None
        inputs = [leaf, weight] + ([bias] if with_bias else [])
        want = dp.drloc_first_layer_reference(grid, pos, weight, bias)
        want_grads = torch.autograd.grad(want, inputs, grad_out)
        force_path(path)
        got = dp.drloc_first_layer(grid, pos, weight, bias, strategy="unique")
        assert got.shape == (B, m, hidden) and got.dtype == dtype
        _assert_close(got, want, dtype)
        got_grads = torch.autograd.grad(got, inputs, grad_out)
        for a, b in zip(got_grads, want_grads):
            assert a.dtype == b.dtype
            _assert_close(a, b, dtype)
        if layout == "tokens":  # the gradient is laid out like the token view: no copy back
            assert got_grads[0].is_contiguous()
        force_path("auto")


@pytest.mark.parametrize("dtype", DTYPES)
def test_unique_cpp_matches_its_reference(dtype):
    """The C++ op and the reference of the same algorithm, forward and backward, both layouts."""
    B, C, H, W, m, hidden = 4, 7, 5, 6, 50, 9
    for channels_last, layout in ((True, "tokens"), (False, "contiguous")):
        _, grid, weight, bias, pos, grad_out = _first_layer_case(B, C, H, W, m, hidden, dtype, layout, seed=4)
        grid, weight, bias = grid.detach(), weight.detach(), bias.detach()
        got = dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "cpp")
        want = dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "ref")
        _assert_close(got, want, dtype)
        gb = dp.drloc_first_layer_unique_backward_impl(grad_out, grid, pos, weight, True, channels_last, "cpp")
        wb = dp.drloc_first_layer_unique_backward_impl(grad_out, grid, pos, weight, True, channels_last, "ref")
        shape = (B, H, W, C) if channels_last else (B, C, H, W)
        assert gb[0].shape == wb[0].shape == shape and gb[0].is_contiguous()
        for a, b in zip(gb, wb):
            _assert_close(a, b, dtype)
    # untouched tokens get an exact zero gradient, no bias gives no bias gradient
    pos = torch.zeros(B, m, 4, dtype=torch.int64)  # every pair is (0, 0) - (0, 0)
    grid = torch.randn(B, C, H, W, generator=gen(1)).to(dtype)
    g = dp.drloc_first_layer_unique_backward_impl(grad_out, grid, pos, weight, False, False, "cpp")
    assert torch.count_nonzero(g[0][:, :, 1:]) == 0 and torch.count_nonzero(g[0][:, :, 0, 1:]) == 0
    assert torch.count_nonzero(g[2]) == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unique_cpp_over_several_chunks_and_thread_counts(dtype, threads, torch_threads):
    """Enough images for several chunks of consecutive images (about 2,048 distinct rows each),
    split over 1-3 threads: the same values as the reference, and repeatable."""
    B, C, H, W, m, hidden = 70, 5, 7, 7, 64, 6  # ~71 distinct rows per image: 3 chunks
    with torch_threads(threads):
        for channels_last, layout in ((True, "tokens"), (False, "contiguous")):
            _, grid, weight, bias, pos, grad_out = _first_layer_case(B, C, H, W, m, hidden, dtype, layout, seed=7)
            grid, weight, bias = grid.detach(), weight.detach(), bias.detach()
            got = dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "cpp")
            _assert_close(got, dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "ref"), dtype)
            got_b = dp.drloc_first_layer_unique_backward_impl(grad_out, grid, pos, weight, True, channels_last, "cpp")
            want_b = dp.drloc_first_layer_unique_backward_impl(grad_out, grid, pos, weight, True, channels_last, "ref")
            for a, b in zip(got_b, want_b):
                _assert_close(a, b, dtype)
            again = dp.drloc_first_layer_unique_backward_impl(grad_out, grid, pos, weight, True, channels_last, "cpp")
            assert all(torch.equal(a, b) for a, b in zip(got_b, again))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the block cache is Linux only")
def test_unique_cpp_large_outputs_reuse_blocks_and_overwrite_them():
    """Outputs and grid gradients of 32 MiB and more come from the cached huge-page blocks
    (csrc/large_blocks.h): a freed one is reused and every element of it rewritten."""
    B, C, H, W, m, hidden = 64, 8, 2, 2, 128, 1024  # output 64*128*1024*4 B = 32 MiB
    _, grid, weight, bias, pos, _ = _first_layer_case(B, C, H, W, m, hidden, torch.float32, "tokens", seed=3)
    grid, weight, bias = grid.detach(), weight.detach(), bias.detach()
    want = dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "ref")
    first = dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "cpp")
    _assert_close(first, want, torch.float32)
    freed = first.data_ptr()
    first.fill_(float("nan"))  # stale values the next output must overwrite
    del first
    second = dp.drloc_first_layer_unique_impl(grid, pos, weight, None, "cpp")
    assert second.data_ptr() == freed
    _assert_close(second, want - bias, torch.float32)


def test_unique_is_refused_off_the_host(force_path):
    _, grid, weight, bias, pos, _ = _first_layer_case(2, 3, 4, 4, 5, 6, torch.float32, "tokens", 1)
    with pytest.raises(ValueError, match="needs CPU tensors"):
        dp.drloc_first_layer(grid.to("meta"), pos.to("meta"), weight.to("meta"), bias.to("meta"), strategy="unique")
    force_path("triton")
    with pytest.raises(dispatch.KernelUnavailable, match="no Triton kernel"):
        dp.drloc_first_layer_unique_impl(grid, pos, weight, bias, "triton")


@pytest.mark.parametrize("m,n", [(1, 1), (1, 49), (64, 49), (64, 196), (1000, 10), (5, 2)])
def test_expected_distinct_matches_simulation(m, n):
    want = dp.expected_distinct(m, n)
    assert want == pytest.approx(n * (1 - (1 - 1 / n) ** m), rel=1e-12)
    draws = torch.randint(n, (4000, m), generator=gen(m * n))
    distinct = torch.tensor([float(len(set(row.tolist()))) for row in draws])
    # the sample mean of 4000 images is within 5 standard errors of the expectation
    assert abs(float(distinct.mean()) - want) <= 5 * float(distinct.std()) / 4000**0.5 + 1e-9


def test_cost_model_terms():
    B, C, hidden, m, HW = 256, 384, 512, 64, 196
    costs = dp.first_layer_costs(B, C, hidden, m, HW)
    D = dp.expected_distinct(m, HW)
    assert costs["gather"][0] == 3 * 2 * B * m * 2 * C * hidden
    assert costs["project"][0] == 3 * 2 * B * HW * C * 2 * hidden
    assert costs["unique"][0] == pytest.approx(3 * 2 * B * 2 * D * C * hidden)
    # unique never multiplies more than the cheaper of the other two
    for m2, hw2 in ((1, 1), (64, 49), (64, 196), (500, 49), (3, 1000)):
        c = dp.first_layer_costs(8, 16, 32, m2, hw2)
        assert c["unique"][0] <= min(c["gather"][0], c["project"][0]) * (1 + 1e-12)
    bytes16 = dp.first_layer_costs(B, C, hidden, m, HW, elem_size=2)
    for k in costs:
        assert bytes16[k] == (costs[k][0], pytest.approx(costs[k][1] / 2))


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_auto_picks_the_cheapest_by_the_model(device_type):
    rate = dp.FLOPS_PER_BYTE[device_type]
    seen = set()
    for B in (1, 256):
        for C in (8, 192, 768):
            for hidden in (16, 512):
                for m in (1, 16, 64, 500):
                    for HW in (1, 49, 128, 196, 3136):
                        for allow in (True, False):
                            costs = dp.first_layer_costs(B, C, hidden, m, HW)
                            names = [k for k in ("gather", "project", "unique") if allow or k != "unique"]
                            total = {k: costs[k][0] + rate * costs[k][1] for k in names}
                            got = dp.choose_first_layer_strategy(
                                B, C, hidden, m, HW, device_type=device_type, allow_unique=allow
                            )
                            assert total[got] == min(total.values())
                            seen.add(got)
    assert seen == {"gather", "project", "unique"}  # every strategy wins somewhere
    # the benchmark's sizes on the CPU: unique everywhere (never more products, fewer bytes)
    pick = functools.partial(dp.choose_first_layer_strategy, 256, hidden=512, m=64)
    assert all(pick(C=c, HW=hw) == "unique" for c in (192, 384, 768) for hw in (49, 128, 196, 3136))
    assert pick(C=768, HW=49, allow_unique=False) == "project"
    assert pick(C=768, HW=196, allow_unique=False) == "gather"


def test_auto_never_runs_unique_on_the_triton_path(force_path, monkeypatch):
    calls = []
    real = dp.drloc_first_layer_unique_op
    monkeypatch.setattr(api, "drloc_first_layer_unique_op", lambda *a: calls.append(1) or real(*a))
    B, C, H, W, m, hidden = 2, 192, 7, 7, 64, 512
    _, grid, weight, bias, pos, _ = _first_layer_case(B, C, H, W, m, hidden, torch.float32, "tokens", 2)
    assert dp.choose_first_layer_strategy(B, C, hidden, m, H * W) == "unique"
    dp.drloc_first_layer(grid, pos, weight, bias)
    assert calls == [1]
    force_path("ref")
    dp.drloc_first_layer(grid, pos, weight, bias)
    assert calls == [1, 1]
    force_path("triton")
    calls.clear()
    try:
        dp.drloc_first_layer(grid, pos, weight, bias)
    except dispatch.KernelUnavailable:
        pass  # no Triton here: the point is which strategy was chosen
    assert calls == []


# --------------------------------------------------------------------------- #
# Registration: opcheck, torch.compile
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("layout", ["tokens", "contiguous"])
def test_opcheck(layout):
    B, C, H, W, m = 2, 3, 4, 5, 6
    grid = _make_grid(B, C, H, W, layout=layout, seed=9).requires_grad_(True)
    table = _make_grid(B, 2 * C, H, W, layout=layout, seed=10).requires_grad_(True)
    pos = dp.drloc_positions(B, m, H, W, 3)
    g = torch.randn(B, m, 2 * C, generator=gen(11))
    ops = torch.ops.batchkin
    cases = [
        (ops.drloc_gather.default, (grid, pos)),
        (ops.drloc_gather_cat.default, (grid, pos)),
        (ops.drloc_gather_sum.default, (table, pos, C, None)),
        (ops.drloc_gather_sum.default, (table, pos, C, torch.randn(C, requires_grad=True))),
        (ops.drloc_gather_sum.default, (table.detach(), pos, C, torch.randn(C, requires_grad=True))),
        (ops.drloc_pairs.default, (grid, m, 12345, False, False)),
        (ops.drloc_pairs.default, (grid, m, 2**32 - 1, True, True)),
        (ops.drloc_scatter.default, (g[..., :C], g[..., C:], pos, C, H, W, 0, layout == "tokens")),
        (ops.drloc_positions.default, (B, m, H, W, 77, torch.device("cpu"))),
    ]
    weight = torch.randn(5, 2 * C, generator=gen(12), requires_grad=True)
    bias = torch.randn(5, generator=gen(13), requires_grad=True)
    grad = torch.randn(B, m, 5, generator=gen(14))
    cases += [
        (ops.drloc_first_layer_unique.default, (grid, pos, weight, bias)),
        (ops.drloc_first_layer_unique.default, (grid, pos, weight, None)),
        (ops.drloc_first_layer_unique_backward.default,
         (grad, grid.detach(), pos, weight.detach(), True, layout == "tokens")),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    B, C, H, W, m, hidden = 3, 8, 5, 6, 32, 16
    torch._dynamo.reset()

    def step(tokens, weight, bias, w2, key):
        grid = tokens.transpose(1, 2).unflatten(2, (H, W))
        e_a, e_b, targets, pos = dp.drloc_pairs(grid, m, key, "abs", True)
        hidden_a = dp.drloc_first_layer(grid, pos, weight, bias)  # auto: the cost model's choice
        hidden_b = F.linear(torch.cat([e_a, e_b], -1), weight, bias)
        pred = F.relu(hidden_a + hidden_b) @ w2
        return F.l1_loss(pred, targets)

    g = gen(12)
    tokens = torch.randn(B, H * W, C, generator=g, requires_grad=True)
    weight = torch.randn(hidden, 2 * C, generator=g, requires_grad=True)
    bias = torch.randn(hidden, generator=g, requires_grad=True)
    w2 = torch.randn(hidden, 2, generator=g, requires_grad=True)
    params = [tokens, weight, bias, w2]
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for key in (5, 6):
        want = step(*params, key)
        got = compiled(*params, key)
        torch.testing.assert_close(got, want)
        for a, b in zip(torch.autograd.grad(got, params), torch.autograd.grad(want, params)):
            torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- #
# Argument checks
# --------------------------------------------------------------------------- #


def test_bad_inputs():
    grid = torch.randn(2, 3, 4, 5)
    pos = dp.drloc_positions(2, 6, 4, 5, 1)
    weight, bias = torch.randn(7, 6), torch.randn(7)
    with pytest.raises(ValueError, match="grid"):
        dp.drloc_pairs(torch.randn(2, 3, 4), 4, 1)
    with pytest.raises(TypeError, match="grid"):
        dp.drloc_pairs(grid.double(), 4, 1)
    with pytest.raises(TypeError, match="grid"):
        dp.drloc_gather(grid.numpy(), pos)
    with pytest.raises(ValueError, match="grid"):
        dp.drloc_gather(torch.randn(2, 3, 0, 5), pos)
    with pytest.raises(ValueError, match="m must be >= 1"):
        dp.drloc_pairs(grid, 0, 1)
    with pytest.raises(TypeError, match="m must be an int"):
        dp.drloc_pairs(grid, 2.0, 1)
    with pytest.raises(ValueError, match="mode"):
        dp.drloc_pairs(grid, 2, 1, mode="relative")
    with pytest.raises(TypeError, match="normalize"):
        dp.drloc_pairs(grid, 2, 1, normalize=1)
    with pytest.raises(ValueError, match="key"):
        dp.drloc_pairs(grid, 2, -1)
    with pytest.raises(ValueError, match="key"):
        dp.drloc_pairs(grid, 2, 2**32)
    with pytest.raises(TypeError, match="key"):
        dp.drloc_pairs(grid, 2, 1.5)
    with pytest.raises(ValueError, match="B \\* m \\* 4"):
        dp.drloc_positions(2**20, 2**11, 4, 5, 1)
    for name, args in (("B", (0, 2, 4, 5, 1)), ("m", (2, 0, 4, 5, 1)), ("H", (2, 2, 0, 5, 1)), ("W", (2, 2, 4, 0, 1))):
        with pytest.raises(ValueError, match=f"{name} must be >= 1"):
            dp.drloc_positions(*args)
    # positions: dtype, shape, device, range
    with pytest.raises(TypeError, match="pos"):
        dp.drloc_gather(grid, pos.float())
    with pytest.raises(ValueError, match="pos"):
        dp.drloc_gather(grid, pos[..., :3])
    with pytest.raises(ValueError, match="pos"):
        dp.drloc_gather(grid, pos[:1])
    with pytest.raises(ValueError, match="pos"):
        dp.drloc_gather(grid, pos[:, :0])
    with pytest.raises(ValueError, match="pos"):
        dp.drloc_gather(grid, pos.to("meta"))
    for t, bad in ((0, 4), (2, -1), (1, 5), (3, -2)):
        p = pos.clone()
        p[1, 2, t] = bad
        with pytest.raises(ValueError, match="pos (rows|cols)"):
            dp.drloc_gather(grid, p)
        with pytest.raises(ValueError, match="pos (rows|cols)"):
            dp.drloc_first_layer(grid, p, weight, bias)
        with pytest.raises(ValueError, match="pos (rows|cols)"):
            dp.drloc_first_layer(grid, p, weight, bias, strategy="project")
    # the first layer's weight and bias
    with pytest.raises(ValueError, match="weight"):
        dp.drloc_first_layer(grid, pos, torch.randn(7, 5), bias)
    with pytest.raises(ValueError, match="weight"):
        dp.drloc_first_layer(grid, pos, torch.randn(7, 6, 1), bias)
    with pytest.raises(TypeError, match="weight"):
        dp.drloc_first_layer(grid, pos, weight.half(), bias)
    with pytest.raises(ValueError, match="weight"):
        dp.drloc_first_layer(grid, pos, weight.to("meta"), bias)
    with pytest.raises(ValueError, match="bias"):
        dp.drloc_first_layer(grid, pos, weight, torch.randn(6))
    with pytest.raises(TypeError, match="bias"):
        dp.drloc_first_layer(grid, pos, weight, bias.bfloat16())
    with pytest.raises(ValueError, match="strategy"):
        dp.drloc_first_layer(grid, pos, weight, bias, strategy="fast")
    # targets
    with pytest.raises(ValueError, match="pos"):
        dp.drloc_targets(pos[..., :2], 4, 5)
    with pytest.raises(ValueError, match="mode"):
        dp.drloc_targets(pos, 4, 5, mode="ABS")
    with pytest.raises(ValueError, match="path"):
        dp.drloc_gather_impl(grid, pos, "cuda")


def test_forced_path_reports_unavailable(force_path):
    force_path("cpp")
    with pytest.raises(dispatch.KernelUnavailable, match="drloc_pairs"):
        dp.drloc_positions(2, 2, 3, 3, 1, device="meta")
    with pytest.raises(dispatch.KernelUnavailable, match="drloc_pairs"):
        dp.drloc_positions_impl(2, 2, 3, 3, 1, "meta", "cpp")


_AOT_SCRIPT = r"""
import batchkin.kernels.drloc_pairs.triton as dpk

sig = {"pos_ptr": "*i64", "total": i64, "H": i32, "W": i32, "key": i64}
ptx = build(dpk._drloc_positions_kernel, sig, {"BLOCK": 1024})
assert "fma" not in ptx  # u * size stays one rounded multiplication, as in torch and C++
for dt in ("fp32", "bf16"):
    g = {"grid_ptr": "*" + dt, "s_b": i32, "s_c": i32, "s_h": i32, "s_w": i32}
    for sum_, bias in ((False, False), (True, False), (True, True)):
        build(dpk._drloc_gather_kernel, dict(g, pos_ptr="*i64", ea_ptr="*" + dt, eb_ptr="*" + dt, bias_ptr="*" + dt,
              N=i32, m=i32, NCH=i32, OFF_B=i32, H=i32, W=i32, O_STRIDE=i32),
              {"SUM": sum_, "HAS_BIAS": bias, "BLOCK_P": 16, "BLOCK_C": 256})
    ptx = build(dpk._drloc_pairs_kernel, dict(g, ea_ptr="*" + dt, eb_ptr="*" + dt, tgt_ptr="*fp32", pos_ptr="*i64",
          N=i32, m=i32, C=i32, H=i32, W=i32, Hf="fp32", Wf="fp32", denom_h="fp32", denom_w="fp32", key=i64),
          {"SIGNED": True, "NORMALIZE": True, "BLOCK_P": 16, "BLOCK_C": 256})
    assert "div.rn.f32" in ptx and "div.full" not in ptx  # correctly rounded normalisation
    build(dpk._drloc_scatter_kernel, {"acc_ptr": "*fp32", "ga_ptr": "*" + dt, "gb_ptr": "*" + dt, "pos_ptr": "*i64",
          **{k: i32 for k in ("m", "NCH", "OFF_B", "W", "o_b", "o_p", "o_c", "a_sb", "a_sm", "a_sc", "b_sb",
                              "b_sm", "b_sc")}}, {"BLOCK_C": 256})
print("compiled")
"""


@aot
def test_triton_kernels_compile_for_cuda():
    """The kernels compile to sm_90 code ahead of time (no GPU needed, interpreter off)."""
    compile_for_cuda(_AOT_SCRIPT)
