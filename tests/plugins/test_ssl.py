"""Shared SSL pieces: the view pipeline, heads, momentum, kNN and the linear probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from batchkin import Method, hookimpl
from batchkin.errors import ConfigError, RunError
from batchkin.plugins import dino, moco, sdmp
from batchkin.plugins.ssl import (
    DINOHead,
    MixBatch,
    SSLNet,
    ViewOptions,
    colour_jitter,
    cosine_momentum,
    ema_update_,
    gaussian_blur,
    hsv_to_rgb,
    knn_scores,
    linear_probe,
    make_views,
    mlp,
    normalize_views,
    random_resized_crop_boxes,
    resized_crop,
    rgb_to_hsv,
    solarize,
    train_linear,
)
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import fit

MODULES = [moco, dino, sdmp]
IDENTITY = ViewOptions(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], jitter_prob=0.0, grayscale_prob=0.0,
                       blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.0])


def images(b=6, c=1, h=8, w=8, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the view pipeline


@pytest.mark.parametrize("c,h,w", [(1, 8, 8), (3, 9, 7), (3, 16, 16)])
def test_views_shape_dtype_range_and_determinism(c, h, w):
    x = images(5, c, h, w)
    v1 = make_views(x, torch.Generator().manual_seed(3))
    v2 = make_views(x, torch.Generator().manual_seed(3))
    v3 = make_views(x, torch.Generator().manual_seed(4))
    assert v1.shape == (2, 5, c, h, w) and v1.dtype == torch.uint8 and v1.is_contiguous()
    assert torch.equal(v1, v2)
    assert not torch.equal(v1, v3)
    assert not torch.equal(v1[0], v1[1])  # the two views differ
    assert not torch.equal(v1[0], x)  # the views are augmented
    assert int(v1.min()) >= 0 and int(v1.max()) <= 255


def test_views_with_identity_options_are_the_images_and_flips():
    x = images(64, 1, 6, 6)
    same = make_views(x, torch.Generator().manual_seed(0), IDENTITY, hflip=False)
    assert torch.equal(same[0], x) and torch.equal(same[1], x)
    flipped = make_views(x, torch.Generator().manual_seed(0), IDENTITY, hflip=True)
    is_x = (flipped == x).flatten(2).all(-1).squeeze(-1)
    is_flip = (flipped == x.flip(3)).flatten(2).all(-1).squeeze(-1)
    assert bool((is_x | is_flip).all())
    n_flip = int((is_flip & ~is_x).sum())
    assert 30 < n_flip < 98  # about half of 128 (binomial, 6 sigma)


def test_views_shard_equals_slice_of_global_batch():
    x = images(8, 3, 8, 8)
    full = make_views(x, torch.Generator().manual_seed(5))
    for rank in range(2):
        part = make_views(x[rank * 4 : (rank + 1) * 4], torch.Generator().manual_seed(5), shard=(rank, 2))
        assert torch.equal(part, full[:, rank * 4 : (rank + 1) * 4])


def test_resized_crop_equals_interpolate_of_the_crop():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 9, 7, generator=g)
    y0, x0 = torch.tensor([0, 2, 1, 0, 3]), torch.tensor([0, 1, 3, 0, 0])
    h, w = torch.tensor([9, 4, 8, 1, 6]), torch.tensor([7, 5, 2, 1, 7])
    out = resized_crop(x, y0, x0, h, w)
    for i in range(5):
        crop = x[i : i + 1, :, y0[i] : y0[i] + h[i], x0[i] : x0[i] + w[i]]
        ref = F.interpolate(crop, size=(9, 7), mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=0)
    flip = torch.tensor([True, False, True, False, True])
    flipped = resized_crop(x, y0, x0, h, w, flip)
    torch.testing.assert_close(flipped[flip], out[flip].flip(3), atol=0, rtol=0)
    torch.testing.assert_close(flipped[~flip], out[~flip], atol=0, rtol=0)


def test_crop_boxes_inside_scale_range_and_fallback():
    g = torch.Generator().manual_seed(0)
    n = 4000
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    y0, x0, h, w = random_resized_crop_boxes(u(n, 10), u(n, 10), u(n), u(n), 28, 20, [0.2, 1.0], [3 / 4, 4 / 3])
    assert bool(((y0 >= 0) & (x0 >= 0) & (y0 + h <= 28) & (x0 + w <= 20) & (h >= 1) & (w >= 1)).all())
    frac = (h * w).double() / (28 * 20)
    assert float(frac.min()) > 0.15 and float(frac.max()) <= 1.0
    # impossible ratio on every attempt: the whole image
    y0, x0, h, w = random_resized_crop_boxes(u(50, 10), u(50, 10), u(50), u(50), 8, 8, [1.0, 1.0], [4.0, 4.0])
    assert bool((h == 8).all() and (w == 8).all() and (y0 == 0).all() and (x0 == 0).all())


def test_crop_position_is_uniform():
    g = torch.Generator().manual_seed(1)
    n = 5000
    u = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    _, x0, h, w = random_resized_crop_boxes(u(n, 10), u(n, 10), u(n), u(n), 8, 8, [0.25, 0.25], [1.0, 1.0])
    assert bool((w == 4).all() and (h == 4).all())
    counts = torch.bincount(x0, minlength=5).tolist()
    assert len(counts) == 5
    assert stats.chisquare(counts).pvalue > 1e-4


def test_solarize_exact():
    x = torch.tensor([0, 127, 128, 200, 255], dtype=torch.uint8).view(1, 1, 1, 5).repeat(2, 1, 1, 1)
    out = solarize(x, torch.tensor([True, False]))
    assert out[0].flatten().tolist() == [0, 127, 127, 55, 0]
    assert torch.equal(out[1], x[1])


def test_gaussian_blur_equals_explicit_convolution():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 10, 9, generator=g)
    sigma = torch.tensor([0.3, 1.0, 2.0])
    out = gaussian_blur(x, sigma, kernel_size=5)
    for i in range(3):
        t = torch.arange(-2, 3, dtype=torch.float32)
        k1 = torch.exp(-0.5 * (t / sigma[i]) ** 2)
        k1 = k1 / k1.sum()
        k2 = (k1[:, None] * k1[None, :]).expand(2, 1, 5, 5)
        ref = F.conv2d(F.pad(x[i : i + 1], (2, 2, 2, 2), mode="reflect"), k2, groups=2)[0]
        torch.testing.assert_close(out[i], ref, atol=1e-6, rtol=1e-5)
    const = torch.full((2, 1, 6, 6), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 2.0])), const)


def test_colour_jitter_pieces():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 5, 5, generator=g)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=2e-6, rtol=0)
    ident = torch.tensor([[1.0, 1.0, 1.0, 0.0]]).repeat(4, 1)
    torch.testing.assert_close(colour_jitter(x, ident), x, atol=2e-6, rtol=0)
    bright = colour_jitter(x, torch.tensor([[0.5, 1.0, 1.0, 0.0]]).repeat(4, 1))
    torch.testing.assert_close(bright, x * 0.5, atol=2e-6, rtol=0)
    gray = colour_jitter(x, torch.tensor([[1.0, 1.0, 0.0, 0.0]]).repeat(4, 1))
    expect = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1).expand_as(x)
    torch.testing.assert_close(gray, expect, atol=2e-6, rtol=0)
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    green = colour_jitter(red, torch.tensor([[1.0, 1.0, 1.0, 1 / 3]]))
    torch.testing.assert_close(green.flatten(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-5, rtol=0)


def test_grayscale_images_skip_colour_ops():
    # with crop/flip/blur/solarize off, 1-channel images come back unchanged even with
    # colour jitter and grayscale certain: they apply to 3-channel images only
    o = ViewOptions(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], jitter_prob=1.0, grayscale_prob=1.0,
                    blur_prob=[0.0, 0.0], solarize_prob=[0.0, 0.0])
    x = images(6, 1, 8, 8)
    assert torch.equal(make_views(x, torch.Generator().manual_seed(0), o, hflip=False)[0], x)
    x3 = images(6, 3, 8, 8)
    v = make_views(x3, torch.Generator().manual_seed(0), o, hflip=False)[0]
    assert torch.equal(v[:, 0], v[:, 1]) and torch.equal(v[:, 1], v[:, 2])  # grayscale with p = 1


def test_view_probabilities_are_per_view():
    o = ViewOptions(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0], jitter_prob=0.0, grayscale_prob=0.0,
                    blur_prob=[0.0, 0.0], solarize_prob=[1.0, 0.0])
    x = images(8, 1, 8, 8)
    v = make_views(x, torch.Generator().manual_seed(0), o, hflip=False)
    assert torch.equal(v[0], solarize(x, torch.ones(8, dtype=torch.bool)))
    assert torch.equal(v[1], x)


def test_normalize_views():
    x = images(3, 2, 4, 4).unsqueeze(0).repeat(2, 1, 1, 1, 1)
    mean, std = torch.tensor([0.5, 0.25]), torch.tensor([0.2, 0.4])
    out = normalize_views(x, mean, std)
    torch.testing.assert_close(out[1, 2, 1], (x[1, 2, 1].float() / 255 - 0.25) / 0.4)
    assert out.is_contiguous() and out.dtype == torch.float32


@pytest.mark.parametrize("key,value,message", [
    ("crop_scale", [0.9, 0.1], "crop_scale must be [low, high]"),
    ("crop_scale", [0.0, 1.0], "crop_scale must be > 0.0"),
    ("crop_scale", [0.5], "crop_scale must have 2 values"),
    ("blur_prob", [1.5, 0.1], "blur_prob must be <= 1.0"),
    ("jitter", [0.4, 0.4, 0.2, 0.6], "hue strength must be <= 0.5"),
])
def test_view_options_errors_name_the_key(key, value, message):
    from batchkin.plugin import Plugins
    from batchkin.trainer import prepare

    raw = tiny_config(["moco"], moco={"views": {key: value}})
    with pytest.raises(ConfigError) as exc:
        prepare(raw, Plugins(extra_modules=MODULES))
    assert f"moco.views.{key}" in str(exc.value) and message in str(exc.value)


# ------------------------------------------------------------------------------ heads, SSLNet, momentum


def test_mlp_structure():
    proj = mlp(3, 8, 16, 4, last_bn=True)
    kinds = [type(m).__name__ for m in proj]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert proj[-1].affine is False and proj[1].affine is True
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    pred = mlp(2, 4, 16, 4, last_bn=False)
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]


def test_dino_head_last_layer_is_normalised():
    torch.manual_seed(0)
    head = DINOHead(8, 32, 16, 4)
    assert head.last_g.requires_grad is False
    w = head.last_g * F.normalize(head.last_v, dim=1)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(32))
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 32) and float(out.detach().abs().max()) <= 1.0 + 1e-6  # unit vectors times unit rows
    assert DINOHead(8, 32, norm_last_layer=False).last_g.requires_grad


def test_sslnet_protocol_and_frozen_parts():
    from batchkin.models import TinyNet, TinyOptions

    torch.manual_seed(0)
    enc = TinyNet(TinyOptions(width=4), num_classes=3, in_channels=1)
    net = SSLNet(enc, mlp(2, 4, 8, 4), mlp(2, 4, 8, 4, last_bn=False))
    x = torch.randn(6, 1, 5, 5)
    assert net(x).shape == (6, 3) and net(x, return_features=True)["features"].shape == (6, 4)
    assert net.classifier is enc.classifier and not any(p.requires_grad for p in net.classifier.parameters())
    assert not any(p.requires_grad for p in net.momentum.parameters())
    keys = net.state_dict().keys()
    assert "momentum.encoder.conv.weight" in keys and "momentum.head.0.weight" in keys
    seen = []
    out = net(torch.randn(2, 6, 1, 5, 5), ssl_hook=lambda o: seen.append(o["streams"][0].shape))
    assert seen == [(6, 4), (6, 4)]
    assert out["keys"].shape == (2, 6, 4) and not out["keys"].requires_grad
    assert len(out["q"]) == 2 and out["q"][0][0].requires_grad


def test_sslnet_local_crops_go_through_the_online_branch_only():
    from batchkin.models import TinyNet, TinyOptions

    torch.manual_seed(0)
    enc = TinyNet(TinyOptions(width=4), num_classes=3, in_channels=1)
    net = SSLNet(enc, mlp(2, 4, 8, 4))
    x, local = torch.randn(2, 6, 1, 8, 8), torch.randn(3, 6, 1, 4, 4)
    seen = []
    out = net(x, ssl_hook=lambda o: seen.append(o["features"].shape), local=local)
    assert len(seen) == 5 and len(out["q"]) == 5 and out["features"].shape == (5, 6, 4)
    assert out["keys"].shape == (2, 6, 4)
    plain = net(x, ssl_hook=lambda o: None)
    torch.testing.assert_close(out["keys"], plain["keys"], rtol=0, atol=0)
    for v in range(2):
        torch.testing.assert_close(out["q"][v][0], plain["q"][v][0], rtol=0, atol=0)
    # a local crop's output is the online encoder + head of that crop
    torch.testing.assert_close(out["q"][4][0], net.head(enc.forward_features(local[2])["features"]))


def test_both_bases_share_one_options_schema_and_keep_their_keys():
    import dataclasses

    from batchkin.plugins.dino import DINO
    from batchkin.plugins.moco import MoCo
    from batchkin.plugins.ssl import SSLBase, SSLOptions

    shared = {"momentum", "knn_k", "knn_temperature", "views"}
    assert {f.name for f in dataclasses.fields(SSLOptions)} == shared
    moco_keys = {f.name for f in dataclasses.fields(MoCo.Options)}
    dino_keys = {f.name for f in dataclasses.fields(DINO.Options)}
    assert moco_keys == shared | {"temperature", "proj_layers", "proj_hidden", "proj_dim", "pred_hidden"}
    assert dino_keys == shared | {"out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "norm_last_layer",
                                  "student_temp", "teacher_temp", "warmup_teacher_temp", "warmup_fraction",
                                  "center_momentum", "n_local_crops", "local_crop_size", "local_crop_scale",
                                  "head_init", "head_bn", "freeze_last_layer", "clip_grad", "eval_encoder"}
    assert issubclass(MoCo.Options, SSLOptions) and issubclass(DINO.Options, SSLOptions)
    assert issubclass(MoCo, SSLBase) and issubclass(DINO, SSLBase)
    assert MoCo.roles == DINO.roles == frozenset({"ssl-base"})
    # the shared defaults, and each base's own momentum default
    m, d = MoCo(), DINO()
    assert (m.options.momentum, d.options.momentum) == (0.99, 0.996)
    for base in (m, d):
        assert (base.knn.k, base.knn.temperature) == (20, 0.07) and base.momentum == base.options.momentum
        assert base.options.views == ViewOptions()
    assert MoCo(MoCo.Options(knn_k=5, knn_temperature=0.1)).knn.k == 5


def test_cosine_momentum_values():
    assert cosine_momentum(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_momentum(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_momentum(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_momentum(25, 100, 0.9) == pytest.approx(1 - 0.1 * 0.5 * (1 + math.cos(math.pi / 4)))
    values = [cosine_momentum(s, 40, 0.99) for s in range(41)]
    assert values == sorted(values)


def test_ema_update_formula():
    g = torch.Generator().manual_seed(0)
    tgt = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    src = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g)]
    expect = [0.9 * t + 0.1 * s for t, s in zip(tgt, src)]
    ema_update_(tgt, src, 0.9)
    for a, b in zip(tgt, expect):
        torch.testing.assert_close(a, b)
    ema_update_(tgt, src, 0.0)
    for a, b in zip(tgt, src):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------ kNN


def test_knn_scores_on_a_hand_built_bank():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [0.2, -2.0]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    q = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    scores = knn_scores(q, bank, labels, 3, k=3, temperature=0.5)
    # query 0: cosine sims 1, 0, 1/sqrt(2), -1, 0.2/sqrt(4.04); the 3 nearest are rows 0, 2, 4
    s4 = 0.2 / math.sqrt(4.04)
    expect0 = [math.exp(1 / 0.5), math.exp(1 / math.sqrt(2) / 0.5), math.exp(s4 / 0.5)]
    # query 1: sims 0, 1, 1/sqrt(2), 0, -2/sqrt(4.04); nearest rows 1, 2 (label 1) and a 0 (row 0 or 3)
    torch.testing.assert_close(scores[0], torch.tensor(expect0))
    assert float(scores[1, 1]) == pytest.approx(math.exp(2) + math.exp(math.sqrt(2)), rel=1e-6)
    assert float(scores[1].sum()) == pytest.approx(math.exp(2) + math.exp(math.sqrt(2)) + 1.0, rel=1e-6)
    assert scores.argmax(1).tolist() == [0, 1]
    # k larger than the bank: every entry votes
    all_votes = knn_scores(q[:1], bank, labels, 3, k=50, temperature=1.0)
    sims = F.normalize(bank, dim=1) @ torch.tensor([1.0, 0.0])
    torch.testing.assert_close(all_votes.sum(), torch.exp(sims).sum())


# ------------------------------------------------------------------------------ linear probe


def test_train_linear_separates_separable_features_deterministically():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 5, generator=g) * 4
    y = torch.arange(3).repeat_interleave(40)
    x = centers[y] + 0.3 * torch.randn(120, 5, generator=g)
    before = torch.get_rng_state()
    a = train_linear(x, y, 3, epochs=30, lr=0.1, batch_size=32, seed=1)
    b = train_linear(x, y, 3, epochs=30, lr=0.1, batch_size=32, seed=1)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(a.weight, b.weight)
    assert float((a(x).argmax(1) == y).float().mean()) == 1.0


@pytest.fixture(scope="module")
def moco_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    raw = tiny_config(["moco"], data={"augment": False})
    raw["epochs"] = 1
    from batchkin.plugin import Plugins

    fit(raw, out, plugins=Plugins(extra_modules=MODULES), progress=False)
    return out


def test_linear_probe_of_a_run(moco_run):
    r1 = linear_probe(moco_run, epochs=5, batch_size=16)
    r2 = linear_probe(moco_run, epochs=5, batch_size=16)
    assert r1 == r2  # seeded
    assert set(r1) >= {"top1", "balanced_acc", "per_class", "val_top1", "train_top1", "epoch", "feature_dim"}
    assert r1["epoch"] == 1 and r1["feature_dim"] == 8 and len(r1["per_class"]) == 4
    assert 0.0 <= r1["top1"] <= 1.0
    assert r1["train_top1"] > 0.5  # 4 well-separated synthetic classes: far above chance (0.25)
    r3 = linear_probe(moco_run, epochs=5, batch_size=16, seed=3)
    assert r3["seed"] == 3


def test_linear_probe_parity_with_a_plain_computation(moco_run):
    """The probe's features are the encoder's (eval mode, no augmentation) and its classifier
    is train_linear on the standardised training features."""
    from batchkin.config import load_raw
    from batchkin.plugin import Plugins
    from batchkin.rundir import load_checkpoint
    from batchkin.trainer import prepare, restore

    state = prepare(load_raw(moco_run / "config.toml"), Plugins(extra_modules=MODULES))
    restore(state, load_checkpoint(moco_run / "checkpoints" / "last.pt"))
    model = state.unwrapped_model.eval()
    data = state.train_data
    with torch.no_grad():
        ftr = model.encoder.forward_features(data.normalize(data.x))["features"]
        xt = state.splits.test.x
        fte = model.encoder.forward_features((xt.float() / 255 - data.mean) / data.std)["features"]
    mean, std = ftr.mean(0, keepdim=True), ftr.std(0, keepdim=True).clamp_min(1e-6)
    clf = train_linear((ftr - mean) / std, data.y, 4, epochs=5, batch_size=16, seed=0)
    with torch.no_grad():
        acc = float((clf((fte - mean) / std).argmax(1) == state.splits.test.y).float().mean())
    assert linear_probe(moco_run, epochs=5, batch_size=16)["top1"] == pytest.approx(acc, abs=1e-12)


def test_linear_probe_bad_inputs(moco_run, tmp_path):
    with pytest.raises(RunError, match="not a batchkin run folder"):
        linear_probe(tmp_path)
    with pytest.raises(RunError, match="no checkpoints/nope.pt"):
        linear_probe(moco_run, checkpoint="nope.pt")
    with pytest.raises(ConfigError, match="probe epochs"):
        linear_probe(moco_run, epochs=0)
    with pytest.raises(ConfigError, match="probe lr"):
        linear_probe(moco_run, lr=-1.0)
    with pytest.raises(ConfigError, match="probe batch_size"):
        linear_probe(moco_run, batch_size=0)


def test_probe_command(moco_run, capsys):
    import json

    from batchkin.cli import main

    assert main(["probe", str(moco_run), "--epochs", "3", "--batch-size", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epochs"] == 3 and out["checkpoint"] == "last.pt"
    expect = json.loads(json.dumps(linear_probe(moco_run, epochs=3, batch_size=16)))
    assert {k: v for k, v in out.items() if k != "run"} == expect


# ------------------------------------------------------------------------------ the raw batch and the transform_views hook


@pytest.mark.parametrize("base", ["moco", "dino"])
def test_the_bases_get_the_raw_batch_whatever_data_augment_says(base):
    steps = {}
    for augment in (True, False):
        raw = tiny_config([base], data={"augment": augment, "crop_padding": 2})
        state = run_plugin([base], steps=1, config=raw, plugin_modules=MODULES)
        batch = state.batch
        assert batch["x"].dtype == torch.uint8  # no engine crop, flip or normalisation
        assert torch.equal(batch["x"], state.train_data.x[batch["idx"]])
        assert torch.equal(batch["y"], state.train_data.y[batch["idx"]])
        assert "augment@cpu" not in state.generators  # the engine drew nothing for it
        steps[augment] = {k: float(v.detach()) for k, v in state.loss_terms.items()}
    assert steps[True] == steps[False]  # data.augment is accepted and changes nothing


def test_a_supervised_run_still_gets_the_engines_augmented_batch():
    state = run_plugin(["ce"], steps=1, config=tiny_config(["ce"], data={"augment": True}))
    assert state.batch["x"].dtype == torch.float32 and "augment@cpu" in state.generators


class _ToFloat(Method):
    @hookimpl
    def transform_batch(self, state):
        state.batch["x"] = state.batch["x"].float()


class _HalfMix(Method):
    """A third-party mixing method for the SSL bases: every sample averaged with its flipped
    partner (lam = 0.5), scored with MoCo's InfoNCE of the mixed queries against the keys."""

    @hookimpl
    def transform_views(self, state, views):
        V, B = views.shape[:2]
        partner = torch.arange(B - 1, -1, -1, device=views.device)
        mixed = torch.floor((views.float() + views[:, partner].float()) / 2 + 0.5).to(torch.uint8)
        half = torch.full((V, B), 0.5)
        return MixBatch(mixed=mixed, lam=half, partner=state.rank * B + partner,
                        lam_keys=torch.full((V, B * state.world_size), 0.5), op=0)

    @hookimpl
    def loss_terms(self, state, outputs):
        step = outputs["ssl"]
        q = step.q_mix[0][0]
        return {"halfmix": moco.moco_infonce(q, step.keys_mix[1], 0.2, step.labels)}


