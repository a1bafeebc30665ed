"""DRLoc: the lambda schedule by hand, head shapes, losses on hand-worked inputs and against
plain reference computations, the fused first layer, the draw (statistics, keys), the
global RNG left alone, heads absent from evaluation, training through the engine on the
small ViT (H != W) and the hierarchical model (multi-scale), exact resume, bad options,
non-grid models and the shipped configs.

(The pair-sampling op itself is tested in tests/kernels/test_drloc_pairs.py.)
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import batchkin.plugins.drloc as drloc
from batchkin.config import build_config
from batchkin.data import DeviceData
from batchkin.errors import ConfigError
from batchkin.kernels.drloc_pairs import drloc_positions_reference
from batchkin.kernels.rng import derive_key
from batchkin.plugin import Plugins
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import evaluate, fit, prepare, train_step

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plugins() -> Plugins:
    return Plugins(extra_modules=[drloc])


VIT = {"name": "vit", "dim": 16, "depth": 1, "heads": 2, "stem_channels": 4}
HIER = {"name": "vit_hier", "dim": 8, "depths": [1, 1, 1], "heads": 2, "stem_channels": 4}


def grid_config(model=None, drloc_table=None, **tables) -> dict:
    """A tiny run on synthetic 1x8x12 images (an 8x12 token grid: H != W), 4 classes."""
    raw = tiny_config(["ce", "drloc"], data={"synthetic_shape": [1, 8, 12], "batch_size": 8},
                      model=dict(model or VIT),
                      drloc={"hidden": 16, "m": 16, "warmup_epochs": 0, "lambda0": 0.5, **(drloc_table or {})})
    for key, value in tables.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def token_grid(B, C, H, W, seed=0, requires_grad=False):
    """A [B, C, H, W] grid laid out as ViT tokens (a channels-last view of [B, H*W, C])."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(B, H * W, C, generator=g).requires_grad_(requires_grad)
    return tokens, tokens.transpose(1, 2).unflatten(2, (H, W))


def val(t) -> float:
    return t.detach().item() if isinstance(t, torch.Tensor) else float(t)


def gen(seed=0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------ lambda schedule


def test_warmup_decay_by_hand_ends_at_the_runs_real_last_epoch():
    # E = 30, warm-up 20, lambda0 = 0.5: t = e - 1; 0.5 t / 20 while t < 20, then 0.5 (1 - (t - 20) / 10)
    got = {e: drloc.drloc_lambda(e, 30, "warmup_decay", lambda0=0.5, warmup_epochs=20) for e in range(1, 31)}
    assert got[1] == 0.0
    assert got[2] == pytest.approx(0.025)
    assert got[11] == pytest.approx(0.25)
    assert got[20] == pytest.approx(0.475)
    assert got[21] == pytest.approx(0.5)  # the peak, at t = warm-up
    assert got[22] == pytest.approx(0.45)
    assert got[26] == pytest.approx(0.25)
    assert got[30] == pytest.approx(0.05)  # the last epoch: lambda0 / (E - warm-up); 0 is reached at t = E
    assert max(got.values()) == got[21]
    # the decay spans the real run: a 300-epoch schedule would still be near its peak at epoch 30
    assert got[30] < drloc.drloc_lambda(30, 300, lambda0=0.5, warmup_epochs=20)


def test_warmup_is_clipped_to_the_run_and_zero_warmup_decays_from_the_start():
    assert [drloc.drloc_lambda(e, 5, lambda0=0.5, warmup_epochs=20) for e in range(1, 6)] == \
        pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])
    assert [drloc.drloc_lambda(e, 4, lambda0=1.0, warmup_epochs=0) for e in range(1, 5)] == \
        pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert drloc.drloc_lambda(1, 1, lambda0=0.3, warmup_epochs=0) == pytest.approx(0.3)


def test_constant_schedule():
    assert [drloc.drloc_lambda(e, 7, "constant", lambda0=0.2, warmup_epochs=3) for e in range(1, 8)] == [0.2] * 7


