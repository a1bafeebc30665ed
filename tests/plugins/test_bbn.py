"""BBN: schedules, combiner and loss by hand, the dual sampler (distribution, shards, resume),
the bilateral model, training through the engine, exact resume, conflicts and bad options."""

from __future__ import annotations

import copy
import json
import math
import tomllib
import types

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import batchkin.plugins.bbn as bbn
from batchkin.config import build_config
from batchkin.data import ShuffleSampler, make_splits
from batchkin.errors import ConfigError, DataError, PluginError
from batchkin.hookspecs import hookimpl
from batchkin.kernels.reversed_sampler import class_probabilities, class_sorted_table, sample_epoch
from batchkin.kernels.rng import derive_key
from batchkin.models import CifarResNet
from batchkin.plugin import Method, Plugins
from batchkin.rundir import load_checkpoint
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import evaluate, fit, prepare, restore, train_step


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plugins(*extra) -> Plugins:
    return Plugins(extra_modules=[bbn, *extra])


def lt_config(**tables) -> dict:
    """A tiny long-tailed run: 3x8x8 synthetic images, 4 classes (IF 4), ResNet-8 of width 4."""
    base = tiny_config(
        ["bbn"],
        data={"synthetic_shape": [3, 8, 8], "synthetic_per_class": 24, "imbalance_factor": 4.0, "batch_size": 8,
              "val_fraction": 0.25, "test_fraction": 0.25},
        model={"name": "resnet8", "width": 4},
    )
    for key, value in tables.items():
        if key == "model":
            base[key] = value  # another model has other options
        elif isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return base


# ------------------------------------------------------------------------------ alpha schedules

E = 10
EXPECTED = {
    # epoch: 1, 6, 10 (1-based) of E = 10
    "parabolic_decay": [1.0, 0.75, 1 - 0.81],
    "linear_decay": [1.0, 0.5, 0.1],
    "cosine_decay": [1.0, math.sqrt(0.5), math.cos(0.9 * math.pi / 2)],
    "parabolic_increment": [0.0, 0.25, 0.81],
    "fixed": [0.5, 0.5, 0.5],
}


@pytest.mark.parametrize("schedule", sorted(EXPECTED))
def test_alpha_schedules_by_hand(schedule):
    got = [bbn.bbn_alpha(e, E, schedule) for e in (1, 6, 10)]
    assert got == pytest.approx(EXPECTED[schedule], abs=1e-12)


def test_alpha_default_schedule_is_parabolic_decay():
    assert bbn.bbn_alpha(6, 10) == 0.75
    assert bbn.bbn_alpha(1, 1) == 1.0
    # every epoch of a 4-epoch run: 1 - ((e - 1) / 4) ** 2
    assert [bbn.bbn_alpha(e, 4) for e in range(1, 5)] == [1.0, 0.9375, 0.75, 0.4375]


def test_alpha_bad_arguments():
    with pytest.raises(ValueError, match="epoch must lie in 1..epochs"):
        bbn.bbn_alpha(0, 10)
    with pytest.raises(ValueError, match="epoch must lie in 1..epochs"):
        bbn.bbn_alpha(11, 10)
    with pytest.raises(ValueError, match="schedule must be one of"):
        bbn.bbn_alpha(1, 10, "parabolic")
    with pytest.raises(TypeError, match="epoch must be an int"):
        bbn.bbn_alpha(1.0, 10)


def test_alpha_epochs_reproduce_upstreams_90_epoch_recipe():
    """Upstream's iNaturalist recipe divides by 100 in a 90-epoch run: alpha = 1 - ((e-1)/100)**2."""
    got = [bbn.bbn_alpha(e, 90, alpha_epochs=100) for e in (1, 11, 51, 90)]
    assert got == pytest.approx([1.0, 0.99, 0.75, 0.2079], abs=1e-12)
    assert bbn.bbn_alpha(90, 90) == pytest.approx(1 - (89 / 90) ** 2) == pytest.approx(0.0221, abs=5e-5)
    assert bbn.bbn_alpha(90, 90, "linear_decay", alpha_epochs=100) == pytest.approx(0.11)
    assert bbn.bbn_alpha(180, 180, "parabolic_increment", alpha_epochs=200) == pytest.approx(0.895**2)
    assert bbn.bbn_alpha(6, 10, alpha_epochs=10) == bbn.bbn_alpha(6, 10)  # D = E is the default
    # a period shorter than the run holds t at 1 from epoch D + 1 on: alpha stays in [0, 1]
    assert [bbn.bbn_alpha(e, 6, "linear_decay", alpha_epochs=4) for e in range(1, 7)] == [1, 0.75, 0.5, 0.25, 0, 0]
    assert bbn.bbn_alpha(6, 6, "parabolic_increment", alpha_epochs=2) == 1.0
    with pytest.raises(ValueError, match="alpha_epochs must be >= 1; got 0"):
        bbn.bbn_alpha(1, 10, alpha_epochs=0)
    with pytest.raises(TypeError, match="alpha_epochs must be an int"):
        bbn.bbn_alpha(1, 10, alpha_epochs=100.0)


