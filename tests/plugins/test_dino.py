"""The ``dino`` base plugin: teacher temperature, centering, loss, multi-crop, a short run."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from batchkin.errors import ConfigError
from batchkin.plugin import Plugins
from batchkin.plugins import dino, moco, sdmp
from batchkin.plugins.dino import (
    clip_gradients_,
    dino_loss,
    local_crop_size,
    teacher_entropy,
    teacher_probs,
    teacher_temperature,
    update_center,
)
from batchkin.plugins.ssl import (
    DINOHead,
    LocalCrops,
    ViewOptions,
    cosine_momentum,
    make_local_views,
    make_views,
    normalize_views,
    to_uint8,
)
from batchkin.rundir import load_checkpoint
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import fit, prepare, train_step

MODULES = [moco, dino, sdmp]


def dino_config(epochs=1, **tables):
    raw = tiny_config(["dino"], data={"augment": False}, dino={"out_dim": 32, **tables.pop("dino", {})}, **tables)
    raw["epochs"] = epochs
    return raw


def test_teacher_temperature_warmup():
    # 10 epochs, 30% warm-up: linspace(0.04, 0.07, 3) over epochs 1..3, then 0.07
    temps = [teacher_temperature(e, 10) for e in range(1, 11)]
    assert temps[:3] == pytest.approx([0.04, 0.055, 0.07])
    assert temps[3:] == pytest.approx([0.07] * 7)
    # DINO's own schedule: 30 warm-up epochs of 100
    assert teacher_temperature(1, 100) == pytest.approx(0.04)
    assert teacher_temperature(30, 100) == pytest.approx(0.07)
    assert teacher_temperature(16, 100) == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert teacher_temperature(1, 3) == pytest.approx(0.04)  # a single warm-up epoch (linspace of 1)
    assert teacher_temperature(1, 5, warmup_fraction=0.0) == pytest.approx(0.07)


def test_teacher_probs_and_loss_on_a_hand_example():
    t = torch.tensor([[2.0, 0.0, 1.0]])
    c = torch.tensor([[1.0, 0.0, 0.0]])
    p = teacher_probs(t, c, 0.5)
    e = torch.exp(torch.tensor([1.0, 0.0, 1.0]) / 0.5)
    torch.testing.assert_close(p, (e / e.sum()).view(1, 3))
    s1, s2 = torch.tensor([[0.3, -0.2, 0.1]]), torch.tensor([[0.0, 1.0, 0.0]])
    p1, p2 = torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[1.0, 0.0, 0.0]])
    loss = dino_loss([s1, s2], [p1, p2], 0.1)
    # pairs (a=1, b=0) and (a=0, b=1): student of one view vs teacher of the other
    ce = lambda s, q: float(-(q * F.log_softmax(s / 0.1, dim=1)).sum())  # noqa: E731
    assert float(loss) == pytest.approx((ce(s2, p1) + ce(s1, p2)) / 2, rel=1e-6)


def test_update_center_formula():
    center = torch.tensor([[1.0, 2.0]])
    out = torch.tensor([[[0.0, 0.0], [2.0, 4.0]], [[4.0, 0.0], [2.0, 0.0]]])  # [V=2, B=2, K=2]
    update_center(center, out, 0.9)
    torch.testing.assert_close(center, torch.tensor([[0.9 * 1 + 0.1 * 2.0, 0.9 * 2 + 0.1 * 1.0]]))


class FakeWorld:
    """A one-process stand-in for torch.distributed's collectives: ``all_reduce`` adds the
    ``others``' tensors (their row sums, as their ranks would contribute) and logs the call;
    every gather or broadcast fails the test."""

    GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_object", "gather", "broadcast", "reduce_scatter",
               "reduce_scatter_tensor", "all_to_all", "all_to_all_single")

    def __init__(self, monkeypatch, others=None):
        import torch.distributed as dist

        self.calls, self.others = [], others
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)
        for name in self.GATHERS:
            if hasattr(dist, name):
                monkeypatch.setattr(dist, name, self.refuse(name))

    def all_reduce(self, t, op=None, group=None, async_op=False):
        import torch.distributed as dist

        assert op in (None, dist.ReduceOp.SUM)
        self.calls.append(("all_reduce", t.dtype, tuple(t.shape), t.numel() * t.element_size()))
        for other in (self.others if self.others is not None else [t.clone()]):  # default: a twin rank
            t.add_(other)

    @staticmethod
    def refuse(name):
        def call(*args, **kwargs):
            raise AssertionError(f"torch.distributed.{name} was called")
        return call


def test_update_center_under_ddp_all_reduces_the_row_sum(monkeypatch):
    """Two ranks' teacher outputs [V, B, K]: rank 0's centre update all-reduces its float32 [1, K]
    row sum once (no gather) and divides by 2 x V x B: the centre of one process on both."""
    g = torch.Generator().manual_seed(3)
    mine, theirs = torch.randn(2, 5, 7, generator=g), torch.randn(2, 5, 7, generator=g)
    center = torch.randn(1, 7, generator=g)
    world = FakeWorld(monkeypatch, others=[theirs.reshape(-1, 7).sum(0, keepdim=True)])
    got = update_center(center.clone(), mine.half(), 0.9, world_size=2)  # bf16/fp16 outputs: summed in float32
    assert world.calls == [("all_reduce", torch.float32, (1, 7), 4 * 7)]
    one = update_center(center.clone(), torch.cat([mine.half(), theirs], dim=1), 0.9)
    torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-7)
    # world_size 1: no collective, bit for bit the one-process mean
    world.calls.clear()
    assert torch.equal(update_center(center.clone(), mine, 0.9, world_size=1), update_center(center.clone(), mine, 0.9))
    assert world.calls == []


@pytest.mark.parametrize("methods", [["dino"], ["dino", "sdmp"]])
def test_a_dino_step_as_rank_1_of_2_keeps_its_teacher_rows_and_all_reduces_k_floats(monkeypatch, methods):
    """One process posing as rank 1 of 2 with stand-in collectives: the step gathers nothing
    (SDMP's local flip included), the keys are the rank's own [V, B, K] with labels 0..B-1
    and SDMP's partners re-based to local rows, and the only collective is the centre's
    all-reduce of K float32 (here the twin rank has the same rows: the local mean)."""
    raw = dino_config(epochs=2, **({"sdmp": {"flip": "local"}} if "sdmp" in methods else {}))
    state = run_plugin(methods, steps=1, config=raw, plugin_modules=MODULES)
    net = state.unwrapped_model
    center_before = net.dino_center.clone()
    world = FakeWorld(monkeypatch)
    state.rank, state.world_size = 1, 2
    train_step(state, next(iter(state.sampler)))
    step = state.outputs["ssl"]
    B = state.batch["idx"].shape[0]
    assert step.keys.shape == (2, B, 32) and step.labels.tolist() == list(range(B))
    assert world.calls == [("all_reduce", torch.float32, (1, 32), 4 * 32)]
    torch.testing.assert_close(net.dino_center, 0.9 * center_before + 0.1 * step.keys.mean(dim=(0, 1)),
                               rtol=1e-6, atol=1e-8)
    p = teacher_probs(step.keys, step.center, step.teacher_temp)
    torch.testing.assert_close(state.loss_terms["dino"], dino_loss([q[0] for q in step.q], list(p), 0.1))
    if "sdmp" in methods:
        from batchkin.plugins.sdmp import sdmp_dino_loss

        assert step.mix.partner.tolist() == list(range(B - 1, -1, -1))  # SDMP's rows B + B-1-i, re-based
        pm = teacher_probs(step.keys_mix, step.center, step.teacher_temp)
        student = torch.stack([step.q_mix[0][0], step.q_mix[1][0]])
        terms = sdmp_dino_loss(student, p, pm, step.mix.lam, 0.1)  # default rows: i and B-1-i
        torch.testing.assert_close(state.loss_terms["sdmp_ms"], 0.5 * terms["ms"])
        torch.testing.assert_close(state.loss_terms["sdmp_mm"], 0.5 * terms["mm"])


def test_dino_step_loss_center_and_teacher_update():
    state = run_plugin(["dino"], steps=1, config=dino_config(epochs=2), plugin_modules=MODULES)
    net = state.unwrapped_model
    center_before = net.dino_center.clone()
    teacher_before = [p.detach().clone() for p in net.momentum_pairs()[0]]
    train_step(state, next(iter(state.sampler)))
    step = state.outputs["ssl"]
    # the loss used the center of before the step, at the epoch's teacher temperature
    assert step.teacher_temp == pytest.approx(0.04) and torch.equal(step.center, center_before)
    p = teacher_probs(step.keys, center_before, 0.04)
    expect = dino_loss([step.q[0][0], step.q[1][0]], [p[0], p[1]], 0.1)
    torch.testing.assert_close(state.loss_terms["dino"], expect)
    # after the step: center EMA of the teacher outputs, teacher EMA of the student
    torch.testing.assert_close(net.dino_center, 0.9 * center_before + 0.1 * step.keys.mean(dim=(0, 1)))
    # one process: bit for bit the mean over the rows of both views, as before the DDP all-reduce path
    batch = step.keys.float().reshape(-1, 32).mean(0, keepdim=True)
    assert torch.equal(net.dino_center, center_before.clone().mul_(0.9).add_(batch, alpha=1 - 0.9))
    m = cosine_momentum(state.step, state.epochs * state.steps_per_epoch, 0.996)
    for t, b, o in zip(net.momentum_pairs()[0], teacher_before, net.momentum_pairs()[1]):
        torch.testing.assert_close(t, m * b + (1 - m) * o)


def test_fit_dino_logs_schedules_and_checkpoints_the_center(tmp_path):
    fit(dino_config(epochs=2), tmp_path / "run", plugins=Plugins(extra_modules=MODULES), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("dino/teacher_temp") for r in lines[:2]] == pytest.approx([0.04, 0.07])  # warm-up of 1 epoch
    assert all(0.996 <= r["dino/momentum"] <= 1.0 for r in lines[:2])
    assert all(math.isfinite(r["train/dino"]) for r in lines[:2])
    assert "test/top1" in lines[-1]
    model = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert model["dino_center"].shape == (1, 32) and bool(model["dino_center"].abs().sum() > 0)
    assert "momentum.head.last_v" in model


@pytest.mark.parametrize("over,message", [
    ({"student_temp": 0.0}, "dino.student_temp must be > 0.0"),
    ({"center_momentum": 1.0}, "dino.center_momentum must be < 1.0"),
    ({"warmup_fraction": 2.0}, "dino.warmup_fraction must be <= 1.0"),
    ({"views": {"blur_sigma": [2.0, 0.5]}}, "dino.views.blur_sigma must be [low, high]"),
])
def test_bad_options_name_the_key(over, message):
    with pytest.raises(ConfigError) as exc:
        prepare(dino_config(dino=over), Plugins(extra_modules=MODULES))
    assert message in str(exc.value)


# ------------------------------------------------------------------------------ multi-crop


def images(b=6, c=1, h=8, w=8, seed=0):
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


NO_COLOUR = ViewOptions(crop_ratio=[1.0, 1.0], jitter_prob=0.0, grayscale_prob=0.0, blur_prob=[0.0, 0.0],
                        solarize_prob=[0.0, 0.0])


@pytest.mark.parametrize("c,size", [(1, (4, 4)), (3, (3, 5))])
def test_local_views_count_shape_and_determinism(c, size):
    x = images(5, c, 8, 8)
    crops = LocalCrops(n=3, size=size)
    a = make_local_views(x, torch.Generator().manual_seed(1), crops)
    b = make_local_views(x, torch.Generator().manual_seed(1), crops)
    assert a.shape == (3, 5, c, *size) and a.dtype == torch.uint8 and a.is_contiguous()
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # every crop has its own draws
    assert make_local_views(x, torch.Generator(), LocalCrops(n=0, size=size)).shape == (0, 5, c, *size)
    with pytest.raises(ValueError, match="inside the 8x8 images"):
        make_local_views(x, torch.Generator(), LocalCrops(n=1, size=(9, 4)))


def test_local_crops_are_small_crops_of_the_image():
    # area fraction 1/4 with square boxes on 8x8 images: a 4x4 box, resized to 4x4 (a copy),
    # so every local crop is exactly a 4x4 block of its image; positions vary
    x = images(16, 1, 8, 8, seed=2)
    crops = LocalCrops(n=4, size=(4, 4), scale=(0.25, 0.25), blur_prob=0.0)
    out = make_local_views(x, torch.Generator().manual_seed(0), crops, NO_COLOUR, hflip=False)
    blocks = x.unfold(2, 4, 1).unfold(3, 4, 1)  # [B, 1, 5, 5, 4, 4]: every 4x4 block
    positions = set()
    for v in range(4):
        for i in range(16):
            hit = (blocks[i, 0] == out[v, i, 0]).flatten(2).all(-1).nonzero()
            assert len(hit) >= 1, f"crop {v} of image {i} is not a 4x4 block of it"
            positions.add(tuple(hit[0].tolist()))
    assert len(positions) > 5
    # the whole image resized to the local size: bilinear interpolation, rounded to bytes
    whole = LocalCrops(n=1, size=(3, 5), scale=(1.0, 1.0), blur_prob=0.0)
    out = make_local_views(x, torch.Generator().manual_seed(0), whole, NO_COLOUR, hflip=False)
    expect = to_uint8(F.interpolate(x.float() / 255, size=(3, 5), mode="bilinear", align_corners=False))
    assert (out[0].int() - expect.int()).abs().max() <= 1


def test_local_views_do_not_change_the_global_views():
    x = images(6, 3, 8, 8)
    gen = torch.Generator().manual_seed(7)
    views = make_views(x, gen)
    local = make_local_views(x, gen, LocalCrops(n=2, size=(4, 4)))
    assert torch.equal(views, make_views(x, torch.Generator().manual_seed(7)))
    # the local crops are the next draws of the same stream
    again = torch.Generator().manual_seed(7)
    make_views(x, again)
    assert torch.equal(local, make_local_views(x, again, LocalCrops(n=2, size=(4, 4))))


def test_local_crop_size_forms():
    assert local_crop_size(None, (224, 224)) == (96, 96)  # DINO's 96 of 224
    assert local_crop_size(None, (8, 8)) == (3, 3)
    assert local_crop_size(None, (28, 14)) == (12, 6)
    assert local_crop_size(4, (8, 8)) == (4, 4)
    assert local_crop_size([5], (8, 8)) == (5, 5)
    assert local_crop_size([3, 6], (8, 8)) == (3, 6)


def _ce(s, p, temp):
    """-sum_j p_j log softmax(s / temp)_j for one row, in plain Python."""
    z = [v / temp for v in s]
    m = max(z)
    lse = m + math.log(sum(math.exp(v - m) for v in z))
    return -sum(pj * (zj - lse) for pj, zj in zip(p, z))


def test_multicrop_loss_on_a_hand_example():
    # 2 teacher (global) views, 4 student views (2 global + 2 local), one sample, 3 prototypes
    student = [[0.3, -0.2, 0.1], [0.0, 1.0, 0.0], [0.5, 0.5, -1.0], [-0.4, 0.2, 0.9]]
    probs = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    loss = dino_loss([torch.tensor([s]) for s in student], [torch.tensor([p]) for p in probs], 0.1)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]
    assert pairs == [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # 2 * (2 + 2) - 2 pairs
    expect = sum(_ce(student[s], probs[t], 0.1) for t, s in pairs) / 6
    assert float(loss) == pytest.approx(expect, rel=1e-6)
    # s == t excluded: adding those two pairs gives a different mean
    with_same = (expect * 6 + _ce(student[0], probs[0], 0.1) + _ce(student[1], probs[1], 0.1)) / 8
    assert abs(float(loss) - with_same) > 1e-3


def _recorded_shapes(module):
    shapes = []
    module.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_teacher_sees_only_global_crops_student_sees_all():
    raw = dino_config(epochs=2, dino={"n_local_crops": 3, "local_crop_size": [4, 3]})
    state = run_plugin(["dino"], steps=1, config=raw, plugin_modules=MODULES)
    net = state.unwrapped_model
    # the encoders are called through forward_features: record what their first layer sees
    teacher, student = _recorded_shapes(net.momentum["encoder"].conv), _recorded_shapes(net.encoder.conv)
    center_before = net.dino_center.clone()
    train_step(state, next(iter(state.sampler)))
    B = state.batch["idx"].shape[0]
    assert teacher == [(B, 1, 8, 8)] * 2
    assert student == [(B, 1, 8, 8)] * 2 + [(B, 1, 4, 3)] * 3
    step = state.outputs["ssl"]
    assert len(step.q) == 5 and step.keys.shape == (2, B, 32)
    p = teacher_probs(step.keys, center_before, step.teacher_temp)
    total = 0
    for t in range(2):
        for s in range(5):
            if s != t:
                total = total + (-(p[t] * F.log_softmax(step.q[s][0] / 0.1, dim=1)).sum(1)).mean()
    torch.testing.assert_close(state.loss_terms["dino"], total / 8)  # 2 * (2 + 3) - 2 pairs
    # the center follows the teacher's outputs (global views) only
    torch.testing.assert_close(net.dino_center, 0.9 * center_before + 0.1 * step.keys.mean(dim=(0, 1)))


def test_default_reproduces_the_two_crop_loss_exactly():
    """n_local_crops = 0 (the default): the loss is DINO's two-view loss of the views that
    make_views draws from the run's stream, recomputed here from the raw images."""
    for tables in ({}, {"n_local_crops": 0, "local_crop_size": 4}):
        state = run_plugin(["dino"], steps=1, config=dino_config(epochs=2, dino=tables), plugin_modules=MODULES)
        net = copy.deepcopy(state.unwrapped_model)
        gen = torch.Generator().set_state(state.generator("dino_views").get_state())
        indices = next(iter(state.sampler))
        train_step(state, indices)
        data = state.train_data
        raw = data.x[state.batch["idx"]]
        views = normalize_views(make_views(raw, gen, ViewOptions(), hflip=state.splits.hflip),
                                data.mean.view(-1), data.std.view(-1))
        student = [net.head(net.encoder.forward_features(v)["features"]) for v in views]
        with torch.no_grad():
            teacher = [net.momentum["head"](net.momentum["encoder"].forward_features(v)["features"]) for v in views]
        p = [teacher_probs(t, net.dino_center, 0.04) for t in teacher]
        assert torch.equal(state.loss_terms["dino"].detach(), dino_loss(student, p, 0.1).detach())
        assert len(state.outputs["ssl"].q) == 2


def test_global_views_are_unchanged_by_local_crops():
    outs = []
    for n in (0, 2):
        state = run_plugin(["dino"], steps=1, config=dino_config(dino={"n_local_crops": n}), plugin_modules=MODULES)
        outs.append(state.outputs["ssl"])
    assert len(outs[0].q) == 2 and len(outs[1].q) == 4
    torch.testing.assert_close(outs[1].keys, outs[0].keys, rtol=0, atol=0)
    for v in range(2):
        torch.testing.assert_close(outs[1].q[v][0], outs[0].q[v][0], rtol=0, atol=0)


@pytest.mark.parametrize("model", [{"name": "tiny"}, {"name": "resnet8", "width": 4}])
def test_fit_with_local_crops_is_finite(tmp_path, model):
    raw = dino_config(epochs=2, dino={"n_local_crops": 2, "local_crop_size": 3}, model=model)
    fit(raw, tmp_path / "run", plugins=Plugins(extra_modules=MODULES), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/dino"]) for r in lines[:2])
    assert math.isfinite(lines[-1]["test/top1"])
    model = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert bool(model["dino_center"].abs().sum() > 0)


def test_sdmp_mixes_only_the_global_views():
    raw = dino_config(dino={"n_local_crops": 2, "local_crop_size": 4})
    state = run_plugin(["dino", "sdmp"], steps=1, config=raw, plugin_modules=MODULES)
    step = state.outputs["ssl"]
    B = state.batch["idx"].shape[0]
    assert len(step.q) == 4 and len(step.q_mix) == 2
    assert step.mix.mixed.shape == (2, B, 1, 8, 8) and step.keys_mix.shape == step.keys.shape
    assert set(state.loss_terms) == {"dino", "sdmp_ms", "sdmp_mm"}
    p = teacher_probs(step.keys, step.center, step.teacher_temp)
    torch.testing.assert_close(state.loss_terms["dino"], dino_loss([q[0] for q in step.q], list(p), 0.1))


@pytest.mark.parametrize("over,message", [
    ({"n_local_crops": -1}, "dino.n_local_crops must be >= 0"),
    ({"local_crop_scale": [0.0, 0.4]}, "dino.local_crop_scale must be > 0.0"),
    ({"local_crop_scale": [0.1, 1.5]}, "dino.local_crop_scale must be <= 1.0"),
    ({"local_crop_scale": [0.4, 0.1]}, "dino.local_crop_scale must be [low, high]"),
    ({"local_crop_scale": [0.4]}, "dino.local_crop_scale must be [low, high]"),
    ({"local_crop_size": 0}, "dino.local_crop_size must be >= 1"),
    ({"local_crop_size": [2, 3, 4]}, "dino.local_crop_size must be one size or [h, w]"),
    ({"n_local_crops": 2, "local_crop_size": 9}, "dino.local_crop_size (9x9) is larger than the images (8x8)"),
    ({"n_local_crops": 2, "local_crop_size": [4, 10]}, "dino.local_crop_size (4x10) is larger than the images (8x8)"),
])
def test_bad_multicrop_options_name_the_key(over, message):
    with pytest.raises(ConfigError) as exc:
        prepare(dino_config(dino=over), Plugins(extra_modules=MODULES))
    assert message in str(exc.value)


def test_a_model_that_cannot_take_local_crops_is_refused_clearly():
    raw = dino_config(dino={"n_local_crops": 2, "local_crop_size": 4},
                      model={"name": "vit", "dim": 16, "depth": 1, "heads": 2})
    with pytest.raises(ConfigError) as exc:
        prepare(raw, Plugins(extra_modules=MODULES))
    msg = str(exc.value)
    assert "dino.n_local_crops = 2" in msg and "model 'vit' cannot" in msg and "8x8 token grid" in msg
    assert "4x4 local crops" in msg
    # the same model is fine without local crops
    raw["dino"]["n_local_crops"] = 0
    prepare(raw, Plugins(extra_modules=MODULES))


def _shipped(name):
    return tomllib.loads((Path(__file__).resolve().parents[2] / "configs" / name).read_text())


def test_dino_digits_config_trains_a_step():
    raw = _shipped("dino_digits.toml")
    raw["device"] = "cpu"
    assert raw["methods"] == ["dino"]
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=MODULES)
    net, o = state.unwrapped_model, state.hooks.methods["dino"].options
    assert o.head_bn and o.head_init == "fan_in" and net.eval_momentum  # the small-scale recipe, teacher evaluated
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.head.mlp)
    step = state.outputs["ssl"]
    assert len(step.q) == 2 + o.n_local_crops and step.keys.shape[0] == 2
    assert math.isfinite(float(state.loss_terms["dino"].detach()))