def test_lambda_bad_arguments():
    with pytest.raises(ValueError, match="epoch must lie in"):
        drloc.drloc_lambda(0, 5)
    with pytest.raises(ValueError, match="epoch must lie in"):
        drloc.drloc_lambda(6, 5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        drloc.drloc_lambda(1, 5, "cosine")
    with pytest.raises(ValueError, match="lambda0"):
        drloc.drloc_lambda(1, 5, lambda0=-0.1)
    with pytest.raises(ValueError, match="warmup_epochs"):
        drloc.drloc_lambda(1, 5, warmup_epochs=-1)
    with pytest.raises(TypeError, match="epoch must be an int"):
        drloc.drloc_lambda(1.0, 5)


# ------------------------------------------------------------------------------ heads


@pytest.mark.parametrize("H,W", [(4, 4), (3, 5), (6, 1)])
@pytest.mark.parametrize("kind", drloc.HEADS)
@pytest.mark.parametrize("mode", drloc.MODES)
def test_head_output_shapes(kind, mode, H, W):
    B, C, m = 2, 6, 7
    head = drloc.DRLocHead(C, kind, mode, (H, W), hidden=10, generator=gen())
    _, grid = token_grid(B, C, H, W)
    pos = drloc_positions_reference(B, m, H, W, key=3)
    pred = head(grid, pos)
    if kind == "l1":
        assert pred.shape == (B, m, 2)
    else:
        bins = (H, W) if mode == "abs" else (2 * H - 1, 2 * W - 1)
        row, col = pred
        assert row.shape == (B, m, bins[0]) and col.shape == (B, m, bins[1])
        assert head.bins == bins


def test_head_layers_follow_the_spec():
    l1 = drloc.DRLocHead(5, "l1", hidden=12)
    assert (l1.fc1.in_features, l1.fc1.out_features) == (10, 12)
    assert [type(x).__name__ for x in l1.body] == ["ReLU", "Linear", "ReLU"]
    assert (l1.out.in_features, l1.out.out_features) == (12, 2)
    ce = drloc.DRLocHead(5, "ce", "abs", (3, 4), hidden=12)
    # trunk 2C -> h -> ReLU -> h -> ReLU -> h (no ReLU after its last layer), then row / col
    assert [type(x).__name__ for x in ce.body] == ["ReLU", "Linear", "ReLU", "Linear"]
    assert (ce.row.out_features, ce.col.out_features) == (3, 4)
    assert drloc.DRLocHead(5, "cbr", "signed", (3, 4), hidden=12).bins == (5, 7)
    assert drloc.DRLocHead(5).hidden == 512  # the paper's width by default


def test_head_initialisation_comes_from_the_generator_only():
    a = drloc.DRLocHead(4, "ce", "abs", (3, 3), hidden=8, generator=gen(5))
    b = drloc.DRLocHead(4, "ce", "abs", (3, 3), hidden=8, generator=gen(5))
    c = drloc.DRLocHead(4, "ce", "abs", (3, 3), hidden=8, generator=gen(6))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["fc1.weight"], sc["fc1.weight"])
    bound = 1 / math.sqrt(8)  # PyTorch's default Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert val(sa["fc1.weight"].abs().max()) <= bound and val(sa["fc1.bias"].abs().max()) <= bound


def test_head_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"):
        drloc.DRLocHead(4, "l2")
    with pytest.raises(ValueError, match="mode must be one of"):
        drloc.DRLocHead(4, "l1", "absolute")
    with pytest.raises(ValueError, match="needs grid_size"):
        drloc.DRLocHead(4, "ce")
    with pytest.raises(ValueError, match="hidden must be"):
        drloc.DRLocHead(4, hidden=0)
    head = drloc.DRLocHead(4, "ce", "abs", (3, 3), hidden=8)
    pos = drloc_positions_reference(1, 2, 3, 4, key=0)
    with pytest.raises(ValueError, match="bins for a 3x3 grid; got a 3x4 grid"):
        head(token_grid(1, 4, 3, 4)[1], pos)
    with pytest.raises(ValueError, match=r"grid must be \[B, 4, H, W\]"):
        head(token_grid(1, 5, 3, 3)[1], pos)
    with pytest.raises(ValueError, match="first_layer must be one of"):
        head(token_grid(1, 4, 3, 3)[1], drloc_positions_reference(1, 2, 3, 3, key=0), "fused")


# ------------------------------------------------------------------------------ losses by hand


def test_l1_loss_hand_worked():
    pred = torch.tensor([[[1.0, 2.0], [3.0, 5.0]]])
    targets = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    assert val(drloc.drloc_l1_loss(pred, targets)) == pytest.approx((1 + 0 + 2 + 4) / 4)
    with pytest.raises(ValueError, match="same shape"):
        drloc.drloc_l1_loss(pred, targets[..., :1])