def test_alpha_epochs_option_sets_the_epochs_alpha():
    with torch.random.fork_rng():
        state = prepare(lt_config(epochs=3, bbn={"alpha_epochs": 4, "alpha_schedule": "linear_decay"}), plugins())
    alphas = []
    for epoch in (1, 2, 3):
        state.epoch = epoch
        state.epoch_metrics = {}
        state.hooks.on_epoch_start(state=state)
        alphas.append(state.epoch_metrics["bbn/alpha"])
    assert alphas == [1.0, 0.75, 0.5]


def test_beta_schedule_draws_beta_02_from_the_generator():
    gen = torch.Generator().manual_seed(3)
    draws = torch.tensor([bbn.bbn_alpha(1, 10, "beta", generator=gen) for _ in range(3000)])
    assert ((draws >= 0) & (draws <= 1)).all()
    assert stats.kstest(draws.numpy(), stats.beta(0.2, 0.2).cdf).pvalue > 1e-3
    # the KS test tells a different concentration apart
    assert stats.kstest(draws.numpy(), stats.beta(0.5, 0.5).cdf).pvalue < 1e-6
    # reproducible from the generator's state, and the global RNG is not used
    with torch.random.fork_rng():
        torch.manual_seed(0)
        before = torch.get_rng_state()
        a = bbn.sample_beta(0.2, 0.2, torch.Generator().manual_seed(5), 50)
        b = bbn.sample_beta(0.2, 0.2, torch.Generator().manual_seed(5), 50)
        assert torch.equal(a, b) and torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("a,b", [(2.0, 5.0), (0.5, 1.5)])
def test_sample_beta_other_parameters(a, b):
    draws = bbn.sample_beta(a, b, torch.Generator().manual_seed(11), 4000)
    assert draws.shape == (4000,)
    assert stats.kstest(draws.numpy(), stats.beta(a, b).cdf).pvalue > 1e-3
    with pytest.raises(ValueError, match="Beta parameters"):
        bbn.sample_beta(0.0, 1.0)


# ------------------------------------------------------------------------------ combiner and loss


def test_bbn_logits_hand_worked_example():
    # D = 1, K = 2: z = 2a W_c f_c + 2(1-a) W_r f_r + b with a = 0.75
    f_c, f_r = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    w = torch.tensor([[1.0, 3.0], [2.0, -1.0]])  # [W_c | W_r]
    b = torch.tensor([0.5, -0.5])
    z = bbn.bbn_logits(f_c, f_r, 0.75, w, b)
    # 1.5 * [1, 2] * 1 + 0.5 * [3, -1] * 2 + [0.5, -0.5] = [5, 1.5]
    assert torch.equal(z, torch.tensor([[5.0, 1.5]]))


@pytest.mark.parametrize("alpha", [1.0, 0.75, 0.5, 0.123, 0.0])
def test_bbn_logits_equals_the_explicit_formula(alpha):
    g = torch.Generator().manual_seed(0)
    d, k, n = 6, 5, 7
    f_c, f_r = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    w, b = torch.randn(k, 2 * d, generator=g), torch.randn(k, generator=g)
    explicit = 2 * alpha * f_c @ w[:, :d].T + 2 * (1 - alpha) * f_r @ w[:, d:].T + b
    torch.testing.assert_close(bbn.bbn_logits(f_c, f_r, alpha, w, b), explicit, rtol=1e-5, atol=1e-5)
    # at alpha = 0.5 the combiner is exactly the classifier on cat(f_c, f_r)
    if alpha == 0.5:
        assert torch.equal(bbn.bbn_features(f_c, f_r, 0.5), torch.cat([f_c, f_r], 1))


