"""Tests of the reversed class sampler: probabilities, parity of the three paths,
slicing, distribution (chi-square), argument checks, opcheck and torch.compile."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from _util import DEVICES, aot, compile_for_cuda, gen, path_params
from scipy import stats

from batchkin.kernels import dispatch, rng
from batchkin.kernels import reversed_sampler as rs

PATHS = ("ref", "cpp", "triton")
CIFAR10_LT = [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT, imbalance 100


ALL_PATHS = path_params(*PATHS)


def _random_table(num_classes: int, max_count: int, seed: int):
    """A shuffled labelled dataset: (labels, sorted_indices, counts), every class non-empty."""
    g = gen(seed)
    counts = torch.randint(1, max_count + 1, (num_classes,), generator=g)
    labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    sorted_indices, counts2 = rs.class_sorted_table(labels, num_classes)
    assert torch.equal(counts, counts2)
    return labels, sorted_indices, counts


def _long_tail(num_classes: int, n_max: int, imbalance: float) -> torch.Tensor:
    c = torch.arange(num_classes, dtype=torch.float64)
    expo = c / max(num_classes - 1, 1)
    return torch.floor(n_max * (1.0 / imbalance) ** expo).to(torch.int64).clamp(min=1)


def _run(path, sorted_indices, counts, num_draws, *, seed, epoch, mode="reversed", weights=None, start=0, stop=None):
    tables = rs.prepare_tables(sorted_indices, counts, mode, weights)
    stop = num_draws if stop is None else stop
    return rs.reversed_sampler_impl(sorted_indices, *tables, rs.epoch_key(seed, epoch), start, stop, path=path)


# --------------------------------------------------------------------------- #
# Probabilities, cdf and the class table, worked by hand
# --------------------------------------------------------------------------- #


def test_probabilities_hand_worked_small():
    counts = [1, 2, 4]
    torch.testing.assert_close(
        rs.class_probabilities(counts, "reversed"), torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64)
    )
    torch.testing.assert_close(rs.class_probabilities(counts, "balanced"), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(
        rs.class_probabilities(counts, "instance"), torch.tensor([1 / 7, 2 / 7, 4 / 7], dtype=torch.float64)
    )
    # explicit weights override the mode and are normalised
    torch.testing.assert_close(
        rs.class_probabilities(counts, "balanced", weights=[2.0, 0.0, 6.0]),
        torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64),
    )


@pytest.mark.parametrize("mode", rs.MODES)
def test_probabilities_cifar10_lt_exact(mode):
    n = CIFAR10_LT
    if mode == "reversed":
        w = [Fraction(max(n), c) for c in n]
    elif mode == "balanced":
        w = [Fraction(1) for _ in n]
    else:
        w = [Fraction(c) for c in n]
    expected = torch.tensor([float(x / sum(w)) for x in w], dtype=torch.float64)
    p = rs.class_probabilities(torch.tensor(n), mode)
    assert p.dtype == torch.float64 and p.shape == (10,)
    torch.testing.assert_close(p, expected, rtol=1e-13, atol=0)
    assert abs(float(p.sum()) - 1.0) < 1e-14


def test_reversed_probabilities_worked_values():
    # P_c = (5000 / n_c) / sum_j (5000 / n_j); sum_j 1 / n_j = 0.04968...  (head 0.40% .. tail 40.2%)
    p = rs.class_probabilities(CIFAR10_LT)
    inv = sum(1.0 / c for c in CIFAR10_LT)
    assert abs(float(p[0]) - (1 / 5000) / inv) < 1e-15
    assert abs(float(p[-1]) - (1 / 50) / inv) < 1e-15
    assert float(p[-1] / p[0]) == pytest.approx(100.0, rel=1e-12)  # the imbalance factor, reversed


def test_class_cdf_edges():
    cdf = rs.class_cdf(torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    assert cdf.dtype == torch.float64
    assert float(cdf[-1]) == 1.0
    torch.testing.assert_close(cdf, torch.tensor([0.1, 0.3, 0.6, 1.0], dtype=torch.float64))
    # trailing zero-probability classes are exactly 1.0, leading ones exactly 0.0
    cdf = rs.class_cdf([0.0, 1.0, 2.0, 0.0, 0.0])
    assert cdf.tolist() == [0.0, 1 / 3, 1.0, 1.0, 1.0]
    # a thousand small probabilities whose float sum is not 1 still end at exactly 1.0
    p = rs.class_probabilities(_long_tail(1000, 1000, 100))
    cdf = rs.class_cdf(p)
    assert float(cdf[-1]) == 1.0 and bool((cdf[1:] >= cdf[:-1]).all())


def test_class_sorted_table_hand_worked():
    labels = torch.tensor([2, 0, 1, 0, 2, 2])
    sorted_indices, counts = rs.class_sorted_table(labels, 4)
    assert sorted_indices.tolist() == [1, 3, 2, 0, 4, 5]  # stable: dataset order within a class
    assert counts.tolist() == [2, 1, 3, 0]
    assert sorted_indices.dtype == torch.int64 and counts.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.int64])
def test_class_sorted_table_random(dtype):
    g = gen(3)
    labels = torch.randint(0, 37, (1001,), generator=g).to(dtype)
    sorted_indices, counts = rs.class_sorted_table(labels, 40)
    expected = [i for c in range(40) for i in range(1001) if int(labels[i]) == c]
    assert sorted_indices.tolist() == expected
    assert counts.tolist() == [int((labels == c).sum()) for c in range(40)]


# --------------------------------------------------------------------------- #
# Exact draws from given uniforms
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("path", ALL_PATHS)
def test_from_uniforms_hand_worked(path):
    sorted_indices = torch.arange(10, 17)
    counts = torch.tensor([1, 2, 4])  # class 0: [10], class 1: [11, 12], class 2: [13..16]
    cdf = rs.class_cdf([1.0, 1.0, 2.0])  # [0.25, 0.5, 1.0], exact in binary
    assert cdf.tolist() == [0.25, 0.5, 1.0]
    top = 1.0 - 2.0**-24
    u_class = torch.tensor([0.0, 0.25, 0.2499999, 0.5, 0.75, top], dtype=torch.float64)
    u_inst = torch.tensor([0.9, 0.5, 0.0, 0.25, 0.74, 0.9999999], dtype=torch.float64)
    # u_class == cdf[c] moves on to class c + 1 (cdf[c] <= u); instance floor(u * n_c)
    expected = [10, 12, 10, 14, 15, 16]
    offsets = torch.tensor([0, 1, 3])
    out = rs.reversed_sampler_from_uniforms_impl(sorted_indices, offsets, counts, cdf, u_class, u_inst, path=path)
    assert out.tolist() == expected
    if path == "cpp":  # and through the public function (auto dispatch)
        assert rs.sample_from_uniforms(sorted_indices, counts, cdf, u_class, u_inst).tolist() == expected


@pytest.mark.parametrize("path", ALL_PATHS)
def test_zero_probability_classes_never_drawn(path):
    sorted_indices = torch.tensor([10, 11, 12, 13])
    counts = torch.tensor([1, 1, 1, 1])
    offsets = torch.arange(4)
    top = 1.0 - 2.0**-24
    u = torch.tensor([0.0, 2.0**-24, 0.5, 0.7, top], dtype=torch.float64)
    for weights, only in (([0.0, 1.0, 0.0, 0.0], 11), ([1.0, 0.0, 0.0, 0.0], 10), ([0.0, 0.0, 0.0, 3.0], 13)):
        cdf = rs.class_cdf(weights)
        out = rs.reversed_sampler_from_uniforms_impl(sorted_indices, offsets, counts, cdf, u, u, path=path)
        assert out.tolist() == [only] * 5, weights
    # and a whole epoch with zero weights on some classes never hits them
    labels, si, cnt = _random_table(7, 9, seed=5)
    weights = [0.0, 2.0, 0.0, 1.0, 0.0, 0.0, 4.0]
    out = _run(path, si, cnt, 3000, seed=1, epoch=0, weights=weights)
    hit = set(labels[out].tolist())
    assert hit == {1, 3, 6}


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_from_uniforms_parity(path, dtype):
    labels, sorted_indices, counts = _random_table(13, 30, seed=11)
    tables = rs.prepare_tables(sorted_indices, counts, "reversed")
    g = gen(12)
    m = 1500
    u_class = torch.rand(m, generator=g, dtype=torch.float64)
    u_inst = torch.rand(m, generator=g, dtype=torch.float64)
    # adversarial values: exactly on every cdf edge, 0 and the largest value below 1
    edges = torch.cat([tables.cdf[:-1], torch.tensor([0.0, 1.0 - 2.0**-24], dtype=torch.float64)])
    u_class[: edges.numel()] = edges
    u_class, u_inst = u_class.to(dtype), u_inst.to(dtype)
    below_one = torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))
    u_class, u_inst = torch.minimum(u_class, below_one), torch.minimum(u_inst, below_one)
    expected = rs.reversed_sampler_from_uniforms_reference(sorted_indices, *tables, u_class, u_inst)
    out = rs.reversed_sampler_from_uniforms_impl(sorted_indices, *tables, u_class, u_inst, path=path)
    assert out.dtype == torch.int64 and torch.equal(out, expected)
    # the reference itself: class edges and instance ranges by a plain loop
    offsets = tables.offsets.tolist()
    cdf = tables.cdf.tolist()
    for j in range(0, m, 7):
        uc, ui = float(u_class[j]), float(u_inst[j])
        c = min(sum(1 for x in cdf if x <= uc), 12)
        k = min(int(ui * int(counts[c])), int(counts[c]) - 1)
        assert int(expected[j]) == int(sorted_indices[offsets[c] + k])


def test_public_from_uniforms_matches_sample_epoch():
    labels, sorted_indices, counts = _random_table(7, 40, seed=21)
    u_class, u_inst = rs.epoch_uniforms(5, 3, 0, 2500)
    cdf = rs.class_cdf(rs.class_probabilities(counts, "reversed"))
    a = rs.sample_from_uniforms(sorted_indices, counts, cdf, u_class, u_inst)
    b = rs.sample_epoch(sorted_indices, counts, 2500, seed=5, epoch=3)
    assert torch.equal(a, b)
    # the uniforms are rng's counter-based numbers at offsets 2i and 2i + 1
    key = rng.derive_key(5, 3)
    assert torch.equal(u_class, rng.uniform(key, torch.arange(0, 5000, 2)))
    assert torch.equal(u_inst, rng.uniform(key, torch.arange(1, 5000, 2)))


# --------------------------------------------------------------------------- #
# Parity of whole epochs and slices
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "num_classes,max_count,num_draws",
    [(1, 5, 777), (2, 3, 1025), (7, 50, 3001), (1000, 20, 2049)],
)
@pytest.mark.parametrize("mode", rs.MODES)
@pytest.mark.parametrize("path", path_params("cpp", "triton"))
def test_epoch_parity(path, mode, num_classes, max_count, num_draws):
    labels, sorted_indices, counts = _random_table(num_classes, max_count, seed=num_classes + 17)
    expected = _run("ref", sorted_indices, counts, num_draws, seed=123, epoch=4, mode=mode)
    out = _run(path, sorted_indices, counts, num_draws, seed=123, epoch=4, mode=mode)
    assert out.shape == (num_draws,) and out.dtype == torch.int64
    assert torch.equal(out, expected)
    # every index is a member of the dataset
    assert int(out.min()) >= 0 and int(out.max()) < labels.numel()


@pytest.mark.parametrize(
    "num_classes,n_max,imbalance,num_draws",
    [(1000, 1000, 100, 1_000_000), (8142, 1000, 500, 1_000_000), (3, 7, 2, 100_003), (64, 5, 5, 12_345)],
)
def test_epoch_parity_full_size_cpp(num_classes, n_max, imbalance, num_draws):
    counts = _long_tail(num_classes, n_max, imbalance)
    sorted_indices = torch.randperm(int(counts.sum()), generator=gen(num_classes))
    expected = _run("ref", sorted_indices, counts, num_draws, seed=2024, epoch=1)
    assert torch.equal(_run("cpp", sorted_indices, counts, num_draws, seed=2024, epoch=1), expected)
    # and through the public op (auto dispatch: the C++ path on CPU)
    assert torch.equal(rs.sample_epoch(sorted_indices, counts, num_draws, seed=2024, epoch=1), expected)


def test_cpp_independent_of_thread_count(torch_threads):
    counts = _long_tail(500, 200, 50)
    sorted_indices = torch.randperm(int(counts.sum()), generator=gen(0))
    with torch_threads(1):
        one = _run("cpp", sorted_indices, counts, 200_001, seed=9, epoch=9)
    with torch_threads(2):
        two = _run("cpp", sorted_indices, counts, 200_001, seed=9, epoch=9)
    assert torch.equal(one, two)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_slices_equal_the_whole(path):
    labels, sorted_indices, counts = _random_table(1000, 6, seed=31)
    num_draws = 4099
    whole = _run(path, sorted_indices, counts, num_draws, seed=77, epoch=2)
    cuts = [0, 1, 37, 1024, 1500, 3000, 4098, num_draws]
    parts = [
        _run(path, sorted_indices, counts, num_draws, seed=77, epoch=2, start=a, stop=b)
        for a, b in zip(cuts, cuts[1:])
    ]
    assert torch.equal(torch.cat(parts), whole)
    empty = _run(path, sorted_indices, counts, num_draws, seed=77, epoch=2, start=5, stop=5)
    assert empty.shape == (0,) and empty.dtype == torch.int64
    # rank-style shards of the public op
    if path == "cpp":
        bounds = [(r * 1025, min((r + 1) * 1025, num_draws)) for r in range(4)]
        shards = [
            rs.sample_epoch(sorted_indices, counts, num_draws, seed=77, epoch=2, start=a, stop=b) for a, b in bounds
        ]
        assert torch.equal(torch.cat(shards), whole)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_counter_edge_near_max_draws(path):
    # the last draws of the longest epoch use offsets up to 2**32 - 1
    labels, sorted_indices, counts = _random_table(9, 10, seed=41)
    stop = rs.MAX_DRAWS
    start = stop - 1030
    out = _run(path, sorted_indices, counts, stop, seed=-3, epoch=0, start=start, stop=stop)
    expected = _run("ref", sorted_indices, counts, stop, seed=-3, epoch=0, start=start, stop=stop)
    assert torch.equal(out, expected)
    # the same draws from uniforms computed by rng.py at offsets up to 2**32 - 1
    u_class, u_inst = rs.epoch_uniforms(-3, 0, start, stop)
    cdf = rs.class_cdf(rs.class_probabilities(counts))
    assert torch.equal(rs.sample_from_uniforms(sorted_indices, counts, cdf, u_class, u_inst), expected)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_epochs_and_seeds_differ_and_repeat(path):
    counts = _long_tail(20, 40, 4)  # 40 .. 10 samples per class
    sorted_indices = torch.randperm(int(counts.sum()), generator=gen(51))
    for mode in rs.MODES:
        a = _run(path, sorted_indices, counts, 2000, seed=1, epoch=0, mode=mode)
        assert torch.equal(a, _run(path, sorted_indices, counts, 2000, seed=1, epoch=0, mode=mode))
        b = _run(path, sorted_indices, counts, 2000, seed=1, epoch=1, mode=mode)
        c = _run(path, sorted_indices, counts, 2000, seed=2, epoch=0, mode=mode)
        # independent draws agree by chance with probability sum_c P_c**2 / n_c per position
        probs = rs.class_probabilities(counts, mode)
        collide = float((probs**2 / counts).sum())
        assert collide < 0.05
        assert float((a == b).double().mean()) < 2 * collide + 0.01
        assert float((a == c).double().mean()) < 2 * collide + 0.01


def test_global_rng_untouched():
    labels, sorted_indices, counts = _random_table(10, 10, seed=61)
    state = torch.get_rng_state()
    rs.sample_epoch(sorted_indices, counts, 1000, seed=0, epoch=0)
    rs.sample_epoch(sorted_indices, counts, 1000, seed=0, epoch=0, mode="balanced")
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("forced", ALL_PATHS)
def test_forced_path_env(forced, monkeypatch):
    labels, sorted_indices, counts = _random_table(7, 12, seed=71)
    expected = _run("ref", sorted_indices, counts, 1234, seed=8, epoch=8, mode="balanced")
    monkeypatch.setenv(dispatch.ENV_MODE, forced)
    assert dispatch.select("reversed_sampler", "cpu") == forced
    out = rs.sample_epoch(sorted_indices, counts, 1234, seed=8, epoch=8, mode="balanced")
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- #
# Distribution: chi-square of class frequencies and of instances within a class
# --------------------------------------------------------------------------- #


def _class_chisquare(labels, out, probs):
    num_classes = probs.numel()
    observed = torch.bincount(labels[out], minlength=num_classes).double()
    expected = probs * out.numel()
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("mode", rs.MODES)
def test_class_frequencies_chisquare(path, mode):
    counts = torch.tensor([60, 31, 17, 9, 5, 3, 2])
    labels = torch.repeat_interleave(torch.arange(7), counts)
    labels = labels[torch.randperm(labels.numel(), generator=gen(81))]
    sorted_indices, _ = rs.class_sorted_table(labels, 7)
    seed = 1000 + 10 * rs.MODES.index(mode) + PATHS.index(path)
    out = _run(path, sorted_indices, counts, 20_000, seed=seed, epoch=3, mode=mode)
    probs = rs.class_probabilities(counts, mode)
    assert _class_chisquare(labels, out, probs) > 1e-3


@pytest.mark.parametrize("path", ["ref", "cpp"])
@pytest.mark.parametrize("mode", rs.MODES)
def test_class_frequencies_chisquare_1000_classes(path, mode):
    counts = _long_tail(1000, 500, 100)
    labels = torch.repeat_interleave(torch.arange(1000), counts)
    labels = labels[torch.randperm(labels.numel(), generator=gen(82))]
    sorted_indices, _ = rs.class_sorted_table(labels, 1000)
    seed = 2100 + 10 * rs.MODES.index(mode) + PATHS.index(path)
    out = _run(path, sorted_indices, counts, 1_000_000, seed=seed, epoch=0, mode=mode)
    probs = rs.class_probabilities(counts, mode)
    assert float((probs * 1_000_000).min()) > 5  # chi-square's approximation holds
    assert _class_chisquare(labels, out, probs) > 1e-3


def test_chisquare_detects_the_wrong_distribution():
    # the same statistic rejects a sample of one mode tested against another mode
    counts = torch.tensor([60, 31, 17, 9, 5, 3, 2])
    labels = torch.repeat_interleave(torch.arange(7), counts)
    sorted_indices, _ = rs.class_sorted_table(labels, 7)
    out = _run("cpp", sorted_indices, counts, 20_000, seed=1, epoch=0, mode="reversed")
    assert _class_chisquare(labels, out, rs.class_probabilities(counts, "reversed")) > 1e-3
    assert _class_chisquare(labels, out, rs.class_probabilities(counts, "balanced")) < 1e-12
    # a head class 1.5x too likely (about 400 expected draws instead of 266) is caught too
    skewed = rs.class_probabilities(counts, "reversed") * torch.tensor([1.5, 1, 1, 1, 1, 1, 1], dtype=torch.float64)
    assert _class_chisquare(labels, out, skewed / skewed.sum()) < 1e-3


@pytest.mark.parametrize("path", ALL_PATHS)
def test_instances_uniform_within_class(path):
    counts = torch.tensor([400, 53, 3, 80])
    labels = torch.repeat_interleave(torch.arange(4), counts)
    labels = labels[torch.randperm(labels.numel(), generator=gen(91))]
    sorted_indices, _ = rs.class_sorted_table(labels, 4)
    out = _run(path, sorted_indices, counts, 20_000, seed=300 + PATHS.index(path), epoch=1, mode="balanced")
    for cls in (1, 2):  # an odd count and a tiny one
        members = sorted_indices[int(counts[:cls].sum()) : int(counts[: cls + 1].sum())]
        hits = out[labels[out] == cls]
        assert hits.numel() > 4000
        position = torch.searchsorted(members.sort().values, hits)
        observed = torch.bincount(position, minlength=members.numel()).double()
        assert observed.numel() == members.numel()
        pvalue = stats.chisquare(observed.numpy()).pvalue
        assert pvalue > 1e-3, (cls, pvalue)


# --------------------------------------------------------------------------- #
# Bad inputs
# --------------------------------------------------------------------------- #


def _table():
    return torch.arange(6), torch.tensor([1, 2, 3])


@pytest.mark.parametrize(
    "counts,match",
    [
        (torch.tensor([2, 0, 4]), r"counts\[1\] is 0: class 1 is empty"),
        (torch.tensor([3, 4, -1]), r"counts\[2\] is -1"),
        ([3, 0, 3], r"counts\[1\] is 0"),
        (torch.tensor([], dtype=torch.int64), "counts must have at least 1"),
    ],
)
def test_bad_counts(counts, match):
    with pytest.raises(ValueError, match=match):
        rs.class_probabilities(counts)
    with pytest.raises(ValueError, match=match):
        rs.sample_epoch(torch.arange(6), counts, 10, seed=0, epoch=0)


@pytest.mark.parametrize(
    "weights,exc,match",
    [
        ([0.0, 0.0, 0.0], ValueError, "weights are all 0"),
        (torch.zeros(3), ValueError, "weights are all 0"),
        ([1.0, -0.5, 1.0], ValueError, r"weights\[1\] is -0.5"),
        ([1.0, float("nan"), 1.0], ValueError, "weights must be finite"),
        ([1.0, float("inf"), 1.0], ValueError, "weights must be finite"),
        ([1.0, 1.0], ValueError, r"weights must have one entry per class \(3\)"),
        (torch.ones(3, 1), ValueError, "weights must have 1 dimensions"),
        (["a", 1.0, 1.0], TypeError, r"weights\[0\] must be a number"),
        ("abc", TypeError, "weights must be a 1-D tensor"),
    ],
)
def test_bad_weights(weights, exc, match):
    si, counts = _table()
    with pytest.raises(exc, match=match):
        rs.class_probabilities(counts, weights=weights)
    with pytest.raises(exc, match=match):
        rs.sample_epoch(si, counts, 10, seed=0, epoch=0, weights=weights)


def test_bad_mode():
    si, counts = _table()
    with pytest.raises(ValueError, match="mode must be one of reversed, balanced, instance; got 'reverse'"):
        rs.sample_epoch(si, counts, 10, seed=0, epoch=0, mode="reverse")
    with pytest.raises(TypeError, match="mode must be a str"):
        rs.class_probabilities(counts, mode=1)


def test_bad_tables():
    si, counts = _table()
    with pytest.raises(TypeError, match="sorted_indices must have dtype int64"):
        rs.sample_epoch(si.float(), counts, 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="sorted_indices must have 1 dimensions"):
        rs.sample_epoch(si.view(2, 3), counts, 10, seed=0, epoch=0)
    with pytest.raises(TypeError, match="sorted_indices must be a torch.Tensor"):
        rs.sample_epoch([0, 1, 2], counts, 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="counts sum to 6 but sorted_indices has 5 entries"):
        rs.sample_epoch(si[:5], counts, 10, seed=0, epoch=0)
    with pytest.raises(TypeError, match="counts must have dtype int32, int64"):
        rs.sample_epoch(si, counts.float(), 10, seed=0, epoch=0)
    with pytest.raises(TypeError, match=r"counts\[1\] must be an int"):
        rs.sample_epoch(si, [1, 2.0, 3], 10, seed=0, epoch=0)
    with pytest.raises(ValueError, match="counts is on meta"):
        rs.sample_epoch(si, counts.to("meta"), 10, seed=0, epoch=0)


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(num_draws=-1), ValueError, "num_draws must be >= 0"),
        (dict(num_draws=2**31), ValueError, "num_draws must be <= 2147483647"),
        (dict(num_draws=10.0), TypeError, "num_draws must be an int"),
        (dict(num_draws=True), TypeError, "num_draws must be an int"),
        (dict(seed=1.5), TypeError, "seed must be an int"),
        (dict(seed=None), TypeError, "seed must be an int"),
        (dict(epoch=-1), ValueError, "epoch must be >= 0"),
        (dict(start=11), ValueError, "start must be <= 10"),
        (dict(start=-1), ValueError, "start must be >= 0"),
        (dict(start=5, stop=4), ValueError, "stop must be >= 5"),
        (dict(stop=11), ValueError, "stop must be <= 10"),
    ],
)
def test_bad_scalars(kwargs, exc, match):
    si, counts = _table()
    args = dict(num_draws=10, seed=0, epoch=0) | kwargs
    num_draws = args.pop("num_draws")
    with pytest.raises(exc, match=match):
        rs.sample_epoch(si, counts, num_draws, **args)


def test_bad_from_uniforms():
    si, counts = _table()
    cdf = rs.class_cdf([1.0, 2.0, 3.0])
    u = torch.rand(5, generator=gen(0))
    with pytest.raises(ValueError, match="cdf must end at exactly 1.0"):
        rs.sample_from_uniforms(si, counts, cdf * 0.5, u, u)
    with pytest.raises(ValueError, match="cdf must be non-decreasing"):
        rs.sample_from_uniforms(si, counts, torch.tensor([0.5, 0.25, 1.0], dtype=torch.float64), u, u)
    with pytest.raises(ValueError, match=r"cdf must hold finite values in \[0, 1\]"):
        rs.sample_from_uniforms(si, counts, torch.tensor([-0.5, 0.25, 1.0], dtype=torch.float64), u, u)
    with pytest.raises(ValueError, match=r"cdf must have shape \[3\]"):
        rs.sample_from_uniforms(si, counts, cdf[:2], u, u)
    with pytest.raises(TypeError, match="cdf must have dtype"):
        rs.sample_from_uniforms(si, counts, torch.tensor([0, 0, 1]), u, u)
    with pytest.raises(ValueError, match=r"u_class must hold values in \[0, 1\)"):
        rs.sample_from_uniforms(si, counts, cdf, torch.ones(5), u)
    with pytest.raises(ValueError, match=r"u_inst must hold values in \[0, 1\)"):
        rs.sample_from_uniforms(si, counts, cdf, u, -u - 0.1)
    with pytest.raises(ValueError, match=r"u_inst must hold values in \[0, 1\)"):
        rs.sample_from_uniforms(si, counts, cdf, u, torch.full((5,), float("nan")))
    with pytest.raises(ValueError, match=r"u_inst must have shape \[5\]"):
        rs.sample_from_uniforms(si, counts, cdf, u, u[:4])
    with pytest.raises(TypeError, match="u_class must have dtype"):
        rs.sample_from_uniforms(si, counts, cdf, torch.zeros(5, dtype=torch.int64), u)
    with pytest.raises(ValueError, match="u_class is on meta"):
        rs.sample_from_uniforms(si, counts, cdf, u.to("meta"), u)


def test_bad_class_table_args():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\); got values in \[0, 3\]"):
        rs.class_sorted_table(torch.tensor([0, 3, 1]), 3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\); got values in \[-1, 1\]"):
        rs.class_sorted_table(torch.tensor([0, -1, 1]), 3)
    with pytest.raises(TypeError, match="labels must have dtype"):
        rs.class_sorted_table(torch.tensor([0.0, 1.0]), 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        rs.class_sorted_table(torch.tensor([0, 0]), 0)
    with pytest.raises(ValueError, match="labels must have at least 1"):
        rs.class_sorted_table(torch.tensor([], dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="probabilities are all 0"):
        rs.class_cdf([0.0, 0.0])
    with pytest.raises(ValueError, match="path must be one of ref, cpp, triton"):
        rs.reversed_sampler_impl(*_table(), None, None, 0, 0, 1, path="cuda")


# --------------------------------------------------------------------------- #
# The registered ops: opcheck, torch.compile
# --------------------------------------------------------------------------- #


def _op_args(num_draws=777, start=3):
    labels, sorted_indices, counts = _random_table(11, 20, seed=101)
    tables = rs.prepare_tables(sorted_indices, counts, "reversed")
    return sorted_indices, tables, rs.epoch_key(4, 2), start, num_draws


def test_opcheck_epoch_op():
    sorted_indices, tables, key, start, stop = _op_args()
    torch.library.opcheck(torch.ops.batchkin.reversed_sampler.default, (sorted_indices, *tables, key, start, stop))
    torch.library.opcheck(torch.ops.batchkin.reversed_sampler.default, (sorted_indices, *tables, key, 5, 5))


def test_opcheck_uniforms_op():
    sorted_indices, tables, key, start, stop = _op_args()
    u_class, u_inst = rs.epoch_uniforms(4, 2, start, stop)
    torch.library.opcheck(
        torch.ops.batchkin.reversed_sampler_from_uniforms.default,
        (sorted_indices, *tables, u_class.double(), u_inst.double()),
    )


def test_torch_compile_fullgraph():
    sorted_indices, tables, key, start, stop = _op_args()
    u_class, u_inst = rs.epoch_uniforms(4, 2, start, stop)

    def step(si, offsets, counts, cdf, uc, ui):
        a = torch.ops.batchkin.reversed_sampler(si, offsets, counts, cdf, key, start, stop)
        b = torch.ops.batchkin.reversed_sampler_from_uniforms(si, offsets, counts, cdf, uc, ui)
        return a, b, (a == b).all()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b, same = compiled(sorted_indices, *tables, u_class.double(), u_inst.double())
    expected = rs.sample_epoch(sorted_indices, tables.counts, stop, seed=4, epoch=2, start=start)
    assert torch.equal(a, expected) and torch.equal(b, expected) and bool(same)


def test_not_differentiable():
    # integer indices carry no gradient, even when the cdf is a leaf that requires grad
    sorted_indices, tables, key, start, stop = _op_args()
    cdf = tables.cdf.clone().requires_grad_()
    out = torch.ops.batchkin.reversed_sampler(sorted_indices, tables.offsets, tables.counts, cdf, key, start, stop)
    assert out.dtype == torch.int64 and not out.requires_grad
    assert torch.equal(out, torch.ops.batchkin.reversed_sampler(sorted_indices, *tables, key, start, stop))


def test_one_public_name_each():
    """The op's Python handle is ``reversed_sampler_op``; the package's old handle names
    still resolve to the ops, with a DeprecationWarning."""
    sorted_indices, tables, key, start, stop = _op_args()
    out = rs.reversed_sampler_op(sorted_indices, *tables, key, start, stop)
    assert torch.equal(out, torch.ops.batchkin.reversed_sampler(sorted_indices, *tables, key, start, stop))
    with pytest.warns(DeprecationWarning, match="reversed_sampler_op"):
        assert rs.reversed_sampler is rs.reversed_sampler_op
    with pytest.warns(DeprecationWarning, match="reversed_sampler_from_uniforms_op"):
        assert rs.reversed_sampler_from_uniforms is rs.reversed_sampler_from_uniforms_op
    with pytest.raises(AttributeError):
        rs.no_such_name


# --------------------------------------------------------------------------- #
# Full size on every device present (CPU: the C++ op; CUDA, when present: the Triton op)
# --------------------------------------------------------------------------- #

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_classes,n_max,imbalance", [(1000, 1000, 100), (8142, 1000, 500)])
@pytest.mark.parametrize("mode", rs.MODES)
def test_device_full_size_equals_reference(device, num_classes, n_max, imbalance, mode):
    counts = _long_tail(num_classes, n_max, imbalance)
    sorted_indices = torch.randperm(int(counts.sum()), generator=gen(num_classes))
    expected = _run("ref", sorted_indices, counts, 1_000_003, seed=6, epoch=5, mode=mode)
    si = sorted_indices.to(device)
    out = rs.sample_epoch(si, counts.to(device), 1_000_003, seed=6, epoch=5, mode=mode)
    assert out.device == si.device and torch.equal(out.cpu(), expected)
    part = rs.sample_epoch(si, counts, 1_000_003, seed=6, epoch=5, mode=mode, start=999, stop=500_001)
    assert torch.equal(part.cpu(), expected[999:500_001])


_AOT_SCRIPT = r"""
import batchkin.kernels.reversed_sampler.triton as rsk

tables = {"out_ptr": "*i64", "idx_ptr": "*i64", "off_ptr": "*i64", "cnt_ptr": "*i64", "cdf_ptr": "*fp64",
          "C": i32, "n_iter": i32, "key": "u32", "start": i64, "n": i32}
build(rsk._sampler_kernel, dict(tables, uc_ptr="*i64", ui_ptr="*i64"), {"BLOCK": 1024, "FROM_UNIFORMS": False})
build(rsk._sampler_kernel, dict(tables, uc_ptr="*fp64", ui_ptr="*fp64"), {"BLOCK": 1024, "FROM_UNIFORMS": True})
print("compiled")
"""


@aot
def test_triton_kernel_compiles_for_cuda():
    compile_for_cuda(_AOT_SCRIPT)