def test_ce_loss_hand_worked():
    # one pair; rows: 3 bins, logits (0, ln 3, 0) -> p = (1/5, 3/5, 1/5), target 1;
    # cols: 2 bins, logits (0, 0), target 0 -> ln 2
    row = torch.tensor([[[0.0, math.log(3.0), 0.0]]])
    col = torch.tensor([[[0.0, 0.0]]])
    targets = torch.tensor([[[1.0, 0.0]]])
    assert val(drloc.drloc_ce_loss(row, col, targets)) == pytest.approx(math.log(5 / 3) + math.log(2), rel=1e-6)
    # a mean over the pairs: a second pair with the same row and a certain column adds nothing to the col CE
    row2 = torch.cat([row, row], dim=1)
    col2 = torch.tensor([[[0.0, 0.0], [0.0, 100.0]]])
    t2 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    assert val(drloc.drloc_ce_loss(row2, col2, t2)) == pytest.approx(math.log(5 / 3) + math.log(2) / 2, rel=1e-6)


def test_cbr_loss_hand_worked():
    # rows: 2 bins, logits (0, 0): beta = (1/2, 1/2), mu = 1/2, var = 1/4, target 1 -> (1/2)^2 / (1/4) = 1
    # cols: 3 bins, logits (0, ln 2, 0): beta = (1/4, 1/2, 1/4), mu = 1, var = 1/2, target 2 -> 1 / (1/2) = 2
    row = torch.tensor([[[0.0, 0.0]]])
    col = torch.tensor([[[0.0, math.log(2.0), 0.0]]])
    targets = torch.tensor([[[1.0, 2.0]]])
    eps = drloc.CBR_EPS
    expected = (0.25 / (0.25 + eps) + 0.001 * math.log(0.25 + eps)) + (1 / (0.5 + eps) + 0.001 * math.log(0.5 + eps))
    assert val(drloc.drloc_cbr_loss(row, col, targets)) == pytest.approx(expected, rel=1e-6)


def _cbr_reference(logits, t):
    """The cbr term written out one pair at a time in float64."""
    total = 0.0
    for z, tt in zip(logits.reshape(-1, logits.shape[-1]).double(), t.reshape(-1).double()):
        beta = torch.softmax(z, 0)
        k = torch.arange(len(z), dtype=torch.float64)
        mu = val((beta * k).sum())
        var = val((beta * (k - mu) ** 2).sum()) + 1e-8
        total += (mu - val(tt)) ** 2 / var + 0.001 * math.log(var)
    return total / t.numel()


def test_ce_and_cbr_losses_equal_plain_reference_computations():
    g = gen(1)
    row, col = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 7, generator=g)
    t = torch.stack([torch.randint(0, 4, (2, 5), generator=g), torch.randint(0, 7, (2, 5), generator=g)], -1).float()
    ce = sum(-F.log_softmax(z.double(), -1).gather(-1, tt.long().unsqueeze(-1)).mean()
             for z, tt in ((row, t[..., 0]), (col, t[..., 1])))
    assert val(drloc.drloc_ce_loss(row, col, t)) == pytest.approx(val(ce), rel=1e-5)
    cbr = _cbr_reference(row, t[..., 0]) + _cbr_reference(col, t[..., 1])
    assert val(drloc.drloc_cbr_loss(row, col, t)) == pytest.approx(cbr, rel=1e-5)


def _constant_head(kind, mode, grid_size, channels=3, out_bias=(1.0, 2.0)):
    """A head whose every weight is zero: its prediction does not depend on the pair."""
    head = drloc.DRLocHead(channels, kind, mode, grid_size, hidden=4)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        if kind == "l1":
            head.out.bias.copy_(torch.tensor(out_bias))
    return head