def test_bbn_loss_hand_formula():
    z = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    y_c, y_r = torch.tensor([0, 2]), torch.tensor([1, 1])
    logp = z - torch.logsumexp(z, 1, keepdim=True)
    ce_c = -(logp[0, 0] + logp[1, 2]) / 2
    ce_r = -(logp[0, 1] + logp[1, 1]) / 2
    for a in (1.0, 0.3, 0.0):
        torch.testing.assert_close(bbn.bbn_loss(z, y_c, y_r, a), a * ce_c + (1 - a) * ce_r)
    # by hand: row 0 logsumexp(2, 0, -1) = 2.1698...
    assert float(bbn.bbn_loss(z, y_c, y_r, 1.0)) == pytest.approx(
        ((math.log(math.exp(2) + 1 + math.exp(-1)) - 2) + (math.log(2 * math.exp(0.5) + math.exp(3)) - 3)) / 2)


# ------------------------------------------------------------------------------ the dual sampler

# class sizes 40, 20, 8, 4, 2 in a shuffled order
LABELS = torch.tensor([0] * 40 + [1] * 20 + [2] * 8 + [3] * 4 + [4] * 2)[
    torch.randperm(74, generator=torch.Generator().manual_seed(1))
]


def chisquare_p(indices, labels, probs) -> float:
    k = len(probs)
    observed = torch.bincount(labels[indices], minlength=k).double()
    expected = probs.double() * len(indices)
    return stats.chisquare(observed.numpy(), expected.numpy()).pvalue


@pytest.mark.parametrize("mode", ["reversed", "balanced", "instance"])
def test_reversed_stream_class_frequencies_follow_p(mode):
    counts = torch.bincount(LABELS)
    probs = class_probabilities(counts, mode)
    idx = bbn.reversed_sampler(LABELS, 20000, seed=4, epoch=1, mode=mode)
    assert chisquare_p(idx, LABELS, probs) > 1e-3
    # the test can fail: instance frequencies are not the reversed ones
    other = "instance" if mode != "instance" else "reversed"
    assert chisquare_p(idx, LABELS, class_probabilities(counts, other)) < 1e-12
    # within a class, every instance is equally likely
    for c in range(5):
        members = idx[LABELS[idx] == c]
        if len(members) > 200:
            obs = torch.bincount(members, minlength=74)[LABELS == c].double()
            assert stats.chisquare(obs.numpy()).pvalue > 1e-3


def test_reversed_probabilities_by_hand():
    # n = [40, 20, 8, 4, 2]: w = n_max / n = [1, 2, 5, 10, 20], P = w / 38
    p = class_probabilities(torch.bincount(LABELS), "reversed")
    assert p.tolist() == pytest.approx([1 / 38, 2 / 38, 5 / 38, 10 / 38, 20 / 38])


def test_sampler_streams_over_many_epochs():
    s = bbn.BBNSampler(LABELS, 5, 10, seed=7, drop_last=False)
    probs = class_probabilities(torch.bincount(LABELS), "reversed")
    rev = []
    for epoch in range(1, 61):
        s.set_epoch(epoch)
        steps = list(s)
        assert len(steps) == len(s) == 8
        uniform = torch.cat([st[""] for st in steps])
        # the uniform stream is a permutation of the training set
        assert torch.equal(uniform.sort().values, torch.arange(74))
        assert torch.equal(uniform, ShuffleSampler(74, 10, 7, drop_last=False).permutation(epoch))
        for st in steps:
            assert st["rev"].shape == st[""].shape and st["rev"].dtype == torch.int64
        rev.append(torch.cat([st["rev"] for st in steps]))
    rev = torch.cat(rev)
    assert chisquare_p(rev, LABELS, probs) > 1e-3
    # epochs differ
    assert not torch.equal(rev[:74], rev[74:148])


def test_sampler_reversed_stream_is_the_functional_twin():
    s = bbn.BBNSampler(LABELS, 5, 16, seed=3, mode="balanced")
    s.set_epoch(2)
    got = torch.cat([st["rev"] for st in s])
    assert s.num_draws == 64 == len(got)
    expected = bbn.reversed_sampler(LABELS, 64, seed=derive_key(3, bbn.REVERSED_STREAM), epoch=2, mode="balanced")
    assert torch.equal(got, expected)
    si, counts = class_sorted_table(LABELS, 5)
    assert torch.equal(expected[10:30], sample_epoch(si, counts, 64, seed=derive_key(3, bbn.REVERSED_STREAM),
                                                     epoch=2, mode="balanced", start=10, stop=30))


