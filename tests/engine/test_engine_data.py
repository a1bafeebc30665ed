"""Datasets, splits, long-tailed / few-shot subsets, augmentation and the default sampler."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from batchkin.config import DataConfig
from batchkin.data import (
    ImageDataset,
    ShuffleSampler,
    load_digits,
    load_synthetic,
    long_tail_counts,
    make_splits,
    random_crop_flip,
    read_idx,
)
from batchkin.errors import ConfigError, DataError

# ------------------------------------------------------------------------------ long-tail profile


def test_long_tail_counts_cifar_profile():
    counts = long_tail_counts(5000, 10, 100)
    assert counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert sum(counts) == 12406


def test_long_tail_counts_if_one_keeps_every_class_full():
    assert long_tail_counts(123, 7, 1) == [123] * 7
    assert long_tail_counts(123, 7, 1.0) == [123] * 7
    assert long_tail_counts(40, 1, 10) == [40]


@pytest.mark.parametrize("num_classes", [2, 10])
def test_long_tail_tail_class_keeps_n_max_over_if(num_classes):
    # n_c = n_max * IF ** (-c / (C - 1)) is exactly n_max / IF for the last class; the count
    # must not lose an image to floating-point rounding (49 * 49 ** -1 == 0.9999999999999999)
    for n_max in range(1, 400):
        assert long_tail_counts(n_max, num_classes, float(n_max))[-1] == 1, n_max
        if n_max % 4 == 0:
            assert long_tail_counts(n_max, num_classes, n_max / 4)[-1] == 4, n_max
    assert long_tail_counts(100, 3, 100) == [100, 10, 1]


@pytest.mark.parametrize(
    "n_max, num_classes, imbalance",
    [
        (100, 10, 0.5),  # IF < 1
        (100, 10, 0.0),
        (100, 10, -3),
        (100, 0, 10),  # no classes
        (100, 2.5, 10),  # fractional number of classes
        (100, 10, float("nan")),
        (100, 10, float("inf")),
        (0, 10, 10),  # n_max < 1
        (100, True, 10),  # a bool is not a class count
    ],
)
def test_long_tail_counts_rejects_impossible_values(n_max, num_classes, imbalance):
    with pytest.raises(ConfigError):
        long_tail_counts(n_max, num_classes, imbalance)


# ------------------------------------------------------------------------------ splits


@pytest.fixture(scope="module")
def digits():
    return load_digits(None)


def _index_coded(ds: ImageDataset) -> ImageDataset:
    """The same labels, with each image encoding its own index (to trace it through the splits)."""
    n = len(ds.y)
    idx = torch.arange(n)
    x = torch.stack([idx % 256, idx // 256], 1).to(torch.uint8).view(n, 1, 1, 2)
    return ImageDataset(x, ds.y.clone(), list(ds.classes), name="coded")


def _decode(x: torch.Tensor) -> set[int]:
    flat = x.view(len(x), 2).long()
    return set((flat[:, 0] + 256 * flat[:, 1]).tolist())


def test_digits_loader(digits):
    assert digits.x.shape == (1797, 1, 8, 8)
    assert digits.x.dtype == torch.uint8
    assert digits.y.dtype == torch.int64
    assert digits.classes == [str(i) for i in range(10)]
    assert sorted(set(digits.y.tolist())) == list(range(10))
    assert int(digits.x.max()) == 255 and int(digits.x.min()) == 0
    assert digits.test_x is None


def test_long_tailed_split_follows_the_profile(digits):
    imbalance = 10.0
    full = make_splits(digits, DataConfig())
    lt = make_splits(digits, DataConfig(imbalance_factor=imbalance))
    available = full.train_counts().tolist()
    n_max = max(available)
    expected = [min(p, a) for p, a in zip(long_tail_counts(n_max, 10, imbalance), available)]
    counts = lt.train_counts().tolist()
    assert counts == expected
    assert counts[0] == max(counts)
    assert counts == sorted(counts, reverse=True)
    assert counts[-1] == int(n_max / imbalance)
    # validation is held out before subsetting: identical to the full run's, balanced
    assert torch.equal(lt.val.x, full.val.x) and torch.equal(lt.val.y, full.val.y)
    val_counts = torch.bincount(lt.val.y, minlength=10).tolist()
    assert min(val_counts) >= 1 and max(val_counts) - min(val_counts) <= 2
    assert torch.equal(lt.test.y, full.test.y)


def test_splits_are_disjoint_and_cover_the_data(digits):
    coded = _index_coded(digits)
    s = make_splits(coded, DataConfig(imbalance_factor=5.0))
    train, val, test = _decode(s.train.x), _decode(s.val.x), _decode(s.test.x)
    assert len(train) == len(s.train) and len(val) == len(s.val) and len(test) == len(s.test)
    assert not train & val and not train & test and not val & test
    full = make_splits(coded, DataConfig())
    assert _decode(full.train.x) | _decode(full.val.x) | _decode(full.test.x) == set(range(1797))
    assert train <= _decode(full.train.x)
    # the labels travel with their images
    for split in (s.train, s.val, s.test):
        ids = (split.x.view(len(split.x), 2).long() * torch.tensor([1, 256])).sum(1)
        assert torch.equal(split.y, digits.y[ids])


def test_imbalance_factor_beyond_n_max_is_an_error(digits):
    n_max = max(make_splits(digits, DataConfig()).train_counts().tolist())
    first_empty = long_tail_counts(n_max, 10, 1000.0).index(0)
    with pytest.raises(DataError) as info:
        make_splits(digits, DataConfig(imbalance_factor=1000.0))
    message = str(info.value)
    assert f"data.imbalance_factor = 1000.0 leaves class {first_empty} with no training images" in message
    assert f"use an imbalance factor <= {n_max}" in message
    # the advice holds: the largest suggested factor works and keeps one image of the last class
    s = make_splits(digits, DataConfig(imbalance_factor=float(n_max)))
    assert s.train_counts().tolist()[-1] == 1


def test_few_shot_keeps_exactly_k_per_class(digits):
    s = make_splits(digits, DataConfig(few_shot=7))
    assert s.train_counts().tolist() == [7] * 10
    with pytest.raises(DataError, match="few_shot"):
        make_splits(digits, DataConfig(few_shot=1000))


@pytest.mark.parametrize("size", [100, 37, 501])
def test_train_size_keeps_exactly_that_many_images(digits, size):
    available = make_splits(digits, DataConfig()).train_counts().double()
    s = make_splits(digits, DataConfig(train_size=size))
    assert len(s.train) == size
    share = available * size / available.sum()  # stratified: each class keeps its share, to within one image
    assert bool(((s.train_counts() - share).abs() < 1).all()), (s.train_counts().tolist(), share.tolist())


def test_train_size_on_top_of_few_shot_is_exact(digits):
    s = make_splits(digits, DataConfig(few_shot=5, train_size=23))
    assert len(s.train) == 23


def test_train_size_beyond_the_data_is_an_error(digits):
    with pytest.raises(DataError, match="train_size"):
        make_splits(digits, DataConfig(train_size=5000))


def test_subsets_depend_only_on_split_seed(digits):
    coded = _index_coded(digits)
    a = make_splits(coded, DataConfig(imbalance_factor=10.0, split_seed=3))
    b = make_splits(coded, DataConfig(imbalance_factor=10.0, split_seed=3))
    c = make_splits(coded, DataConfig(imbalance_factor=10.0, split_seed=4))
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x)
    assert a.train_counts().tolist() == c.train_counts().tolist()
    assert _decode(a.train.x) != _decode(c.train.x)
    assert _decode(a.val.x) != _decode(c.val.x)
    assert _decode(a.test.x) != _decode(c.test.x)


def test_make_splits_leaves_the_global_rng_alone(digits):
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    make_splits(digits, DataConfig(imbalance_factor=10.0))
    make_splits(digits, DataConfig(few_shot=3, train_size=20))
    assert torch.equal(torch.get_rng_state(), before)


def test_normalisation_statistics_come_from_the_training_split(digits):
    s = make_splits(digits, DataConfig(few_shot=10))
    xf = s.train.x.float() / 255
    assert s.mean == pytest.approx([float(xf.mean())], rel=1e-5)
    assert s.std == pytest.approx([float(xf.std())], rel=1e-5)


# ------------------------------------------------------------------------------ file formats


def _idx_bytes(code: int, shape: tuple, payload: bytes) -> bytes:
    return struct.pack(f">BBBB{len(shape)}I", 0, 0, code, len(shape), *shape) + payload


def test_read_idx_parses_a_hand_written_file(tmp_path):
    path = tmp_path / "images-idx3-ubyte"
    path.write_bytes(_idx_bytes(0x08, (2, 2, 3), bytes(range(12))))
    arr = read_idx(path)
    assert arr.dtype == np.uint8 and arr.shape == (2, 2, 3)
    assert arr.tolist() == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]


def test_read_idx_big_endian_types_and_gzip(tmp_path):
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(_idx_bytes(0x0B, (3,), struct.pack(">3h", -2, 300, 7))))
    arr = read_idx(path)
    assert arr.shape == (3,) and arr.tolist() == [-2, 300, 7]


@pytest.mark.parametrize(
    "raw, fragment",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"ab", "bad magic"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "incomplete header"),
        (_idx_bytes(0x08, (4,), b"abc"), "truncated"),
        (_idx_bytes(0x08, (4,), b"abcde"), "truncated"),
        (_idx_bytes(0x42, (1,), b"a"), "type code"),
    ],
)
def test_read_idx_rejects_corrupt_files(tmp_path, raw, fragment):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DataError, match=fragment):
        read_idx(path)


def test_synthetic_set_shape_and_balance():
    ds = load_synthetic(DataConfig(synthetic_classes=5, synthetic_per_class=9, synthetic_shape=[2, 4, 6]))
    assert ds.x.shape == (45, 2, 4, 6) and ds.x.dtype == torch.uint8
    assert torch.bincount(ds.y).tolist() == [9] * 5
    again = load_synthetic(DataConfig(synthetic_classes=5, synthetic_per_class=9, synthetic_shape=[2, 4, 6]))
    assert torch.equal(ds.x, again.x)


def test_builtin_datasets_take_no_options_and_their_loaders_get_the_data_table():
    """Built-in datasets register without options: the registry calls their loader with
    the [data] table exactly as before, and refuses any [data] key beyond the engine's."""
    from batchkin.data import BUILTIN_DATASETS
    from batchkin.plugin import Plugins

    plugins = Plugins(autoload=False)
    for name, loader in BUILTIN_DATASETS.items():
        entry = plugins.dataset(name)
        assert entry.options is None and entry.origin == "builtin" and entry.obj.loader is loader
    cfg = DataConfig(name="synthetic", synthetic_classes=3, synthetic_per_class=5)
    ds = plugins.dataset("synthetic").obj(cfg)
    assert torch.equal(ds.x, load_synthetic(cfg).x) and cfg.options == {}
    cfg.options = {"path": "x.npz"}
    with pytest.raises(ConfigError, match=r"^unknown config key data\.path; valid \[data\] keys for "
                                          r"data\.name = 'synthetic': the engine's name, root, "):
        plugins.dataset("synthetic").obj(cfg)