def test_dino_fashion_mnist_config_trains_a_step():
    raw = _shipped("dino_fashion_mnist.toml")
    assert raw["methods"] == ["dino"] and raw["data"]["name"] == "fashion_mnist"
    raw["device"] = "cpu"
    raw["data"]["train_size"] = 256  # the same recipe on a smaller subset: one step
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=MODULES)
    assert state.batch["x"].shape[1:] == (1, 28, 28) and state.hooks.methods["dino"].options.head_bn
    assert math.isfinite(float(state.loss_terms["dino"].detach()))


def test_gradient_reaches_the_student_and_never_the_teacher():
    raw = dino_config(epochs=2, dino={"freeze_last_layer": 0})
    state = run_plugin(["dino"], steps=1, config=raw, plugin_modules=MODULES)
    net = state.unwrapped_model
    train_step(state, next(iter(state.sampler)))
    step = state.outputs["ssl"]
    assert not step.keys.requires_grad and all(q[0].requires_grad for q in step.q)
    classifier = {id(p) for p in net.encoder.classifier.parameters()}
    student = [(n, p) for n, p in list(net.encoder.named_parameters()) + list(net.head.named_parameters())
               if id(p) not in classifier and n != "last_g"]
    for name, p in student:
        assert p.requires_grad and p.grad is not None and float(p.grad.abs().sum()) > 0, name
    # the weight-normalised last layer keeps g = 1 frozen; the teacher gets no gradient at all
    assert not net.head.last_g.requires_grad and net.head.last_g.grad is None
    assert torch.equal(net.head.last_g, torch.ones_like(net.head.last_g))
    for name, p in net.momentum.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    optimized = {id(p) for g in state.optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in net.momentum.parameters()}