def test_sampler_iterated_twice_yields_the_same_epoch_again():
    """As DistributedSampler: a finished epoch iterated again (no set_epoch) is the same epoch,
    not an empty one; a resumed sampler still starts where it stopped."""
    s = bbn.BBNSampler(LABELS, 5, 8, seed=4)
    s.set_epoch(3)
    first, second = list(s), list(s)
    assert len(first) == len(s) == 9 and len(second) == 9
    for a, b in zip(first, second):
        assert torch.equal(a[""], b[""]) and torch.equal(a["rev"], b["rev"])
    assert s.state_dict() == {"epoch": 3, "position": 9}
    resumed = bbn.BBNSampler(LABELS, 5, 8, seed=4)
    resumed.load_state_dict({"epoch": 3, "position": 4})
    rest = list(resumed)
    assert len(rest) == 5 and all(torch.equal(a["rev"], b["rev"]) for a, b in zip(first[4:], rest))
    again = list(resumed)  # after the resumed epoch's end: the whole epoch
    assert len(again) == 9 and all(torch.equal(a[""], b[""]) for a, b in zip(first, again))
    s.set_epoch(4)
    assert not torch.equal(next(iter(s))[""], first[0][""])


def _rank_streams(world, batch, drop_last, epoch, seed=5, stop_after=None, resume_from=None):
    """Per rank: the list of per-step dicts of one epoch (optionally resumed from a state dict)."""
    out = []
    for r in range(world):
        s = bbn.BBNSampler(LABELS, 5, batch, seed, drop_last=drop_last, rank=r, world=world)
        s.set_epoch(epoch)
        if resume_from is not None:
            s.load_state_dict(resume_from)
        steps = []
        for st in s:
            steps.append(st)
            if stop_after is not None and len(steps) == stop_after:
                break
        out.append((s, steps))
    return out


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_are_disjoint_and_cover_the_epoch(world, drop_last):
    batch = 7
    for epoch in (1, 2, 5):
        single = bbn.BBNSampler(LABELS, 5, batch * world, 5, drop_last=drop_last)
        single.set_epoch(epoch)
        global_steps = list(single)
        ranks = _rank_streams(world, batch, drop_last, epoch)
        assert {len(steps) for _, steps in ranks} == {len(global_steps)}
        for i, g in enumerate(global_steps):
            for stream in ("", "rev"):
                parts = [steps[i][stream] for _, steps in ranks]
                # every rank's pair of batches has equal sizes
                assert [len(p) for p in parts] == [len(steps[i][""]) for _, steps in ranks]
                # the ranks' parts in rank order are exactly the global batch: disjoint, covering
                assert torch.equal(torch.cat(parts), g[stream]), (epoch, i, stream)
        # the uniform positions of the whole epoch are covered once
        uniform = torch.cat([steps[i][""] for i in range(len(global_steps)) for _, steps in ranks])
        assert len(set(uniform.tolist())) == len(uniform)
        if not drop_last:
            assert sorted(uniform.tolist()) == list(range(74))
        # and the reversed draws' positions partition 0 .. num_draws - 1
        spans = sorted(s.shard(i) for s, steps in ranks for i in range(len(steps)))
        assert spans[0][0] == 0 and spans[-1][1] == single.num_draws
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_resumes_mid_epoch(world):
    full = _rank_streams(world, 5, True, epoch=3)
    cut = _rank_streams(world, 5, True, epoch=3, stop_after=2)
    # resumed ranks still split every global batch disjointly and completely
    resumed = _rank_streams(world, 5, True, epoch=3, resume_from={"epoch": 3, "position": 2})
    single = bbn.BBNSampler(LABELS, 5, 5 * world, 5)
    single.set_epoch(3)
    global_steps = list(single)[2:]
    assert {len(steps) for _, steps in resumed} == {len(global_steps)} and global_steps
    for i, g in enumerate(global_steps):
        for stream in ("", "rev"):
            assert torch.equal(torch.cat([steps[i][stream] for _, steps in resumed]), g[stream])
    for r in range(world):
        state = cut[r][0].state_dict()
        assert state == {"epoch": 3, "position": 2}
        fresh = bbn.BBNSampler(LABELS, 5, 5, 5, rank=r, world=world)
        fresh.load_state_dict(copy.deepcopy(state))
        rest = list(fresh)
        assert len(rest) == len(full[r][1]) - 2
        for a, b in zip(full[r][1][2:], rest):
            assert torch.equal(a[""], b[""]) and torch.equal(a["rev"], b["rev"])
        # the next epoch starts from its beginning
        fresh.set_epoch(4)
        assert len(list(fresh)) == len(fresh)


def test_sampler_refuses_an_empty_class():
    with pytest.raises(DataError, match="class 2 has no training images"):
        bbn.BBNSampler(torch.tensor([0, 0, 1, 1, 3]), 4, 2, 0)


# ------------------------------------------------------------------------------ the bilateral model