def test_synthetic_set_is_learnable(tmp_path, tiny):
    from batchkin.trainer import fit

    raw = tiny(
        epochs=5,
        data={"synthetic_classes": 4, "synthetic_per_class": 48, "synthetic_shape": [3, 8, 8], "batch_size": 16,
              "val_fraction": 0.1, "test_fraction": 0.2},
        model={"width": 8},
    )
    result = fit(raw, tmp_path / "run", progress=False)
    assert result.final["test/top1"] >= 0.8  # chance is 0.25


# ------------------------------------------------------------------------------ augmentation


def test_crop_without_padding_or_flip_is_the_identity():
    x = torch.randint(0, 256, (5, 3, 4, 7), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(random_crop_flip(x, 0, False, gen), x)


def test_crop_is_deterministic_given_the_generator():
    x = torch.randint(0, 256, (16, 3, 6, 6), dtype=torch.uint8)
    a = random_crop_flip(x, 2, True, torch.Generator().manual_seed(5))
    b = random_crop_flip(x, 2, True, torch.Generator().manual_seed(5))
    c = random_crop_flip(x, 2, True, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("hflip", [False, True])
def test_every_crop_is_a_window_of_the_padded_image(hflip):
    b, c, h, w, pad = 400, 2, 3, 4, 2
    image = torch.arange(1, c * h * w + 1, dtype=torch.uint8).view(1, c, h, w)
    x = image.expand(b, c, h, w).contiguous()
    padded = torch.nn.functional.pad(image[0], (pad, pad, pad, pad))
    windows = {
        (dy, dx): padded[:, dy : dy + h, dx : dx + w]
        for dy in range(2 * pad + 1)
        for dx in range(2 * pad + 1)
    }
    out = random_crop_flip(x, pad, hflip, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.uint8
    seen = set()
    for crop in out:
        matches = [(k, False) for k, win in windows.items() if torch.equal(crop, win)]
        if hflip:
            matches += [(k, True) for k, win in windows.items() if torch.equal(crop, win.flip(-1))]
        assert len(matches) == 1, "each crop is exactly one window (or its mirror image)"
        seen.add(matches[0])
    offsets = {k for k, _ in seen}
    assert offsets == set(windows), "every offset of the padding is drawn"
    assert {f for _, f in seen} == ({False, True} if hflip else {False})


@pytest.mark.parametrize("padding, hflip", [(2, False), (2, True), (0, True)])
def test_crop_output_has_standard_strides(padding, hflip):
    """Batches go straight into the model. A 1-channel crop built through a channels-last
    permute reports is_contiguous() but keeps channels-last strides (36, 1, 6, 1), and
    torch's CPU convolution backward then corrupts the heap with one thread (see
    test_engine_cli.py::test_training_one_channel_images_with_one_thread)."""
    for channels in (1, 3):
        x = torch.randint(0, 256, (8, channels, 6, 6), dtype=torch.uint8)
        out = random_crop_flip(x, padding, hflip, torch.Generator().manual_seed(0))
        assert out.stride() == torch.empty(out.shape).stride(), channels


def test_flip_only():
    x = torch.randint(0, 256, (64, 1, 3, 5), dtype=torch.uint8)
    out = random_crop_flip(x, 0, True, torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 0 < int((mirrored & ~same).sum()) < 64


# ------------------------------------------------------------------------------ default sampler


def _epoch(sampler) -> list[torch.Tensor]:
    return [batch[""] for batch in sampler]


@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_two_ranks_see_what_one_rank_sees(drop_last):
    n, b = 23, 3
    one = ShuffleSampler(n, 2 * b, seed=5, drop_last=drop_last)
    ranks = [ShuffleSampler(n, b, seed=5, drop_last=drop_last, rank=r, world=2) for r in range(2)]
    for epoch in (1, 2):
        one.set_epoch(epoch)
        for s in ranks:
            s.set_epoch(epoch)
        single = _epoch(one)
        shards = [_epoch(s) for s in ranks]
        assert len(single) == len(one) == len(ranks[0]) == len(shards[0]) == len(shards[1])
        assert len(single) == (n // (2 * b) if drop_last else math.ceil(n / (2 * b)))
        for step, batch in enumerate(single):
            assert torch.equal(torch.cat([shards[0][step], shards[1][step]]), batch)
            if len(batch) == 2 * b:
                assert len(shards[0][step]) == len(shards[1][step]) == b
        flat = torch.cat(single)
        assert len(set(flat.tolist())) == len(flat)  # no index twice in an epoch
        if not drop_last:
            assert sorted(flat.tolist()) == list(range(n))


def test_sampler_epochs_and_seeds_give_different_permutations():
    s = ShuffleSampler(50, 10, seed=0)
    first = torch.cat(_epoch(s))
    s.set_epoch(2)
    second = torch.cat(_epoch(s))
    s.set_epoch(1)
    again = torch.cat(_epoch(s))
    other_seed = torch.cat(_epoch(ShuffleSampler(50, 10, seed=1)))
    assert torch.equal(first, again)
    assert not torch.equal(first, second)
    assert not torch.equal(first, other_seed)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))


def test_sampler_resumes_mid_epoch():
    s = ShuffleSampler(40, 4, seed=9)
    s.set_epoch(3)
    it = iter(s)
    head = [next(it)[""] for _ in range(3)]
    state = s.state_dict()
    assert state == {"epoch": 3, "position": 3}
    rest = [b[""] for b in it]
    fresh = ShuffleSampler(40, 4, seed=9)
    fresh.load_state_dict(state)
    fresh.set_epoch(3)  # same epoch: the position is kept
    resumed = _epoch(fresh)
    assert len(head) + len(resumed) == len(s) == 10
    assert len(resumed) == len(rest)
    for a, b in zip(resumed, rest):
        assert torch.equal(a, b)
    fresh.set_epoch(4)  # a new epoch starts from its beginning
    assert len(_epoch(fresh)) == 10


def test_sampler_iterated_twice_yields_the_same_epoch_again():
    """A finished epoch iterated again yields it again (as DistributedSampler and BBN's
    sampler do), whole; an epoch left mid-way continues from its position first."""
    s = ShuffleSampler(40, 4, seed=9, rank=1, world=2)
    s.set_epoch(2)
    first = _epoch(s)
    again = _epoch(s)
    assert len(first) == len(again) == len(s) == 5
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert s.state_dict() == {"epoch": 2, "position": 5}
    # mid-epoch: the rest of the epoch, then the whole epoch again
    it = iter(s)
    head = [next(it)[""] for _ in range(2)]
    resumed = ShuffleSampler(40, 4, seed=9, rank=1, world=2)
    resumed.load_state_dict(s.state_dict())
    rest = _epoch(resumed)
    assert len(rest) == 3
    for a, b in zip(head + rest, first):
        assert torch.equal(a, b)
    assert len(_epoch(resumed)) == 5
    s.set_epoch(3)
    assert not all(torch.equal(a, b) for a, b in zip(_epoch(s), first))


def test_sampler_batch_larger_than_the_data_is_a_config_error():
    with pytest.raises(ConfigError, match="batch_size"):
        ShuffleSampler(10, 11, seed=0)
    assert len(ShuffleSampler(10, 11, seed=0, drop_last=False)) == 1
