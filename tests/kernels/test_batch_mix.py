"""Tests of the in-batch mixing op (METHODS.md section 4, "Mixing").

The C++ path, the vectorised reference and the Triton kernel (interpreter mode on CPU
tensors) are compared with the loop reference on fresh random inputs: every path computes
the same float32 values, so they agree bit for bit, uint8 rounding included. Hand-worked
examples pin the semantics; distribution tests check the drawn parameters.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from _util import aot, compile_for_cuda, gen, path_params
from scipy import stats

from batchkin.kernels import batch_mix as bm
from batchkin.kernels import dispatch

IMAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def _images(shape, dtype, g):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    return (torch.randn(shape, generator=g) * 2).to(dtype)


def _random_boxes(V, B, H, W, g):
    """Boxes of every size from 0 to the full image, uniformly placed (edge cases included)."""
    h = torch.randint(0, H + 1, (V, B), generator=g)
    w = torch.randint(0, W + 1, (V, B), generator=g)
    y0 = (torch.rand(V, B, generator=g) * (H - h + 1)).floor().long().clamp(max=H - h)
    x0 = (torch.rand(V, B, generator=g) * (W - w + 1)).floor().long().clamp(max=W - w)
    boxes = torch.stack((y0, x0, h, w), -1)
    # pin a few edge cases: a full-image box, a zero-height box, a box in the last corner
    boxes[0, 0] = torch.tensor([0, 0, H, W])
    if B > 1:
        boxes[-1, 1] = torch.tensor([H // 2, 0, 0, W])
    if B > 2:
        hh, ww = max(1, H // 3), max(1, W // 3)
        boxes[0, 2] = torch.tensor([H - hh, W - ww, hh, ww])
    return boxes


def _case(shape, dtype, seed, ops=None):
    """Random images, per-sample operators (all three interleaved unless ``ops``), lam, boxes."""
    g = gen(seed)
    V = shape[0] if len(shape) == 5 else 1
    B, C, H, W = shape[-4:]
    x = _images(shape, dtype, g)
    if ops is None:
        op = (torch.arange(B) + int(torch.randint(3, (1,), generator=g))) % 3
    else:
        op = torch.full((B,), ops, dtype=torch.int64)
    lam = torch.rand(B, generator=g)
    boxes = _random_boxes(V, B, H, W, g)
    return x, op, lam, boxes


def _changed(out, x):
    return out != x


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


def test_constants_and_partner():
    assert (bm.MIXUP, bm.CUTMIX, bm.RESIZEMIX) == (0, 1, 2)
    assert bm.OPERATORS == {"mixup": 0, "cutmix": 1, "resizemix": 2}
    assert bm.partner_index(5).tolist() == [4, 3, 2, 1, 0]
    assert bm.partner_index(1).tolist() == [0]


def test_sample_mix_params_shapes_and_ranges():
    B, H, W = 37, 13, 29
    p = bm.sample_mix_params(B, H, W, generator=gen(0), num_views=2)
    assert p.op.shape == (B,) and p.op.dtype == torch.int64
    assert p.lam.shape == (B,) and p.lam.dtype == torch.float32
    assert p.boxes.shape == (2, B, 4) and p.boxes.dtype == torch.int64
    assert bool(((p.lam >= 0.1) & (p.lam <= 0.9)).all())
    # one operator for the whole batch by default
    assert p.op.unique().numel() == 1
    y0, x0, h, w = p.boxes.unbind(-1)
    assert bool(((y0 >= 0) & (x0 >= 0) & (y0 + h <= H) & (x0 + w <= W)).all())
    # box side ratio sqrt(1 - lam), the same size for both views
    side = torch.sqrt(1 - p.lam.double())
    assert torch.equal(h, torch.round(H * side).long().expand(2, B))
    assert torch.equal(w, torch.round(W * side).long().expand(2, B))
    op, lam, boxes = p  # iterable, for batch_mix(x, *params)
    assert op is p.op and lam is p.lam and boxes is p.boxes


def test_sample_mix_params_reproducible_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = bm.sample_mix_params(8, 16, 16, generator=gen(3), num_views=2, per_sample_op=True)
    b = bm.sample_mix_params(8, 16, 16, generator=gen(3), num_views=2, per_sample_op=True)
    c = bm.sample_mix_params(8, 16, 16, generator=gen(4), num_views=2, per_sample_op=True)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not all(torch.equal(s, t) for s, t in zip(a, c))


def test_lam_is_uniform_on_0_1_to_0_9():
    p = bm.sample_mix_params(20000, 8, 8, generator=gen(1))
    lam = p.lam.double().numpy()
    assert lam.min() >= 0.1 and lam.max() <= 0.9
    result = stats.kstest(lam, stats.uniform(loc=0.1, scale=0.8).cdf)
    assert result.pvalue > 1e-3
    # and clearly not uniform on [0, 1]
    assert stats.kstest(lam, stats.uniform(loc=0.0, scale=1.0).cdf).pvalue < 1e-6


def test_box_positions_are_uniform_chi_square():
    """Given its size, a box's corner is uniform over the valid positions: per size,
    a chi-square statistic; the independent statistics add up (as do their dofs)."""
    H, W, n = 10, 12, 30000
    p = bm.sample_mix_params(n, H, W, generator=gen(2))
    y0, x0, h, w = (t.numpy() for t in p.boxes[0].unbind(-1))
    total_stat, total_dof = 0.0, 0
    for pos, size, full in ((y0, h, H), (x0, w, W)):
        for s in sorted(set(size.tolist())):
            sel = pos[size == s]
            cells = full - s + 1
            if cells < 2 or len(sel) < 5 * cells:
                continue
            counts = [int((sel == k).sum()) for k in range(cells)]
            stat, _ = stats.chisquare(counts)
            total_stat += stat
            total_dof += cells - 1
    assert total_dof > 30
    assert stats.chi2.sf(total_stat, total_dof) > 1e-3


def test_views_share_lam_but_not_box_positions():
    B, H, W = 64, 32, 32
    p = bm.sample_mix_params(B, H, W, generator=gen(5), num_views=2, ops=("cutmix",))
    assert torch.equal(p.boxes[0, :, 2:], p.boxes[1, :, 2:])  # size from the shared lam
    same_corner = (p.boxes[0, :, :2] == p.boxes[1, :, :2]).all(-1)
    assert int(same_corner.sum()) < B // 4  # independent positions
    x = torch.randn(2, B, 3, H, W, generator=gen(6))
    _, lam_eff = bm.batch_mix(x, *p)
    assert torch.equal(lam_eff[0], lam_eff[1])


@pytest.mark.parametrize("per_sample", [False, True])
def test_operator_choice_is_uniform(per_sample):
    counts = torch.zeros(3)
    if per_sample:
        p = bm.sample_mix_params(6000, 8, 8, generator=gen(7), per_sample_op=True)
        counts += torch.bincount(p.op, minlength=3)
    else:
        g = gen(8)
        for _ in range(1500):
            op = bm.sample_mix_params(4, 8, 8, generator=g).op
            assert op.unique().numel() == 1
            counts[int(op[0])] += 1
    assert stats.chisquare(counts.tolist()).pvalue > 1e-3
    # a restricted set is respected
    p = bm.sample_mix_params(500, 8, 8, generator=gen(9), ops=("cutmix", 2), per_sample_op=True)
    assert set(p.op.tolist()) == {1, 2}


def test_sample_mix_params_bad_arguments():
    g = gen(0)
    with pytest.raises(ValueError, match="ops"):
        bm.sample_mix_params(4, 8, 8, generator=g, ops=("mixup", "blend"))
    with pytest.raises(ValueError, match="ops"):
        bm.sample_mix_params(4, 8, 8, generator=g, ops=())
    with pytest.raises(ValueError, match="ops"):
        bm.sample_mix_params(4, 8, 8, generator=g, ops=("mixup", 0))
    with pytest.raises(ValueError, match="ops"):
        bm.sample_mix_params(4, 8, 8, generator=g, ops=(7,))
    with pytest.raises(ValueError, match="B"):
        bm.sample_mix_params(0, 8, 8, generator=g)
    with pytest.raises(ValueError, match="num_views"):
        bm.sample_mix_params(4, 8, 8, generator=g, num_views=0)
    with pytest.raises(TypeError, match="W"):
        bm.sample_mix_params(4, 8, 8.0, generator=g)
    with pytest.raises(TypeError, match="generator"):
        bm.sample_mix_params(4, 8, 8, generator=0)


# --------------------------------------------------------------------------------------
# Hand-worked examples
# --------------------------------------------------------------------------------------

PATHS = path_params("ref", "ref_vec", "cpp", "triton")


@pytest.mark.parametrize("path", PATHS)
def test_mixup_by_hand(path):
    x = torch.stack([torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 10.0)])
    no_box = torch.zeros(1, 2, 4, dtype=torch.long)
    out, lam_eff = bm.batch_mix_impl(x, torch.tensor([0, 0]), torch.tensor([0.25, 0.5]), no_box, path=path)
    assert torch.equal(out[0], torch.full((1, 2, 3), 8.0))  # 0.25*2 + 0.75*10
    assert torch.equal(out[1], torch.full((1, 2, 3), 6.0))  # 0.5*10 + 0.5*2
    assert torch.equal(lam_eff, torch.tensor([[0.25, 0.5]]))


@pytest.mark.parametrize("path", PATHS)
def test_uint8_rounds_half_up(path):
    x = torch.tensor([10, 0, 11], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 1, 2).contiguous()
    x[1, 0, 0, 1] = 1
    lam = torch.tensor([0.5, 0.5, 0.5])
    out, _ = bm.batch_mix_impl(x, torch.zeros(3, dtype=torch.long), lam, torch.zeros(1, 3, 4, dtype=torch.long), path=path)
    # 0.5*10 + 0.5*11 = 10.5 -> 11; the middle sample mixes with itself: 0 -> 0 and 1 -> 1
    assert out[:, 0, 0].tolist() == [[11, 11], [0, 1], [11, 11]]


@pytest.mark.parametrize("path", PATHS)
def test_uint8_resizemix_rounds_exact_halves_up(path):
    """A 4x4 partner resized to 2x2 averages 2x2 blocks (all weights 1/2): block sums of
    42, 46, 49 and 51 give 10.5, 11.5, 12.25 and 12.75 -> 11, 12, 12, 13 (half up: an even
    k + 0.5 goes up too, which round-half-to-even would not do)."""
    partner = torch.tensor([[10, 11, 11, 12], [10, 11, 11, 12], [12, 12, 12, 13], [12, 13, 13, 13]], dtype=torch.uint8)
    x = torch.stack([torch.zeros(1, 4, 4, dtype=torch.uint8), partner.view(1, 4, 4)])
    boxes = torch.tensor([[[1, 1, 2, 2], [0, 0, 0, 0]]])
    out, _ = bm.batch_mix_impl(x, torch.tensor([2, 2]), torch.full((2,), 0.5), boxes, path=path)
    assert out[0, 0, 1:3, 1:3].tolist() == [[11, 12], [12, 13]]
    assert int(out[0].sum()) == 48  # nothing outside the box changed


@pytest.mark.parametrize("path", path_params("ref_vec", "cpp", "triton"))
def test_uint8_resizemix_bit_identical_where_the_mix_hits_halves(path):
    """Random uint8 resizemix over many box sizes: the float32 mix lands on exactly k + 0.5 at
    many pixels (the tie cases of the rounding), and every path still equals the reference."""
    x, _, lam, boxes = _case((2, 8, 3, 13, 17), torch.uint8, 70, bm.RESIZEMIX)
    op = torch.full((8,), bm.RESIZEMIX)
    mixed = bm.batch_mix_impl(x.float(), op, lam, boxes, path="ref")[0]
    ties = int((mixed - mixed.floor() == 0.5).sum())
    assert ties >= 10
    ref, _ = bm.batch_mix_impl(x, op, lam, boxes, path="ref")
    assert torch.equal(ref, torch.floor(mixed + 0.5).to(torch.uint8))
    assert torch.equal(bm.batch_mix_impl(x, op, lam, boxes, path=path)[0], ref)


@pytest.mark.parametrize("path", PATHS)
def test_cutmix_by_hand(path):
    # three 4x4 one-channel images filled with 0, 1, 2; the middle one pairs with itself
    x = torch.arange(3, dtype=torch.float32).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    boxes = torch.tensor([[[1, 1, 2, 2], [0, 0, 4, 4], [3, 0, 1, 4]]])
    out, lam_eff = bm.batch_mix_impl(x, torch.ones(3, dtype=torch.long), torch.full((3,), 0.5), boxes, path=path)
    expect0 = torch.zeros(4, 4)
    expect0[1:3, 1:3] = 2.0
    expect2 = torch.full((4, 4), 2.0)
    expect2[3, :] = 0.0
    assert torch.equal(out[0, 0], expect0)
    assert torch.equal(out[1, 0], torch.ones(4, 4))
    assert torch.equal(out[2, 0], expect2)
    assert torch.equal(lam_eff, torch.tensor([[0.75, 0.0, 0.75]]))


@pytest.mark.parametrize("path", PATHS)
def test_resizemix_by_hand(path):
    # partner 4x4 with values 4y + x; resized to 2x2 (scale 2): src = 2*(d + 0.5) - 0.5 = 0.5, 2.5,
    # i.e. the mean of each 2x2 block
    partner = torch.arange(16, dtype=torch.float32).view(1, 4, 4)
    x = torch.stack([torch.full((1, 4, 4), -1.0), partner])
    boxes = torch.tensor([[[1, 2, 2, 2], [0, 0, 0, 0]]])
    out, lam_eff = bm.batch_mix_impl(x, torch.tensor([2, 2]), torch.full((2,), 0.5), boxes, path=path)
    expect = torch.full((4, 4), -1.0)
    expect[1:3, 2:4] = torch.tensor([[2.5, 4.5], [10.5, 12.5]])
    assert torch.equal(out[0, 0], expect)
    assert torch.equal(out[1], partner)  # zero-area box: unchanged
    assert torch.equal(lam_eff, torch.tensor([[0.75, 1.0]]))

    # a 3x1 column [a, b, c] resized to 2 rows: scale 1.5, src = 0.25, 1.75
    col = torch.tensor([1.0, 5.0, 9.0]).view(1, 3, 1)
    x = torch.stack([torch.zeros(1, 3, 1), col])
    boxes = torch.tensor([[[1, 0, 2, 1], [0, 0, 3, 1]]])
    out, lam_eff = bm.batch_mix_impl(x, torch.tensor([2, 2]), torch.full((2,), 0.5), boxes, path=path)
    assert out[0, 0, :, 0].tolist() == [0.0, 0.75 * 1 + 0.25 * 5, 0.25 * 5 + 0.75 * 9]
    assert torch.equal(out[1], torch.zeros(1, 3, 1))  # full box: the partner at scale 1
    assert torch.allclose(lam_eff, torch.tensor([[1 / 3, 0.0]]))


# --------------------------------------------------------------------------------------
# Semantics on random inputs
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["ref", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("name", ["mixup", "cutmix", "resizemix"])
def test_mixing_changes_pixels_and_lam_eff_is_unchanged_fraction(path, name):
    V, B, C, H, W = 2, 5, 3, 9, 12
    g = gen(11)
    x = torch.randn(V, B, C, H, W, generator=g)
    p = bm.sample_mix_params(B, H, W, generator=g, ops=(name,), num_views=V)
    out, lam_eff = bm.batch_mix_impl(x, *p, path=path)
    assert out.shape == x.shape and out.dtype == x.dtype
    changed = _changed(out, x)
    mid = B // 2
    others = [i for i in range(B) if i != mid]
    assert bool(changed[:, others].any(dim=(2, 3, 4)).all()), "every non-middle sample must change"
    if name == "mixup":
        assert torch.equal(lam_eff, p.lam.expand(V, B))
        assert bool(changed[:, others].all())
        return
    # the mask of changed pixels is exactly the box, identical for every channel
    assert torch.equal(changed, changed[:, :, :1].expand_as(changed))
    for v in range(V):
        for i in others:
            unchanged = int((~changed[v, i, 0]).sum())
            expect = torch.tensor(unchanged / (H * W), dtype=torch.float64).float()
            assert lam_eff[v, i] == expect, (v, i)
            y0, x0, h, w = p.boxes[v, i].tolist()
            assert bool(changed[v, i, :, y0 : y0 + h, x0 : x0 + w].all())
            assert unchanged == H * W - h * w
    assert torch.equal(lam_eff, ((H * W - p.boxes[..., 2] * p.boxes[..., 3]).double() / (H * W)).float())


@pytest.mark.parametrize("path", ["ref", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_pasted_region_is_bilinear_resize_of_partner(path):
    """The formula of F.interpolate (bilinear, align_corners=False); F.interpolate itself may
    fuse multiply-adds, so it agrees to the last bits only."""
    V, B, C, H, W = 2, 4, 3, 11, 14
    g = gen(12)
    x = torch.randn(V, B, C, H, W, generator=g)
    p = bm.sample_mix_params(B, H, W, generator=g, ops=("resizemix",), num_views=V)
    out, _ = bm.batch_mix_impl(x, *p, path=path)
    for v in range(V):
        for i in range(B):
            y0, x0, h, w = p.boxes[v, i].tolist()
            resized = F.interpolate(x[v, B - 1 - i][None], size=(h, w), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(out[v, i, :, y0 : y0 + h, x0 : x0 + w], resized, rtol=1e-6, atol=1e-6)
            rest = torch.ones(H, W, dtype=torch.bool)
            rest[y0 : y0 + h, x0 : x0 + w] = False
            assert torch.equal(out[v, i][:, rest], x[v, i][:, rest])


@pytest.mark.parametrize("path", ["ref", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_odd_batch_middle_sample_mixes_with_itself(path):
    B, C, H, W = 7, 2, 6, 9
    g = gen(13)
    x = torch.randn(B, C, H, W, generator=g)
    lam = torch.full((B,), 0.3)
    boxes = torch.tensor([[[1, 2, 4, 5]] * B])
    mid = x[3]
    out, _ = bm.batch_mix_impl(x, torch.zeros(B, dtype=torch.long), lam, boxes, path=path)
    torch.testing.assert_close(out[3], mid, rtol=1e-6, atol=1e-6)  # 0.3*x + 0.7*x
    torch.testing.assert_close(out[0], 0.3 * x[0] + 0.7 * x[6])
    out, _ = bm.batch_mix_impl(x, torch.ones(B, dtype=torch.long), lam, boxes, path=path)
    assert torch.equal(out[3], mid)  # pasting its own pixels back
    assert torch.equal(out[2, :, 1:5, 2:7], x[4, :, 1:5, 2:7])
    out, _ = bm.batch_mix_impl(x, torch.full((B,), 2), lam, boxes, path=path)
    own_resized = F.interpolate(mid[None], size=(4, 5), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(out[3, :, 1:5, 2:7], own_resized, rtol=1e-6, atol=1e-6)


def test_views_mix_within_their_own_view():
    V, B, C, H, W = 2, 4, 1, 5, 5
    x = torch.randn(V, B, C, H, W, generator=gen(14))
    lam = torch.full((B,), 0.25)
    out, _ = bm.batch_mix(x, torch.zeros(B, dtype=torch.long), lam, torch.zeros(V, B, 4, dtype=torch.long))
    for v in range(V):
        torch.testing.assert_close(out[v], 0.25 * x[v] + 0.75 * x[v].flip(0))
        single, _ = bm.batch_mix(x[v], torch.zeros(B, dtype=torch.long), lam, torch.zeros(B, 4, dtype=torch.long))
        torch.testing.assert_close(out[v], single)


# --------------------------------------------------------------------------------------
# Parity of the fast paths with the reference
# --------------------------------------------------------------------------------------

CPP_SHAPES = [
    (1, 1, 8, 8),
    (2, 3, 7, 11),
    (7, 1, 32, 32),
    (16, 3, 8, 8),
    (2, 1, 1, 7, 11),
    (2, 7, 3, 8, 8),
    (2, 16, 1, 7, 11),
    (2, 2, 3, 32, 32),
    (2, 16, 3, 32, 32),
    (3, 5, 2, 13, 6),
]


@pytest.mark.parametrize("dtype", IMAGE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=str)
@pytest.mark.parametrize("path", ["cpp", "ref_vec"])
def test_parity_cpu_paths(path, shape, dtype):
    for seed, ops in ((20, None), (21, bm.MIXUP), (22, bm.CUTMIX), (23, bm.RESIZEMIX)):
        x, op, lam, boxes = _case(shape, dtype, seed + 100 * len(shape), ops)
        ref, ref_eff = bm.batch_mix_impl(x, op, lam, boxes, path="ref")
        out, eff = bm.batch_mix_impl(x, op, lam, boxes, path=path)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.equal(out, ref)
        assert torch.equal(eff, ref_eff)


TRITON_SHAPES = [
    (1, 1, 8, 8),
    (2, 2, 3, 7, 11),
    (7, 1, 8, 8),
    (2, 7, 1, 7, 11),
    (16, 3, 7, 11),
    (1, 16, 1, 32, 32),
]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", IMAGE_DTYPES, ids=str)
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_parity_triton(shape, dtype):
    B = shape[-4]
    cases = [(30, None)] if B > 2 else [(31, bm.MIXUP), (32, bm.CUTMIX), (33, bm.RESIZEMIX)]
    for seed, ops in cases:
        x, op, lam, boxes = _case(shape, dtype, seed + 100 * len(shape), ops)
        ref, ref_eff = bm.batch_mix_impl(x, op, lam, boxes, path="ref")
        out, eff = bm.batch_mix_impl(x, op, lam, boxes, path="triton")
        assert out.shape == x.shape and out.dtype == x.dtype
        if dtype == torch.bfloat16 and x.device.type == "cpu":
            # the interpreter truncates float32 -> bfloat16 stores (GPUs round to nearest even)
            torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=0)
        else:
            assert torch.equal(out, ref)
        assert torch.equal(eff, ref_eff)


@pytest.mark.triton
def test_triton_matches_cpp_on_a_two_view_32x32_batch():
    x, op, lam, boxes = _case((2, 16, 3, 32, 32), torch.float32, 40)
    a, ea = bm.batch_mix_impl(x, op, lam, boxes, path="triton")
    b, eb = bm.batch_mix_impl(x, op, lam, boxes, path="cpp")
    assert torch.equal(a, b)
    assert torch.equal(ea, eb)


@pytest.mark.parametrize("path", ["cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_non_contiguous_input(path):
    g = gen(41)
    base = torch.randn(3, 5, 2, 9, 8, generator=g)
    x = base[::2].transpose(-1, -2)  # [2, 5, 2, 8, 9], not contiguous
    assert not x.is_contiguous()
    p = bm.sample_mix_params(5, 8, 9, generator=g, num_views=2, per_sample_op=True)
    ref, _ = bm.batch_mix_impl(x.contiguous(), *p, path="ref")
    out, _ = bm.batch_mix_impl(x, *p, path=path)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8], ids=str)
def test_cpp_large_output_matches_reference(dtype):
    """Outputs of 32 MiB and more take the huge-page allocation; planes of odd size, so
    neither the tensor nor the planes line up with 2 MiB pages. Values must not change."""
    shape = (2, 9, 3, 400, 523) if dtype == torch.float32 else (2, 9, 3, 800, 1047)
    assert torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() >= 32 << 20
    x, op, lam, boxes = _case(shape, dtype, 60)
    ref, ref_eff = bm.batch_mix_impl(x, op, lam, boxes, path="ref")
    out, eff = bm.batch_mix_impl(x, op, lam, boxes, path="cpp")
    assert out.is_contiguous() and out.data_ptr() != x.data_ptr()
    assert torch.equal(eff, ref_eff)
    assert torch.equal(out, ref)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the block cache is Linux only")
def test_cpp_large_output_blocks_are_reused_and_fully_overwritten():
    """A freed large output's block is handed to the next output of the same size; its
    stale values must all be overwritten (cutmix and mixup are exact, so bit for bit)."""
    shape = (8, 3, 600, 600)  # 33 MB of float32
    first = _case(shape, torch.float32, 61, ops=bm.MIXUP)
    second = _case(shape, torch.float32, 62, ops=bm.CUTMIX)
    a, _ = bm.batch_mix_impl(*first, path="cpp")
    b, _ = bm.batch_mix_impl(*second, path="cpp")  # a is alive: another block
    assert a.data_ptr() != b.data_ptr()
    assert torch.equal(a, bm.batch_mix_impl(*first, path="ref")[0])
    freed = b.data_ptr()
    del b
    c, _ = bm.batch_mix_impl(*first, path="cpp")
    assert c.data_ptr() == freed  # the cached block, holding the cutmix result
    assert torch.equal(c, a)
    del a
    d, _ = bm.batch_mix_impl(*second, path="cpp")
    assert torch.equal(d, bm.batch_mix_impl(*second, path="ref")[0])
    # the cached blocks back ordinary tensors: views, in-place ops and clones work
    e = d.clone()
    d[1:3].mul_(2)
    assert torch.equal(d[1:3], 2 * e[1:3]) and torch.equal(d[3:], e[3:])


def test_cpp_resizemix_reuses_rows_correctly_across_planes_and_samples():
    """The resized partner rows are cached per plane: consecutive planes (channels, then
    samples with other boxes) must never see the rows of the previous plane."""
    g = gen(61)
    B, C, H, W = 5, 3, 17, 23
    x = torch.randn(2, B, C, H, W, generator=g)
    # the same box size everywhere (the cache could wrongly survive a plane change), and
    # one sample with a different size between two samples with the same size
    boxes = torch.tensor([[[1, 2, 12, 15]] * B, [[0, 0, 12, 15], [3, 4, 12, 15], [2, 1, 7, 9], [5, 8, 12, 15],
                                                   [0, 0, 17, 23]]])
    op = torch.full((B,), bm.RESIZEMIX)
    out, _ = bm.batch_mix_impl(x, op, torch.full((B,), 0.5), boxes, path="cpp")
    for v in range(2):
        for i in range(B):
            y0, x0, h, w = boxes[v, i].tolist()
            patch = F.interpolate(x[v, B - 1 - i][None], size=(h, w), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(out[v, i, :, y0 : y0 + h, x0 : x0 + w], patch, rtol=1e-5, atol=1e-5)
            outside = torch.ones(H, W, dtype=torch.bool)
            outside[y0 : y0 + h, x0 : x0 + w] = False
            assert torch.equal(out[v, i][:, outside], x[v, i][:, outside])


def _parity_cuda_full_size():
    """CUDA-only extra: full-size Triton parity on the GPU (collected only where CUDA exists)."""
    for shape in [(256, 3, 32, 32), (2, 64, 3, 224, 224), (2, 7, 1, 7, 11)]:
        for dtype in IMAGE_DTYPES:
            x, op, lam, boxes = _case(shape, dtype, 50)
            ref, ref_eff = bm.batch_mix_impl(x, op, lam, boxes, path="ref")
            dev = [t.cuda() for t in (x, op, lam, boxes)]
            out, eff = bm.batch_mix(*dev)
            assert torch.equal(out.cpu(), ref)
            assert torch.equal(eff.cpu(), ref_eff)


if torch.cuda.is_available():
    test_parity_cuda_full_size = _parity_cuda_full_size


# --------------------------------------------------------------------------------------
# The registered op: dispatch, opcheck, torch.compile, autograd
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["ref", "cpp", pytest.param("triton", marks=pytest.mark.triton)])
def test_forced_path_matches_direct_call(monkeypatch, mode):
    x, op, lam, boxes = _case((2, 5, 3, 7, 11), torch.float32, 60)
    monkeypatch.setenv(dispatch.ENV_MODE, mode)
    assert dispatch.select("batch_mix", x.device) == mode
    out, eff = bm.batch_mix(x, op, lam, boxes)
    direct, deff = bm.batch_mix_impl(x, op, lam, boxes, path=mode)
    assert torch.equal(out, direct) and torch.equal(eff, deff)


def test_auto_dispatch_uses_cpp_on_cpu(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_MODE, raising=False)
    assert dispatch.select("batch_mix", "cpu") == "cpp"


@pytest.mark.parametrize(
    "shape,dtype", [((3, 2, 5, 7), torch.float32), ((2, 4, 1, 6, 6), torch.float16), ((2, 3, 3, 5, 4), torch.uint8)]
)
def test_opcheck(shape, dtype):
    x, op, lam, boxes = _case(shape, dtype, 70)
    if x.dim() == 4:
        boxes = boxes[:1]
    torch.library.opcheck(torch.ops.batchkin.batch_mix.default, (x, op, lam, boxes))


def test_torch_compile_fullgraph():
    x, op, lam, boxes = _case((2, 6, 3, 8, 10), torch.float32, 80)

    def step(x, op, lam, boxes):
        mixed, lam_eff = bm.batch_mix(x, op, lam, boxes)
        return mixed * 2, lam_eff.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out, s = compiled(x, op, lam, boxes)
    ref, ref_eff = bm.batch_mix_impl(x, op, lam, boxes, path="ref")
    torch.testing.assert_close(out, ref * 2)
    torch.testing.assert_close(s, ref_eff.sum())


def test_not_differentiable():
    x, op, lam, boxes = _case((4, 1, 4, 4), torch.float32, 90)
    x.requires_grad_(True)
    out, _ = bm.batch_mix(x, op, lam, boxes[:1])
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


def test_public_api_conveniences():
    g = gen(91)
    x = torch.randn(6, 3, 8, 8, generator=g)
    p = bm.sample_mix_params(6, 8, 8, generator=g)
    out, lam_eff = bm.batch_mix(x, *p)
    assert lam_eff.shape == (1, 6)
    out2, lam_eff2 = bm.batch_mix(x, p.op, p.lam, p.boxes[0])  # [B, 4] boxes -> [B] lam_eff
    assert lam_eff2.shape == (6,) and torch.equal(out, out2) and torch.equal(lam_eff[0], lam_eff2)
    out3, _ = bm.batch_mix(x, "cutmix", p.lam, p.boxes)  # one operator by name
    out4, _ = bm.batch_mix(x, torch.full((6,), bm.CUTMIX, dtype=torch.int32), p.lam.double(), p.boxes.int())
    assert torch.equal(out3, out4)
    assert out.data_ptr() != x.data_ptr()
    assert bm.bytes_moved(x) == 2 * x.numel() * 4


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------


def _good():
    x, op, lam, boxes = _case((4, 3, 8, 8), torch.float32, 99)
    return x, op, lam, boxes[:1]


@pytest.mark.parametrize(
    "change,err,match",
    [
        (lambda a: a.update(x=torch.zeros(3, 8, 8)), ValueError, "x must have shape"),
        (lambda a: a.update(x=torch.zeros(1, 1, 4, 3, 8, 8)), ValueError, "x must have shape"),
        (lambda a: a.update(x=a["x"].double()), TypeError, "x must have dtype"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must have dtype"),
        (lambda a: a.update(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (lambda a: a.update(op=torch.tensor([0, 1, 3, 0])), ValueError, r"op\[2\] = 3"),
        (lambda a: a.update(op=torch.tensor([0, -1, 0, 0])), ValueError, r"op\[1\] = -1"),
        (lambda a: a.update(op="blend"), ValueError, "unknown operator"),
        (lambda a: a.update(op=torch.zeros(3, dtype=torch.long)), ValueError, "op must have shape"),
        (lambda a: a.update(op=torch.zeros(4)), TypeError, "op must have dtype"),
        (lambda a: a.update(lam=torch.tensor([0.5, 1.5, 0.5, 0.5])), ValueError, r"lam\[1\]"),
        (lambda a: a.update(lam=torch.tensor([0.5, 0.5, -0.1, 0.5])), ValueError, r"lam\[2\]"),
        (lambda a: a.update(lam=torch.tensor([0.5, 0.5, 0.5, float("nan")])), ValueError, r"lam\[3\]"),
        (lambda a: a.update(lam=torch.ones(4, dtype=torch.long)), TypeError, "lam must have dtype"),
        (lambda a: a.update(lam=torch.ones(5)), ValueError, "lam must have shape"),
        (lambda a: a.update(boxes=torch.tensor([[[0, 0, 4, 4]] * 3 + [[5, 0, 4, 4]]])), ValueError, r"boxes\[0, 3\]"),
        (lambda a: a.update(boxes=torch.tensor([[[0, 0, 4, 4], [0, 6, 2, 3]] * 2])), ValueError, r"boxes\[0, 1\].*inside"),
        (lambda a: a.update(boxes=torch.tensor([[[-1, 0, 4, 4]] * 4])), ValueError, r"boxes\[0, 0\]"),
        (lambda a: a.update(boxes=torch.tensor([[[0, 0, -1, 4]] * 4])), ValueError, r"boxes\[0, 0\]"),
        (lambda a: a.update(boxes=torch.zeros(2, 4, 4, dtype=torch.long)), ValueError, "boxes must have shape"),
        (lambda a: a.update(boxes=torch.zeros(1, 4, 3, dtype=torch.long)), ValueError, "boxes must have shape"),
        (lambda a: a.update(boxes=torch.zeros(1, 4, 4)), TypeError, "boxes must have dtype"),
        (lambda a: a.update(lam=torch.ones(4, device="meta")), ValueError, "lam is on meta"),
    ],
)
def test_bad_inputs(change, err, match):
    x, op, lam, boxes = _good()
    args = dict(x=x, op=op, lam=lam, boxes=boxes)
    change(args)
    with pytest.raises(err, match=match):
        bm.batch_mix(**args)


def test_bad_views_shapes():
    x = torch.zeros(2, 4, 3, 8, 8)
    op, lam = torch.zeros(4, dtype=torch.long), torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="boxes must have shape"):
        bm.batch_mix(x, op, lam, torch.zeros(4, 4, dtype=torch.long))  # [B, 4] only for 4-D x
    with pytest.raises(ValueError, match="boxes must have shape"):
        bm.batch_mix(x, op, lam, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        bm.batch_mix(torch.zeros(4, 3, 0, 8), op, lam, torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="path"):
        bm.batch_mix_impl(x, op, lam, torch.zeros(2, 4, 4, dtype=torch.long), path="fast")


def test_bad_values_are_caught_by_cpp_too():
    assert dispatch.load_cpp(bm.INFO)
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(RuntimeError, match="operator code"):
        torch.ops.batchkin._batch_mix_cpu(x, torch.tensor([0, 5]), torch.ones(2), torch.zeros(1, 2, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="not inside"):
        torch.ops.batchkin._batch_mix_cpu(x, torch.tensor([1, 1]), torch.ones(2), torch.tensor([[[0, 0, 5, 1], [0, 0, 1, 1]]]))



_AOT_SCRIPT = r"""
import batchkin.kernels.batch_mix.triton as bmk

sig = {"op_ptr": "*i64", "lam_ptr": "*fp32", "box_ptr": "*i64", "lam_eff_ptr": "*fp32",
       **{name: i32 for name in ("B", "C", "H", "W", "HW")}}
for dt in ("fp32", "fp16", "bf16", "u8"):
    ptrs = dict(sig, x_ptr="*" + dt, out_ptr="*" + dt)
    ptx = build(bmk._batch_mix_kernel, ptrs, {"IS_UINT8": dt == "u8", "BLOCK": 1024}, enable_fp_fusion=False)
    # separately rounded products and sums, as the reference and the C++ path compute them
    assert "fma.rn.f32" not in ptx and "div.rn.f32" in ptx, dt
print("compiled")
"""


@aot
def test_triton_kernel_compiles_for_cuda_without_fused_multiply_adds():
    compile_for_cuda(_AOT_SCRIPT)