def resnet(width=4, fused=False):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = CifarResNet([1, 1, 1], num_classes=3, in_channels=3, width=width)
        return base, bbn.BilateralNet(base, fused=fused)


def test_branches_start_as_copies_of_the_last_block():
    base, model = resnet()
    ref = base.last_block.state_dict()
    for block in (model.cb_block, model.rb_block):
        assert block.state_dict().keys() == ref.keys()
        assert all(torch.equal(block.state_dict()[k], ref[k]) for k in ref)
    # copies, not shared parameters; the trunk is shared with the backbone
    assert model.cb_block.conv1.weight.data_ptr() != model.rb_block.conv1.weight.data_ptr()
    assert model.trunk is base.trunk
    assert (model.classifier.in_features, model.classifier.out_features) == (2 * base.feature_dim, 3)
    assert model.feature_dim == 2 * base.feature_dim and model.num_classes == 3


def test_eval_logits_equal_the_alpha_half_combiner():
    _, model = resnet()
    model.eval()
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.rb_block.parameters():  # make the branches differ
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(6, 3, 8, 8, generator=g)
    with torch.no_grad():
        h = model.trunk(x)
        f_c = model.pool(model.cb_block(h)).flatten(1)
        f_r = model.pool(model.rb_block(h)).flatten(1)
        by_hand = model.classifier(torch.cat([f_c, f_r], 1))
        out = model(x, return_features=True)
        assert torch.equal(out["features"], torch.cat([f_c, f_r], 1))
        assert torch.equal(model(x), by_hand)
        assert torch.equal(model.forward_features(x)["features"], out["features"])
        w, b = model.classifier.weight, model.classifier.bias
        torch.testing.assert_close(bbn.bbn_logits(f_c, f_r, 0.5, w, b), by_hand, rtol=0, atol=0)
        # the training call at alpha = 0.5 on the same image gives the same logits
        pair = model(x, x_rev=x, alpha=0.5, return_features=True)
        torch.testing.assert_close(model.classifier(pair["features"]), by_hand, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(f_c, f_r)


def test_training_call_combines_both_batches():
    _, model = resnet()
    model.eval()
    g = torch.Generator().manual_seed(5)
    x, x_rev = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    with torch.no_grad():
        out = model(x, x_rev=x_rev, alpha=0.8, return_features=True)
        f_c = model.pool(model.cb_block(model.trunk(x))).flatten(1)
        f_r = model.pool(model.rb_block(model.trunk(x_rev))).flatten(1)
    torch.testing.assert_close(out["f_c"], f_c)
    torch.testing.assert_close(out["f_r"], f_r)
    torch.testing.assert_close(out["features"], torch.cat([1.6 * f_c, 0.4 * f_r], 1))


def test_fused_equals_two_passes_in_eval_and_differs_in_training():
    _, two = resnet(fused=False)
    _, fused = resnet(fused=True)
    fused.load_state_dict(two.state_dict())
    # non-trivial running statistics
    two.train()
    with torch.no_grad():
        two(torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(6)) * 2 + 1)
    fused.load_state_dict(two.state_dict())
    g = torch.Generator().manual_seed(2)
    x, x_rev = torch.randn(8, 3, 8, 8, generator=g), 3 * torch.randn(8, 3, 8, 8, generator=g) + 1
    two.eval(), fused.eval()
    with torch.no_grad():
        a = two(x, x_rev=x_rev, alpha=0.7, return_features=True)
        b = fused(x, x_rev=x_rev, alpha=0.7, return_features=True)
    torch.testing.assert_close(a["features"], b["features"], rtol=1e-5, atol=1e-5)
    two.train(), fused.train()
    with torch.no_grad():
        a = two(x, x_rev=x_rev, alpha=0.7, return_features=True)
        b = fused(x, x_rev=x_rev, alpha=0.7, return_features=True)
    # batch statistics over cat(x, x_rev) differ from each batch's own
    assert (a["features"] - b["features"]).abs().max() > 1e-2


def test_bilateral_net_keeps_modules_other_methods_attached():
    base = CifarResNet([1, 1, 1], num_classes=3, in_channels=3, width=4)
    base.add_module("aux_head", torch.nn.Linear(16, 2))
    model = bbn.BilateralNet(base)
    assert model.aux_head is base.aux_head
    assert not hasattr(model, "last_block")


# ------------------------------------------------------------------------------ the method in the engine


