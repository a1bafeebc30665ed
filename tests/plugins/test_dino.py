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
from batchkin.plugins.dino import dino_loss, local_crop_size, teacher_probs, teacher_temperature, update_center
from batchkin.plugins.ssl import (
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


def test_dino_digits_config_trains_a_step():
    raw = tomllib.loads((Path(__file__).resolve().parents[2] / "configs" / "dino_digits.toml").read_text())
    raw["device"] = "cpu"
    assert raw["methods"] == ["dino"] and raw["dino"]["n_local_crops"] > 0
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=MODULES)
    n, size = raw["dino"]["n_local_crops"], raw["dino"]["local_crop_size"]
    step = state.outputs["ssl"]
    assert len(step.q) == 2 + n and step.keys.shape[0] == 2
    assert state.hooks.methods["dino"].local == LocalCrops(n=n, size=(size, size), scale=(0.05, 0.4))
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