def test_head_outputs_are_cosines_to_unit_prototypes():
    # L2-normalised bottleneck times a weight-normalised last layer with g = 1: every output
    # is the cosine between the bottleneck and one prototype row of last_v, at any scale of v
    head = dino.DINOHead(6, 5, hidden_dim=8, bottleneck_dim=4)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        head.last_v.mul_(torch.tensor([0.1, 1.0, 7.0, 0.5, 3.0]).view(5, 1))
        out = head(x)
        z = head.mlp(x)
    cos = F.cosine_similarity(z.unsqueeze(1), head.last_v.unsqueeze(0), dim=-1)
    torch.testing.assert_close(out, cos)
    assert float(out.abs().max()) <= 1.0 + 1e-6


def test_centering_is_on_the_teacher_logits_before_the_temperature():
    # hand example: center 0 -> 0.9 * 0 + 0.1 * mean(raw teacher outputs), not of t / T nor of probs
    t = torch.tensor([[[1.0, 3.0], [3.0, 1.0]], [[2.0, 2.0], [4.0, 0.0]]])  # [V=2, B=2, K=2]
    center = update_center(torch.zeros(1, 2), t, 0.9)
    torch.testing.assert_close(center, torch.tensor([[0.25, 0.15]]))
    # the next step's teacher distribution: softmax((t - c) / T), here T = 0.05
    p = teacher_probs(torch.tensor([[1.0, 1.0]]), center, 0.05)
    e = torch.exp(torch.tensor([0.75, 0.85]) / 0.05)
    torch.testing.assert_close(p, (e / e.sum()).view(1, 2))
    # sharper than the student at the same logits: T_t = 0.04 < T_s = 0.1
    s = F.softmax(torch.tensor([[0.75, 0.85]]) / 0.1, dim=-1)
    assert float(p.max()) > float(s.max())