def test_drloc_loss_hand_worked_cases():
    _, grid11 = token_grid(2, 3, 1, 1)
    # 1x1 grid: every target is 0 (both modes), the l1 head predicts (1, 2): loss (1 + 2) / 2
    for mode in drloc.MODES:
        assert val(drloc.drloc_loss(grid11, _constant_head("l1", mode, (1, 1)), 8, gen())) == pytest.approx(1.5)
    # uniform logits: CE = ln(bins_h) + ln(bins_w), whatever the pairs
    _, grid = token_grid(2, 3, 3, 5)
    ce_abs = drloc.drloc_loss(grid, _constant_head("ce", "abs", (3, 5)), 8, gen())
    assert val(ce_abs) == pytest.approx(math.log(3) + math.log(5), rel=1e-6)
    ce_signed = drloc.drloc_loss(grid, _constant_head("ce", "signed", (3, 5)), 8, gen())
    assert val(ce_signed) == pytest.approx(math.log(5) + math.log(9), rel=1e-6)
    # cbr, 1x2 grid, uniform bins: rows (1 bin) mu = 0 = t, var = 1e-8 -> 0.001 ln 1e-8;
    # cols (2 bins) mu = 1/2, var = 1/4, t in {0, 1} -> (1/4) / (1/4) + 0.001 ln(1/4)
    _, grid12 = token_grid(2, 3, 1, 2)
    cbr = drloc.drloc_loss(grid12, _constant_head("cbr", "abs", (1, 2)), 8, gen())
    eps = drloc.CBR_EPS
    expected = 0.001 * math.log(eps) + 0.25 / (0.25 + eps) + 0.001 * math.log(0.25 + eps)
    assert val(cbr) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind,mode,normalize", [("l1", "abs", False), ("l1", "signed", True), ("ce", "signed", False),
                                                 ("cbr", "abs", False)])
def test_drloc_loss_equals_the_plain_computation(kind, mode, normalize):
    B, C, H, W, m, key = 3, 6, 4, 7, 9, 12345
    head = drloc.DRLocHead(C, kind, mode, (H, W), hidden=16, generator=gen(2))
    _, grid = token_grid(B, C, H, W, seed=4)
    got = drloc.drloc_loss(grid, head, m, key, normalize=normalize)
    # by hand: the documented draw, indexing, concatenation, the plain head and the targets' formula
    pos = drloc_positions_reference(B, m, H, W, key)
    b = torch.arange(B).view(B, 1)
    pairs = torch.cat([grid[b, :, pos[..., 0], pos[..., 1]], grid[b, :, pos[..., 2], pos[..., 3]]], -1)
    delta = (pos[..., 0:2] - pos[..., 2:4]).float()
    size = torch.tensor([H, W], dtype=torch.float32)
    t = delta.abs() if mode == "abs" else delta + size - 1
    if normalize:
        t = t / (size - 1)
    pred = head.predict(pairs)
    if kind == "l1":
        expected = (pred - t).abs().mean()
    elif kind == "ce":
        expected = F.cross_entropy(pred[0].reshape(-1, 2 * H - 1), t[..., 0].reshape(-1).long()) + \
            F.cross_entropy(pred[1].reshape(-1, 2 * W - 1), t[..., 1].reshape(-1).long())
    else:
        expected = _cbr_reference(pred[0].detach(), t[..., 0]) + _cbr_reference(pred[1].detach(), t[..., 1])
    assert val(got) == pytest.approx(val(expected), rel=1e-5)


def test_multiscale_loss_is_the_sum_over_stages():
    g = [token_grid(2, 4, 6, 8, seed=1)[1], token_grid(2, 8, 3, 4, seed=2)[1]]
    heads = torch.nn.ModuleList([drloc.DRLocHead(4, "ce", "abs", (6, 8), hidden=8, generator=gen(1)),
                                 drloc.DRLocHead(8, "ce", "abs", (3, 4), hidden=8, generator=gen(2))])
    total = drloc.drloc_loss(g, heads, 5, [11, 22])
    parts = drloc.drloc_loss(g[0], heads[0], 5, 11) + drloc.drloc_loss(g[1], heads[1], 5, 22)
    assert val(total) == pytest.approx(val(parts), rel=1e-6)
    # an int key is folded with each grid's index
    folded = drloc.drloc_loss(g, heads, 5, 7)
    by_hand = sum(drloc.drloc_loss(g[s], heads[s], 5, derive_key(7, s)) for s in range(2))
    assert val(folded) == pytest.approx(val(by_hand), rel=1e-6)