def _module(name, **methods):
    import types

    module = types.ModuleType(name)

    @hookimpl
    def register_methods(register):
        for key, cls in methods.items():
            register(key, cls)

    module.register_methods = register_methods
    return module


def test_a_third_party_mixing_method_plugs_into_the_bases_through_transform_views():
    import copy

    from batchkin.trainer import train_step

    halfmix = _module("halfmix", halfmix=_HalfMix)
    state = run_plugin(["moco", "halfmix"], steps=0, config=tiny_config(["moco", "halfmix"]),
                       plugin_modules=[*MODULES, halfmix])
    before = copy.deepcopy(state.unwrapped_model)
    train_step(state, next(iter(state.sampler)))
    step = state.outputs["ssl"]
    B = state.batch["x"].shape[0]
    assert set(state.loss_terms) == {"moco", "halfmix"}
    assert step.mix is not None and step.mix.mixed.shape == (2, B, 1, 8, 8)
    assert torch.equal(step.mix.partner, torch.arange(B - 1, -1, -1))
    assert len(step.q_mix) == 2 and step.keys_mix.shape == step.keys.shape
    # the base normalised the hook's mixed views and ran them through both branches
    data = state.train_data
    x = normalize_views(step.mix.mixed, data.mean.view(-1), data.std.view(-1))
    with torch.no_grad():
        for v in range(2):
            f = before.momentum["encoder"].forward_features(x[v])["features"]
            torch.testing.assert_close(step.keys_mix[v], before.momentum["head"](f), rtol=1e-5, atol=1e-6)
            q = before.predictor(before.head(before.encoder.forward_features(x[v])["features"]))
            torch.testing.assert_close(step.q_mix[v][0], q, rtol=1e-5, atol=1e-6)
    expect = moco.moco_infonce(step.q_mix[0][0], step.keys_mix[1], 0.2, step.labels)
    torch.testing.assert_close(state.loss_terms["halfmix"], expect)


def test_two_mixing_methods_are_refused_naming_both():
    from batchkin.errors import PluginError
    from batchkin.plugin import Plugins
    from batchkin.trainer import prepare

    halfmix = _module("halfmix", halfmix=_HalfMix)
    raw = tiny_config(["moco", "sdmp", "halfmix"])
    with pytest.raises(PluginError, match="'sdmp' and 'halfmix' conflict: both provide transform_views"):
        prepare(raw, Plugins(extra_modules=[*MODULES, halfmix]))


def test_a_float_batch_handed_to_a_base_is_refused_clearly():
    tofloat = _module("tofloat", tofloat=_ToFloat)
    with pytest.raises(RunError, match="moco builds its views from the raw uint8 batch"):
        run_plugin(["tofloat", "moco"], steps=1, config=tiny_config(["tofloat", "moco"]),
                   plugin_modules=[*MODULES, tofloat])


def test_no_plugin_reaches_another_method_by_name():
    """Methods talk through hooks and the state, never by looking each other up."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[2] / "plugins"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "methods.get(" not in text and "methods[" not in text, path