def test_run_uses_each_epochs_teacher_temperature():
    # 10 epochs, warm-up of 3: the step's temperature is linspace(0.04, 0.07, 3)[e - 1], then 0.07
    state = run_plugin(["dino"], steps=1, config=dino_config(epochs=10), plugin_modules=MODULES)
    plugin = state.hooks.methods["dino"]
    seen = []
    for epoch in (1, 2, 3, 4, 10):
        state.epoch = epoch
        state.sampler.set_epoch(epoch)
        state.hooks.on_epoch_start(state=state)
        train_step(state, next(iter(state.sampler)))
        seen.append(state.outputs["ssl"].teacher_temp)
        assert plugin.temp == seen[-1]
    assert seen == pytest.approx([0.04, 0.055, 0.07, 0.07, 0.07])


# ------------------------------------------------------------------------------ DINO's optimiser details and small-scale options


def test_clip_gradients_clips_each_parameter_to_its_own_norm():
    a = torch.zeros(2, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    c = torch.zeros(1, requires_grad=True)  # no gradient: skipped
    a.grad = torch.tensor([3.0, 4.0])  # norm 5 > 3: scaled by 3 / (5 + 1e-6)
    b.grad = torch.tensor([1.0, 0.0, 0.0])  # norm 1 <= 3: unchanged
    norms = clip_gradients_([a, b, c], 3.0)
    assert [float(n) for n in norms] == pytest.approx([5.0, 1.0])
    torch.testing.assert_close(a.grad, torch.tensor([3.0, 4.0]) * (3.0 / (5.0 + 1e-6)))
    assert torch.equal(b.grad, torch.tensor([1.0, 0.0, 0.0])) and c.grad is None
    # not the global norm: clip_grad_norm_ would scale both by 3 / sqrt(26)
    assert float(b.grad.norm()) == 1.0
    assert clip_gradients_([c], 3.0) == []


def test_teacher_entropy_hand_examples():
    K = 4
    uniform = torch.full((2, 3, K), 1 / K)
    h, hm = teacher_entropy(uniform)
    assert float(h) == pytest.approx(math.log(K)) and float(hm) == pytest.approx(math.log(K))
    same = torch.zeros(5, K)
    same[:, 2] = 1  # every image the same one-hot output: the dominant-dimension collapse
    assert [float(v) for v in teacher_entropy(same)] == pytest.approx([0.0, 0.0], abs=1e-6)
    spread = torch.eye(K)  # confident and every prototype used once: the healthy case
    h, hm = teacher_entropy(spread)
    assert float(h) == pytest.approx(0.0, abs=1e-6) and float(hm) == pytest.approx(math.log(K))
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    h, hm = teacher_entropy(p)
    h1 = math.log(2)
    h2 = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    mean = [0.25, 0.25, 0.125, 0.375]
    assert float(h) == pytest.approx((h1 + h2) / 2) and float(hm) == pytest.approx(-sum(q * math.log(q) for q in mean))


def test_fit_logs_the_teacher_entropy_of_every_epoch(tmp_path):
    fit(dino_config(epochs=2), tmp_path / "run", plugins=Plugins(extra_modules=MODULES), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in lines[:2]:
        assert 0.0 <= r["dino/teacher_entropy"] <= math.log(32) + 1e-5
        assert r["dino/teacher_entropy"] <= r["dino/teacher_batch_entropy"] + 1e-5  # entropy is concave
        assert r["dino/teacher_batch_entropy"] <= math.log(32) + 1e-5


def test_teacher_entropy_is_the_mean_over_the_epochs_steps():
    state = run_plugin(["dino"], steps=2, config=dino_config(epochs=2), plugin_modules=MODULES)
    plugin = state.hooks.methods["dino"]
    plugin.on_epoch_start(state)  # a fresh epoch: two steps by hand
    seen = []
    for indices in list(state.sampler)[:2]:
        train_step(state, indices)
        step = state.outputs["ssl"]
        seen.append(teacher_entropy(teacher_probs(step.keys, step.center, step.teacher_temp)))
    plugin.on_epoch_end(state)
    m = state.epoch_metrics
    assert m["dino/teacher_entropy"] == pytest.approx(float(seen[0][0] + seen[1][0]) / 2, rel=1e-6)
    assert m["dino/teacher_batch_entropy"] == pytest.approx(float(seen[0][1] + seen[1][1]) / 2, rel=1e-6)


@pytest.mark.parametrize("freeze", [0, 1])
def test_freeze_last_layer_drops_its_gradient_in_the_first_epochs(freeze):
    raw = dino_config(epochs=3, dino={"freeze_last_layer": freeze, "clip_grad": 0.0}, optim={"name": "adamw"})
    state = run_plugin(["dino"], steps=1, config=raw, plugin_modules=MODULES)  # one step of epoch 1
    head = state.unwrapped_model.head
    # frozen, the optimizer never saw a gradient for it (AdamW keeps no moments, applies no decay)
    assert (head.last_v in state.optimizer.state) == (not freeze)
    assert head.mlp[0].weight in state.optimizer.state
    for epoch in (1, 2):
        state.epoch = epoch
        before, mlp_before = head.last_v.detach().clone(), head.mlp[0].weight.detach().clone()
        train_step(state, next(iter(state.sampler)))
        frozen = epoch <= freeze
        assert torch.equal(head.last_v, before) == frozen, epoch
        assert (head.last_v.grad is None) == frozen, epoch
        assert not torch.equal(head.mlp[0].weight, mlp_before)  # the rest of the student trains


def test_clip_grad_bounds_every_parameters_gradient_in_a_step():
    norms = {}
    for clip in (0.0, 1e-3):
        raw = dino_config(epochs=2, dino={"clip_grad": clip, "freeze_last_layer": 0})
        state = run_plugin(["dino"], steps=1, config=raw, plugin_modules=MODULES)
        params = [p for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms[clip] = torch.stack([p.grad.norm() for p in params])
    assert float(norms[1e-3].max()) <= 1e-3 * (1 + 1e-5)
    assert float(norms[0.0].max()) > 1e-2  # unclipped, the same step's gradients are far larger
    # the direction of each gradient is kept: a clipped gradient is the unclipped one rescaled
    ratio = norms[1e-3] / norms[0.0]
    expected = torch.clamp(1e-3 / (norms[0.0] + 1e-6), max=1.0)
    torch.testing.assert_close(ratio, expected, rtol=1e-3, atol=0)


def test_head_init_fan_in_keeps_the_bottleneck_in_proportion_to_the_features():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)  # features of norm ~8
    norms = {}
    for init in ("trunc_normal", "fan_in"):
        torch.manual_seed(0)
        head = DINOHead(64, 32, hidden_dim=256, bottleneck_dim=64, init=init)
        with torch.no_grad():
            norms[init] = float(head.mlp(x).norm(dim=1).mean())
        if init == "fan_in":
            w1, w3 = head.mlp[0].weight.detach(), head.mlp[4].weight.detach()
            assert float(w1.std()) == pytest.approx(math.sqrt(2 / 64), rel=0.05)  # He, before a GELU
            assert float(w3.std()) == pytest.approx(math.sqrt(1 / 256), rel=0.05)  # the bottleneck layer
        assert all(not m.bias.detach().any() for m in head.mlp if isinstance(m, torch.nn.Linear))
    feature_norm = float(x.norm(dim=1).mean())
    assert norms["trunc_normal"] < 0.01 * feature_norm  # DINO's init on a small encoder: ~0.02 scale
    assert 0.25 * feature_norm < norms["fan_in"] < 4 * feature_norm
    with pytest.raises(ValueError, match="init must be one of"):
        DINOHead(4, 4, init="xavier")


def test_head_bn_puts_a_batchnorm_after_every_hidden_layer_teacher_included():
    head = DINOHead(8, 16, hidden_dim=12, bottleneck_dim=6, num_layers=3, use_bn=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "GELU", "Linear", "BatchNorm1d", "GELU", "Linear"]
    assert [type(m).__name__ for m in DINOHead(8, 16, num_layers=2).mlp] == ["Linear", "GELU", "Linear"]
    state = run_plugin(["dino"], steps=1, config=dino_config(dino={"head_bn": True}), plugin_modules=MODULES)
    net = state.unwrapped_model
    teacher_bn = [m for m in net.momentum["head"].mlp if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(teacher_bn) == 2 and all(int(m.num_batches_tracked) == 2 for m in teacher_bn)  # two global views
    target, online = net.momentum_pairs()
    assert len(target) == len(online)
    assert math.isfinite(float(state.loss_terms["dino"].detach()))


@pytest.mark.parametrize("which", ["teacher", "student"])
def test_knn_and_probe_read_the_chosen_encoder(which):
    from batchkin.data import DeviceData
    from batchkin.probe import encode
    from batchkin.trainer import evaluate

    raw = dino_config(epochs=2, dino={"eval_encoder": which})
    state = run_plugin(["dino"], steps=2, config=raw, plugin_modules=MODULES)
    net = state.unwrapped_model
    chosen = net.momentum["encoder"] if which == "teacher" else net.encoder
    other = net.encoder if which == "teacher" else net.momentum["encoder"]
    net.eval()
    data = state.train_data
    with torch.no_grad():
        x = data.normalize(data.x[:16])
        expect, unwanted = chosen.forward_features(x)["features"], other.forward_features(x)["features"]
        assert not torch.allclose(expect, unwanted)  # two steps: the teacher lags the student
        torch.testing.assert_close(encode(net, data, 16)[:16], expect)  # the probe's features
    net.train()
    evaluate(state, "val", DeviceData(state.splits.val, state.splits, state.device))
    bank = state.hooks.methods["dino"].knn.bank
    torch.testing.assert_close(bank[:16], F.normalize(expect, dim=1), rtol=1e-5, atol=1e-6)


def test_dino_can_leave_norms_and_biases_undecayed_and_warm_up_from_zero():
    from batchkin.trainer import lr_factor

    raw = dino_config(epochs=2, dino={"head_bn": True}, optim={"no_decay_norm_bias": True, "weight_decay": 0.04},
                      schedule={"warmup_epochs": 1, "warmup_start": 0.0})
    state = prepare(raw, Plugins(extra_modules=MODULES))
    net = state.unwrapped_model
    groups = {g["name"]: g for g in state.optimizer.param_groups}
    names = {id(p): n for n, p in net.named_parameters()}
    undecayed = {names[id(p)] for p in groups["no_decay"]["params"]}
    decayed = {names[id(p)] for p in groups["default"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["default"]["weight_decay"] == 0.04
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert undecayed | decayed == trainable and not undecayed & decayed
    assert undecayed == {n for n in trainable if net.get_parameter(n).dim() <= 1}
    assert {"head.mlp.0.bias", "head.mlp.1.weight", "head.mlp.1.bias"} <= undecayed  # a bias, the head's BN
    assert {"head.mlp.0.weight", "head.last_v"} <= decayed
    assert not any(n.startswith("momentum.") for n in trainable)  # the teacher is not optimised
    # DINO's warm-up starts at lr 0 and rises linearly over the first epoch
    factor, spe = lr_factor(state.config, state.steps_per_epoch), state.steps_per_epoch
    assert state.optimizer.param_groups[0]["lr"] == 0.0
    assert [factor(s) for s in range(spe + 1)] == pytest.approx([s / spe for s in range(spe + 1)])