def test_drloc_loss_bad_arguments():
    _, grid = token_grid(1, 3, 3, 3)
    l1 = drloc.DRLocHead(3, "l1", hidden=4)
    ce = drloc.DRLocHead(3, "ce", "abs", (3, 3), hidden=4)
    with pytest.raises(ValueError, match="normalize applies to the l1 head only"):
        drloc.drloc_loss(grid, ce, 4, 0, normalize=True)
    with pytest.raises(ValueError, match="does not match the 'ce' head's bins"):
        drloc.drloc_loss(grid, ce, 4, 0, "signed")
    with pytest.raises(ValueError, match="m must be"):
        drloc.drloc_loss(grid, l1, 0, 0)
    with pytest.raises(ValueError, match="one head per grid"):
        drloc.drloc_loss([grid, grid], l1, 4, 0)
    with pytest.raises(TypeError, match="generator must be"):
        drloc.drloc_loss(grid, l1, 4, None)
    with pytest.raises(ValueError, match="got 1 keys for 2 grids"):
        drloc.drloc_loss([grid, grid], [l1, l1], 4, [0])
    with pytest.raises(TypeError, match="must be a DRLocHead"):
        drloc.drloc_loss(grid, torch.nn.Linear(6, 2), 4, 0)


# ------------------------------------------------------------------------------ fused first layer