def one_step(raw, *extra):
    """prepare + one training step; returns the state and the classifier's weights before the step."""
    with torch.random.fork_rng():
        state = prepare(raw, plugins(*extra))
        state.hooks.on_fit_start(state=state)
        state.epoch = 1
        state.sampler.set_epoch(1)
        state.hooks.on_epoch_start(state=state)
        state.model.train()
        w = state.model.classifier.weight.detach().clone()
        b = state.model.classifier.bias.detach().clone()
        train_step(state, next(iter(state.sampler)))
    return state, w, b


def test_one_step_through_the_engine_matches_the_hand_formulas():
    state, w, b = one_step(lt_config(epochs=4, bbn={"alpha_schedule": "parabolic_increment"}))
    assert isinstance(state.model, bbn.BilateralNet)
    out, batch = state.outputs, state.batch
    assert {"x", "y", "x_rev", "y_rev"} <= set(batch) and batch["x_rev"].shape == batch["x"].shape
    alpha = out["alpha"]
    assert alpha == 0.0 == bbn.bbn_alpha(1, 4, "parabolic_increment")
    # outputs keep both branches' features; logits are the combiner's
    torch.testing.assert_close(out["logits"], bbn.bbn_logits(out["f_c"], out["f_r"], alpha, w, b), rtol=1e-5, atol=1e-6)
    z = out["logits"]
    loss = alpha * F.cross_entropy(z, batch["y"]) + (1 - alpha) * F.cross_entropy(z, batch["y_rev"])
    torch.testing.assert_close(state.loss_terms["bbn"], loss)
    assert set(state.loss_terms) == {"bbn"}
    state2, w2, b2 = one_step(lt_config(epochs=4, bbn={"alpha_schedule": "fixed"}))
    o2, b_2 = state2.outputs, state2.batch
    assert o2["alpha"] == 0.5
    plain = F.linear(torch.cat([o2["f_c"], o2["f_r"]], 1), w2, b2)
    torch.testing.assert_close(o2["logits"], plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state2.loss_terms["bbn"], 0.5 * F.cross_entropy(o2["logits"], b_2["y"])
                               + 0.5 * F.cross_entropy(o2["logits"], b_2["y_rev"]))


def test_evaluation_forward_is_the_alpha_half_combiner_on_the_same_image():
    state, _, _ = one_step(lt_config())
    state.model.eval()
    state.training = False
    x = state.train_data.normalize(state.train_data.x[:8])
    state.batch = {"x": x, "y": state.train_data.y[:8]}
    with torch.no_grad():
        out = state.hooks.forward(state=state)
        h = state.model.trunk(x)
        f_c = state.model.pool(state.model.cb_block(h)).flatten(1)
        f_r = state.model.pool(state.model.rb_block(h)).flatten(1)
        expected = state.model.classifier(torch.cat([f_c, f_r], 1))
    assert out["alpha"] == 0.5
    assert torch.equal(out["logits"], expected)
    assert torch.equal(out["f_c"], f_c) and torch.equal(out["f_r"], f_r)


def test_whole_training_pass_is_one_call_of_the_model():
    """DistributedDataParallel only syncs what runs inside the module's forward."""
    raw = lt_config()
    with torch.random.fork_rng():
        state = prepare(raw, plugins())
        calls, trunk_calls = [], []
        state.model.register_forward_hook(lambda m, a, kw, o: calls.append(sorted(kw)), with_kwargs=True)
        state.model.trunk.register_forward_hook(lambda m, a, o: trunk_calls.append(a[0].shape[0]))
        state.epoch = 1
        state.sampler.set_epoch(1)
        state.hooks.on_epoch_start(state=state)
        state.model.train()
        train_step(state, next(iter(state.sampler)))
    assert calls == [["alpha", "return_features", "x_rev"]]
    assert trunk_calls == [8, 8]  # two trunk passes (fused = false)


def test_fused_option_runs_the_trunk_once():
    raw = lt_config(bbn={"fused": True})
    with torch.random.fork_rng():
        state = prepare(raw, plugins())
        sizes = []
        state.model.trunk.register_forward_hook(lambda m, a, o: sizes.append(a[0].shape[0]))
        state.epoch = 1
        state.sampler.set_epoch(1)
        state.hooks.on_epoch_start(state=state)
        train_step(state, next(iter(state.sampler)))
    assert sizes == [16]


