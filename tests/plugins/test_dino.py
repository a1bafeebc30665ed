"""The ``dino`` base plugin: teacher temperature, centering, loss, a short run."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from batchkin.errors import ConfigError
from batchkin.plugin import Plugins
from batchkin.plugins import dino, moco, sdmp
from batchkin.plugins.dino import dino_loss, teacher_probs, teacher_temperature, update_center
from batchkin.plugins.ssl import cosine_momentum
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