@pytest.mark.parametrize(
    "m,strategy",
    [(40, "auto"), (40, "project"), (40, "unique"), (5, "auto"), (5, "gather"), (5, "project"), (5, "unique")],
)
@pytest.mark.parametrize("kind", ["l1", "ce"])
def test_fused_first_layer_equals_the_plain_head(kind, m, strategy):
    B, C, H, W = 2, 5, 4, 6  # H * W = 24: m = 40 repeats tokens, m = 5 mostly does not
    pos = drloc_positions_reference(B, m, H, W, key=99)
    outs, grads = [], []
    for fused in (True, False):
        head = drloc.DRLocHead(C, kind, "abs", (H, W), hidden=8, generator=gen(3))
        tokens, grid = token_grid(B, C, H, W, seed=5, requires_grad=True)
        if fused:
            pred = head(grid, pos, strategy)
        else:
            b = torch.arange(B).view(B, 1)
            pred = head.predict(torch.cat([grid[b, :, pos[..., 0], pos[..., 1]],
                                           grid[b, :, pos[..., 2], pos[..., 3]]], -1))
        pred = pred if kind == "l1" else torch.cat(pred, -1)
        (pred * torch.linspace(-1, 1, pred.shape[-1])).sum().backward()
        outs.append(pred.detach())
        grads.append([tokens.grad] + [p.grad for p in head.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_drloc_loss_is_the_same_for_every_first_layer_strategy():
    head = drloc.DRLocHead(4, "cbr", "signed", (3, 5), hidden=8, generator=gen(0))
    _, grid = token_grid(2, 4, 3, 5)
    losses = [val(drloc.drloc_loss(grid, head, 20, 5, first_layer=s)) for s in drloc.FIRST_LAYER]
    assert losses == pytest.approx([losses[0]] * len(drloc.FIRST_LAYER), rel=1e-6)


# ------------------------------------------------------------------------------ the draw


def test_pairs_are_uniform_and_independent_through_drloc_loss():
    # a zero l1 head predicting 0: the loss is mean(|dr|, |dc|) over the draws; for independent
    # uniform rows in [0, H), E|dr| = (H^2 - 1) / (3 H) (and the same for columns in [0, W))
    H, W, B, m = 8, 12, 4, 4096
    head = _constant_head("l1", "abs", (H, W), out_bias=(0.0, 0.0))
    _, grid = token_grid(B, 3, H, W)
    expected = ((H * H - 1) / (3 * H) + (W * W - 1) / (3 * W)) / 2
    g = gen(2024)
    values = torch.tensor([val(drloc.drloc_loss(grid, head, m, g)) for _ in range(5)])
    # each value averages 2 * B * m draws; the sd of |dc| is below W / 3: a 5-sigma bound on the mean of 5
    bound = 5 * (W / 3) / math.sqrt(2 * B * m * 5)
    assert abs(val(values.mean()) - expected) < bound
    assert len(set(values.tolist())) == 5  # every call draws new pairs from the generator


def test_the_same_generator_state_gives_the_same_loss():
    head = drloc.DRLocHead(4, "l1", hidden=8, generator=gen(0))
    _, grid = token_grid(2, 4, 5, 3)
    assert torch.equal(drloc.drloc_loss(grid, head, 16, gen(7)), drloc.drloc_loss(grid, head, 16, gen(7)))
    assert not torch.equal(drloc.drloc_loss(grid, head, 16, gen(7)), drloc.drloc_loss(grid, head, 16, gen(8)))


# ------------------------------------------------------------------------------ global RNG


def test_functional_twin_leaves_the_global_rng_alone():
    torch.manual_seed(4321)
    before, seed = torch.get_rng_state().clone(), torch.initial_seed()
    head = drloc.DRLocHead(4, "ce", "signed", (3, 5), hidden=8, generator=gen(0))
    tokens, grid = token_grid(2, 4, 3, 5, requires_grad=True)
    drloc.drloc_loss(grid, head, 16, gen(1)).backward()
    drloc.drloc_loss([grid], [head], 16, 3).backward()
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == seed


def test_import_leaves_the_global_rng_alone():
    code = (
        "import torch; torch.manual_seed(777); s = torch.get_rng_state().clone()\n"
        "import batchkin.plugins.drloc\n"
        "assert torch.initial_seed() == 777, torch.initial_seed()\n"
        "assert torch.equal(torch.get_rng_state(), s)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("model,table", [(VIT, {"head": "l1"}), (HIER, {"head": "ce", "multiscale": True})])
def test_training_steps_leave_the_global_rng_alone(model, table):
    # no fork_rng here (run_plugin forks): prepare + real training steps in the caller's RNG
    torch.manual_seed(1234)
    before, seed = torch.get_rng_state().clone(), torch.initial_seed()
    state = prepare(grid_config(model, table), plugins())
    state.hooks.on_fit_start(state=state)
    state.epoch = 1
    state.sampler.set_epoch(1)
    state.hooks.on_epoch_start(state=state)
    state.model.train()
    for _, indices in zip(range(2), state.sampler):
        train_step(state, indices)
    assert "drloc" in state.loss_terms and val(state.loss_terms["drloc"]) > 0
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == seed
    # and through run_plugin, the helper plugin authors use
    run_plugin(["ce", "drloc"], steps=2, config=grid_config(model, table), plugin_modules=[drloc])
    assert torch.equal(torch.get_rng_state(), before) and torch.initial_seed() == seed


# ------------------------------------------------------------------------------ through the engine


def test_one_step_matches_the_functional_twin():
    raw = grid_config(drloc_table={"head": "cbr", "mode": "signed", "lambda0": 0.3, "warmup_epochs": 2}, epochs=6)
    with torch.random.fork_rng():
        state = prepare(raw, plugins())
        method = state.hooks.methods["drloc"]
        state.epoch = 4
        state.hooks.on_epoch_start(state=state)
        assert method.lam == pytest.approx(0.3 * (1 - (3 - 2) / (6 - 2)))
        assert state.epoch_metrics["drloc/lambda"] == method.lam
        state.step = 17
        state.training = True
        x = torch.randn(5, 1, 8, 12, generator=gen(3))
        state.batch = {"x": x, "y": torch.zeros(5, dtype=torch.int64)}
        outputs = state.hooks.forward(state=state)
        g = state.generator("drloc", "cpu")
        saved = g.get_state()
        term = method.loss_terms(state=state, outputs=outputs)["drloc"]
    assert outputs["grid"].shape == (5, 16, 8, 12)
    replay = torch.Generator().set_state(saved)
    seed = int(torch.randint(0, 2**32, (1,), generator=replay, dtype=torch.int64))
    heads = state.model.drloc
    assert list(heads) == ["grid"] and heads["grid"].kind == "cbr" and heads["grid"].bins == (15, 23)
    expected = drloc.drloc_loss(outputs["grid"], heads["grid"], 16, derive_key(seed, 17, 0, 0))
    assert val(term) == pytest.approx(method.lam * val(expected), rel=1e-6)


def test_heads_never_run_in_evaluation():
    with torch.random.fork_rng():
        state = prepare(grid_config(HIER, {"multiscale": True}), plugins())
        heads = state.model.drloc
        assert list(heads) == ["0", "1", "2"]
        calls = []
        for name, head in heads.items():
            head.register_forward_hook(lambda mod, args, out, name=name: calls.append(name))
        val = DeviceData(state.splits.val, state.splits, state.device)
        evaluate(state, "val", val)
        assert calls == []
        state.hooks.on_fit_start(state=state)
        state.epoch = 1
        state.sampler.set_epoch(1)
        state.hooks.on_epoch_start(state=state)
        state.model.train()
        train_step(state, next(iter(state.sampler)))
        assert calls == ["0", "1", "2"]
        evaluate(state, "val", val)
        assert calls == ["0", "1", "2"]
        assert set(state.loss_terms) == {"ce", "drloc"}


def test_heads_are_part_of_the_model_and_the_optimizer():
    with torch.random.fork_rng():
        state = prepare(grid_config(), plugins())
    params = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    head_params = list(state.model.drloc.parameters())
    assert head_params and all(id(p) in params for p in head_params)
    assert any(k.startswith("drloc.grid.fc1") for k in state.model.state_dict())


def read_lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.parametrize("model,table", [
    (VIT, {"head": "l1", "normalize": True}),
    (HIER, {"head": "ce", "mode": "signed", "multiscale": True}),
])
def test_fit_completes_and_logs(tmp_path, model, table):
    raw = grid_config(model, {**table, "warmup_epochs": 1}, epochs=2)
    result = fit(raw, tmp_path / "run", progress=False, plugins=plugins())
    lines = read_lines(tmp_path / "run")
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["drloc/lambda"] for r in epochs] == pytest.approx([0.0, 0.5])
    assert all(math.isfinite(r["drloc/loss"]) and r["drloc/loss"] > 0 for r in epochs)
    assert epochs[0]["train/drloc"] == 0.0 and epochs[1]["train/drloc"] > 0
    assert lines[-1]["kind"] == "final" and 0 <= result.final["test/top1"] <= 1
    saved = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert saved["methods"] == ["ce", "drloc"] and saved["drloc"]["head"] == table["head"]


def comparable(run) -> list[str]:
    out = []
    for r in read_lines(run):
        r.pop("images_per_s", None)
        out.append(json.dumps(r, sort_keys=True))
    return out


@pytest.mark.parametrize("model,table", [(VIT, {"head": "ce"}), (HIER, {"head": "l1", "multiscale": True})])
def test_resume_is_exact(tmp_path, model, table):
    raw = grid_config(model, {**table, "warmup_epochs": 2}, epochs=4)
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    full = fit(raw, straight, progress=False, plugins=plugins())
    half = fit(raw, parted, until=2, progress=False, plugins=plugins())
    assert half.final == {}
    saved = tomllib.loads((parted / "config.toml").read_text())
    resumed = fit(saved, parted, resume=True, progress=False, plugins=plugins())
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys() and any(k.startswith("drloc.") for k in a["model"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["generators"]["drloc@cpu"], b["generators"]["drloc@cpu"])
    assert comparable(straight) == comparable(parted)
    assert json.dumps(full.final, sort_keys=True) == json.dumps(resumed.final, sort_keys=True)
    lambdas = [r["drloc/lambda"] for r in read_lines(straight) if r["kind"] == "epoch"]
    assert lambdas == pytest.approx([0.0, 0.25, 0.5, 0.25])
    assert a["methods"]["drloc"] == {"lambda": pytest.approx(0.25)}


# ------------------------------------------------------------------------------ the hierarchical model


def test_hierarchical_model_grids():
    model = drloc.HierViT(drloc.HierViTOptions(dim=8, depths=[1, 2, 1], heads=2, stem_channels=4), 3, 1, (7, 10))
    assert model.grid_sizes == [(7, 10), (4, 5), (2, 3)]
    assert drloc.token_grids(model, (1, 7, 10)) == [(8, 7, 10), (16, 4, 5), (32, 2, 3)]
    out = model.forward_features(torch.randn(2, 1, 7, 10, generator=gen()))
    assert [tuple(g.shape) for g in out["grids"]] == [(2, 8, 7, 10), (2, 16, 4, 5), (2, 32, 2, 3)]
    assert out["grid"] is out["grids"][-1] and out["features"].shape == (2, 32)
    # the grids are views of the stages' tokens, not copies
    assert all(g._base is not None for g in out["grids"])
    assert model(torch.randn(2, 1, 7, 10, generator=gen())).shape == (2, 3)


def test_token_grids_of_registered_models():
    vit = prepare(grid_config(), plugins()).model
    assert drloc.token_grids(vit, (1, 8, 12)) == [(16, 8, 12)]
    tiny = prepare(tiny_config(), plugins()).model
    assert drloc.token_grids(tiny, (1, 8, 8)) is None


def test_token_grid_probe_keeps_batchnorm_statistics_and_mode():
    model = drloc.HierViT(drloc.HierViTOptions(dim=8, depths=[1], heads=2, stem_channels=4), 3, 1, (4, 4))
    model.train()
    bn = model.stem[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    drloc.token_grids(model, (1, 4, 4))
    assert model.training and torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]


# ------------------------------------------------------------------------------ bad configs


@pytest.mark.parametrize("table,message", [
    ({"head": "l2"}, r"drloc\.head must be one of 'l1', 'ce', 'cbr'; got 'l2'"),
    ({"mode": "absolute"}, r"drloc\.mode must be one of 'abs', 'signed'"),
    ({"m": 0}, r"drloc\.m must be >= 1; got 0"),
    ({"m": 2.5}, r"drloc\.m must be an integer"),
    ({"hidden": 0}, r"drloc\.hidden must be >= 1"),
    ({"lambda0": -0.5}, r"drloc\.lambda0 must be >= 0.0"),
    ({"warmup_epochs": -1}, r"drloc\.warmup_epochs must be >= 0"),
    ({"schedule": "cosine"}, r"drloc\.schedule must be one of 'warmup_decay', 'constant'"),
    ({"first_layer": "fused"}, r"drloc\.first_layer must be one of 'auto', 'project', 'gather', 'unique'"),
    ({"normalize": "yes"}, r"drloc\.normalize must be true or false"),
    ({"head": "ce", "normalize": True}, r"drloc\.normalize = true applies to the l1 head only"),
    ({"head": "cbr", "normalize": True}, r"drloc\.normalize = true applies to the l1 head only"),
    ({"multiscal": True}, r"unknown config key drloc\.multiscal \(did you mean 'multiscale'\?\)"),
])
def test_bad_options_name_the_key(table, message):
    with pytest.raises(ConfigError, match=message):
        prepare(grid_config(drloc_table=table), plugins())


@pytest.mark.parametrize("model,name", [({"name": "tiny", "width": 4}, "tiny"),
                                        ({"name": "resnet8", "width": 4}, "resnet8")])
def test_models_without_a_token_grid_are_refused(model, name):
    with pytest.raises(ConfigError, match=rf"drloc needs a model .* token grid .*model\.name = '{name}' does not"):
        prepare(grid_config(model), plugins())


def test_bad_hierarchical_model_options():
    with pytest.raises(ConfigError, match=r"model\.dim \(10\) must be divisible by heads \(4\)"):
        prepare(grid_config({**HIER, "dim": 10, "heads": 4}), plugins())
    with pytest.raises(ConfigError, match=r"model\.depths must list at least one stage"):
        prepare(grid_config({**HIER, "depths": []}), plugins())


def test_registered_like_a_third_party_method():
    p = plugins()
    assert p.method("drloc").obj is drloc.DRLoc
    assert set(p.method_hooks("drloc")) == {"wrap_model", "on_epoch_start", "loss_terms", "on_epoch_end"}
    assert p.model("vit_hier").obj is drloc._hier_builder and p.model("vit_hier").options is drloc.HierViTOptions


# ------------------------------------------------------------------------------ the shipped configs


def load_config(name: str) -> dict:
    return tomllib.loads((ROOT / "configs" / name).read_text())


def test_digits_configs_differ_from_their_baseline_only_in_the_method():
    from batchkin.schema import parse

    d, b = load_config("drloc_digits.toml"), load_config("vit_digits.toml")
    assert d["methods"] == ["ce", "drloc"] and b["methods"] == ["ce"]
    parse(drloc.DRLoc.Options, d["drloc"], "drloc")
    strip = lambda raw: {k: v for k, v in raw.items() if k not in ("methods", "drloc")}  # noqa: E731
    assert strip(d) == strip(b)
    p = plugins()
    for raw in (d, b, load_config("drloc_fashion_mnist.toml")):
        build_config(raw, p.registry.methods)
    f = load_config("drloc_fashion_mnist.toml")
    assert f["methods"] == ["ce", "drloc"] and f["data"]["name"] == "fashion_mnist"
    parse(drloc.DRLoc.Options, f["drloc"], "drloc")


def test_quick_digits_config_runs_one_epoch(tmp_path):
    raw = load_config("drloc_digits.toml")
    raw["epochs"] = 1
    result = fit(raw, tmp_path / "digits", progress=False, plugins=plugins())
    lines = read_lines(tmp_path / "digits")
    assert lines[0]["step"] == result.state.steps_per_epoch
    assert "drloc/lambda" in lines[0] and math.isfinite(lines[0]["drloc/loss"])
    assert lines[-1]["kind"] == "final" and lines[-1]["test/top1"] == result.final["test/top1"]