def test_composes_with_a_feature_stream_method():
    """A BatchFormer-like method appends a stream in transform_features: labels repeat for both streams."""
    class Extra(Method):
        @hookimpl
        def transform_features(self, state, outputs):
            if state.training:
                outputs["streams"].append(outputs["streams"][0].flip(0))

    mod = types.ModuleType("extra_stream")
    mod.register_methods = hookimpl(lambda register: register("extra_stream", Extra))
    state = run_plugin(["bbn", "extra_stream"], steps=1, config=lt_config(), plugin_modules=[bbn, mod])
    z, batch, a = state.outputs["logits"], state.batch, state.outputs["alpha"]
    assert z.shape[0] == 2 * batch["y"].shape[0]
    y_c, y_r = batch["y"].repeat(2), batch["y_rev"].repeat(2)
    torch.testing.assert_close(state.loss_terms["bbn"], a * F.cross_entropy(z, y_c) + (1 - a) * F.cross_entropy(z, y_r))


def test_beta_schedule_draws_per_batch_from_the_bbn_generator():
    state = run_plugin(["bbn"], steps=3, config=lt_config(bbn={"alpha_schedule": "beta"}), plugin_modules=[bbn])
    method = state.hooks.methods["bbn"]
    assert method.alpha_count == 3
    gen = torch.Generator().manual_seed(derive_key(0, *b"bbn"))
    expected = [bbn.bbn_alpha(1, 2, "beta", generator=gen) for _ in range(3)]
    assert method.alpha == expected[-1]
    assert method.alpha_sum == pytest.approx(sum(expected))
    assert state.outputs["alpha"] == expected[-1]


def read_lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def comparable(run) -> list[str]:
    out = []
    for r in read_lines(run):
        r.pop("images_per_s", None)
        out.append(json.dumps(r, sort_keys=True))
    return out


@pytest.mark.parametrize("schedule", ["parabolic_decay", "beta"])
def test_resume_is_exact(tmp_path, schedule):
    raw = lt_config(epochs=4, bbn={"alpha_schedule": schedule})
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    full = fit(raw, straight, progress=False, plugins=plugins())
    half = fit(raw, parted, until=2, progress=False, plugins=plugins())
    assert half.final == {}
    saved = tomllib.loads((parted / "config.toml").read_text())
    assert saved["bbn"]["alpha_schedule"] == schedule
    resumed = fit(saved, parted, resume=True, progress=False, plugins=plugins())

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["methods"]["bbn"] == b["methods"]["bbn"]
    assert comparable(straight) == comparable(parted)
    assert json.dumps(full.final, sort_keys=True) == json.dumps(resumed.final, sort_keys=True)
    alphas = [r["bbn/alpha"] for r in read_lines(straight) if r["kind"] == "epoch"]
    assert len(alphas) == 4
    if schedule == "parabolic_decay":
        assert alphas == [1.0, 0.9375, 0.75, 0.4375]
        assert a["methods"]["bbn"]["alpha"] == 0.4375
    else:
        assert all(0 <= v <= 1 for v in alphas) and len(set(alphas)) == 4


def test_fit_logs_alpha_and_evaluates_from_the_checkpoint(tmp_path):
    raw = lt_config(epochs=3, bbn={"alpha_schedule": "linear_decay", "sampler": "balanced"})
    result = fit(raw, tmp_path / "run", progress=False, plugins=plugins())
    lines = read_lines(tmp_path / "run")
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["bbn/alpha"] for r in epochs] == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert all("train/bbn" in r and math.isfinite(r["train/bbn"]) for r in epochs)
    assert lines[-1]["kind"] == "final" and 0 <= lines[-1]["test/top1"] <= 1
    # what `batchkin eval` does: rebuild from the saved config, restore, evaluate at alpha = 0.5
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["methods"] == ["bbn"] and saved["bbn"]["sampler"] == "balanced"
    with torch.random.fork_rng():
        state = prepare(saved, plugins())
        restore(state, load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt"))
        from batchkin.data import DeviceData

        test = evaluate(state, "test", DeviceData(state.splits.test, state.splits, state.device))
    assert test["top1"] == result.final["test/top1"]
    assert test["per_class"] == result.final["test/per_class"]


def test_sampler_draws_the_training_split_of_a_long_tailed_set():
    raw = lt_config(data={"synthetic_per_class": 40, "batch_size": 4})
    p = plugins()
    cfg = build_config(raw, p.registry.methods)
    splits = make_splits(p.dataset(cfg.data.name).obj(cfg.data), cfg.data)
    counts = splits.train_counts()
    assert counts.tolist()[0] > counts.tolist()[-1]  # long-tailed
    with torch.random.fork_rng():
        state = prepare(raw, p)
    s = state.sampler
    assert isinstance(s, bbn.BBNSampler) and len(s) == len(splits.train) // 4
    rev = []
    for epoch in range(1, 41):
        s.set_epoch(epoch)
        rev += [st["rev"] for st in s]
    rev = torch.cat(rev)
    assert chisquare_p(rev, splits.train.y, class_probabilities(counts, "reversed")) > 1e-3


# ------------------------------------------------------------------------------ conflicts and bad options


def test_another_sampler_owner_is_refused():
    class OwnSampler(Method):
        @hookimpl
        def build_sampler(self, state):
            return None

    mod = types.ModuleType("own_sampler")
    mod.register_methods = hookimpl(lambda register: register("own_sampler", OwnSampler))
    for methods, first, second in ((["bbn", "own_sampler"], "bbn", "own_sampler"),
                                   (["own_sampler", "bbn"], "own_sampler", "bbn")):
        message = rf"methods '{first}' and '{second}' conflict: both provide build_sampler"
        with pytest.raises(PluginError, match=message):
            prepare(lt_config(methods=methods), plugins(mod))


def test_bbn_with_ce_is_refused():
    with pytest.raises(ConfigError, match="both 'bbn' and 'ce'.*remove 'ce'"):
        prepare(lt_config(methods=["bbn", "ce"]), plugins())


@pytest.mark.parametrize("table,message", [
    ({"alpha_schedule": "parabolic"}, r"bbn\.alpha_schedule must be one of .*'parabolic_decay'"),
    ({"alpha_schedule": 1}, r"bbn\.alpha_schedule must be one of"),
    ({"sampler": "reverse"},
     r"bbn\.sampler must be one of 'reversed', 'balanced', 'instance'; got 'reverse' \(did you mean 'reversed'\?\)"),
    ({"beta": 0.0}, r"bbn\.beta must be > 0.0; got 0.0"),
    ({"alpha_epochs": -1}, r"bbn\.alpha_epochs must be >= 0; got -1"),
    ({"beta": "x"}, r"bbn\.beta must be a number"),
    ({"fused": "yes"}, r"bbn\.fused must be true or false"),
    ({"fusd": True}, r"unknown config key bbn\.fusd \(did you mean 'fused'\?\)"),
])
def test_bad_options_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        prepare(lt_config(bbn=table), plugins())


def test_models_without_trunk_are_refused():
    raw = lt_config(model={"name": "vit", "dim": 16, "depth": 1, "heads": 2, "stem_channels": 4})
    with pytest.raises(ConfigError, match=r"model\.name = 'vit'"):
        prepare(raw, plugins())
    with pytest.raises(ConfigError, match=r"model\.name = 'tiny'"):
        prepare(lt_config(model={"name": "tiny", "width": 4}), plugins())


def test_registered_like_a_third_party_method():
    p = plugins()
    entry = p.method("bbn")
    assert entry.obj is bbn.BBN
    assert set(p.method_hooks("bbn")) == {"configure", "wrap_model", "build_sampler", "on_epoch_start",
                                          "transform_batch", "forward", "loss_terms", "on_epoch_end"}


# ------------------------------------------------------------------------------ the shipped configs

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def load_config(name: str) -> dict:
    return tomllib.loads((CONFIGS / name).read_text())


@pytest.mark.parametrize("bbn_file,ce_file", [("bbn_digits.toml", "ce_digits_lt.toml"),
                                              ("bbn_fashion_mnist_lt.toml", "fashion_mnist_lt.toml")])
def test_result_configs_differ_from_their_baseline_only_in_the_method(bbn_file, ce_file):
    from batchkin.schema import parse

    p = plugins()
    b, c = load_config(bbn_file), load_config(ce_file)
    assert b["methods"] == ["bbn"] and c["methods"] == ["ce"]
    parse(bbn.BBN.Options, b["bbn"], "bbn")  # the table is valid
    strip = lambda raw: {k: v for k, v in raw.items() if k not in ("methods", "bbn")}  # noqa: E731
    assert strip(b) == strip(c)
    build_config(b, p.registry.methods)
    build_config(c, p.registry.methods)


def test_quick_digits_config_runs_one_epoch(tmp_path):
    raw = load_config("bbn_digits.toml")
    raw["epochs"] = 1
    result = fit(raw, tmp_path / "digits", progress=False, plugins=plugins())
    lines = read_lines(tmp_path / "digits")
    assert lines[0]["bbn/alpha"] == 1.0 and lines[0]["step"] == result.state.steps_per_epoch
    assert isinstance(result.state.model, bbn.BilateralNet)
    assert lines[-1]["kind"] == "final" and lines[-1]["test/top1"] == result.final["test/top1"]
    assert math.isfinite(lines[0]["train/bbn"])
