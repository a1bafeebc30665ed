"""The EMA of the weights (``[train.ema]``): timm's decay with warm-up, what it averages,
evaluation on the EMA weights (and the raw ones), checkpoints, exact resume, and the SSL
bases' momentum encoders left to themselves."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from batchkin.cli import main
from batchkin.config import EMAConfig
from batchkin.ema import WeightEMA, averaged_tensors, ema_decay
from batchkin.testing import tiny_config
from batchkin.trainer import evaluate, fit, prepare, resume_config

EMA = {"ema": {"enabled": True, "decay": 0.9}}


def test_decay_follows_timm_with_and_without_warmup():
    # the first update copies; warm-up: 1 - (1 + t / gamma) ** -power with t = step - start_step - 1
    assert ema_decay(1, 0.999) == 0.0
    assert ema_decay(2, 0.999) == pytest.approx(1 - 2 ** (-2 / 3))  # t = 1
    assert ema_decay(9, 0.999, power=1.0) == pytest.approx(1 - 1 / 9)  # t = 8: a plain average of 9 weights
    assert ema_decay(11, 0.999, gamma=2.0, power=1.0) == pytest.approx(1 - 1 / 6)  # t = 10, (1 + 5) ** -1
    assert ema_decay(10**9, 0.999) == 0.999  # capped at decay
    assert ema_decay(2, 0.9, warmup=False) == 0.9
    assert [ema_decay(s, 0.9, warmup=False, start_step=3) for s in (1, 4, 5)] == [0.0, 0.0, 0.9]


def test_update_and_swap_on_a_hand_worked_example():
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = WeightEMA(lin, EMAConfig(enabled=True, decay=0.75, warmup=False))
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(1)  # decay 0: a copy
    assert ema.shadow["weight"].item() == 3.0 and ema.decay == 0.0
    with torch.no_grad():
        lin.weight.fill_(7.0)
    ema.update(2)  # 0.75 * 3 + 0.25 * 7
    assert ema.shadow["weight"].item() == 4.0 and ema.decay == 0.75
    with ema.swapped():
        assert lin.weight.item() == 4.0
    assert lin.weight.item() == 7.0
    with pytest.raises(RuntimeError), ema.swapped():
        raise RuntimeError("an evaluation that fails")
    assert lin.weight.item() == 7.0  # the live weights come back even then


def test_the_trainable_part_is_averaged_and_a_frozen_branch_is_not():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)
            self.bn = nn.BatchNorm2d(2)
            self.head = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, affine=False))
            self.frozen = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
            self.frozen.requires_grad_(False)
            self.register_buffer("center", torch.zeros(2))

    names = set(averaged_tensors(Net()))
    assert names == {"conv.weight", "conv.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                     "head.0.weight", "head.0.bias", "head.1.running_mean", "head.1.running_var", "center"}


def test_ssl_momentum_encoder_is_left_to_the_base():
    state = prepare(tiny_config(["moco"], train=EMA))
    names = set(state.ema.shadow)
    assert names and not any(n.startswith("momentum.") for n in names)
    assert any(n.startswith("encoder.") for n in names) and "encoder.classifier.weight" not in names  # frozen
    trainable = {n for n, p in state.unwrapped_model.named_parameters() if p.requires_grad}
    assert trainable <= names


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ema")
    raw = tiny_config(["ce"], epochs=3, train=EMA)
    return folder, raw, fit(raw, folder / "straight", progress=False)


def test_validation_and_test_report_the_ema_weights(ema_run, metrics_lines):
    folder, raw, result = ema_run
    lines = metrics_lines(folder / "straight")
    state = result.state
    for r in lines[:3]:
        assert r["val/weights"] == "ema" and "val_raw/top1" in r and "val_raw/weights" not in r
        assert 0.0 < r["ema/decay"] < 0.9
    assert lines[-1]["test/weights"] == "ema" and "test_raw/top1" in lines[-1]
    # the reported metrics are the EMA weights', the raw ones the live model's
    from batchkin.data import DeviceData

    test = DeviceData(state.splits.test, state.splits, state.device)
    with state.ema.swapped():
        by_hand = evaluate(state, "test", test, "model")
    assert {k: v for k, v in lines[-1].items() if k.startswith("test/") and k != "test/weights"} == \
        {f"test/{k}": v for k, v in by_hand.items()}
    raw_test = evaluate(state, "test", test, "model")
    assert lines[-1]["test_raw/per_class"] == raw_test["per_class"]
    # batchkin eval reads the checkpoint's EMA, and says so
    ckpt = torch.load(folder / "straight" / "checkpoints" / "last.pt", weights_only=True)
    assert set(ckpt["ema"]["shadow"]) == set(state.ema.shadow)
    assert all(torch.equal(ckpt["ema"]["shadow"][k], v) for k, v in state.ema.shadow.items())


def test_eval_command_uses_the_ema(ema_run, metrics_lines, capsys):
    folder, _, _ = ema_run
    assert main(["eval", str(folder / "straight")]) == 0
    out = json.loads(capsys.readouterr().out)
    final = metrics_lines(folder / "straight")[-1]
    assert out["weights"] == "ema" and out["top1"] == final["test/top1"]


def test_ema_resume_is_exact(ema_run):
    folder, raw, result = ema_run
    parted = folder / "parted"
    fit(raw, parted, until=1, progress=False)
    fit(resume_config(parted), parted, resume=True, progress=False)
    a = torch.load(folder / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)
    assert a["ema"]["decay"] == b["ema"]["decay"]
    for key, value in a["ema"]["shadow"].items():
        assert torch.equal(value, b["ema"]["shadow"][key]), key
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key


def test_ema_off_keeps_the_run_as_it_was(tmp_path, metrics_lines):
    fit(tiny_config(["ce"], epochs=1), tmp_path / "run", progress=False)
    line = metrics_lines(tmp_path / "run")[0]
    assert not any(k.startswith("val_raw/") or k == "val/weights" or k.startswith("ema/") for k in line)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["ema"] is None


def test_moco_knn_evaluates_the_ema_encoder(tmp_path):
    """kNN features come from the evaluated weights: the bank is rebuilt for the EMA weights
    and for the raw ones, never shared between them."""
    from batchkin.data import DeviceData
    from batchkin.probe import encode

    result = fit(tiny_config(["moco"], epochs=1, train=EMA), tmp_path / "run", progress=False)
    state = result.state
    knn = state.hooks.methods["moco"].knn
    val = DeviceData(state.splits.val, state.splits, state.device)
    evaluate(state, "val", val)
    with state.ema.swapped():
        ema_bank = torch.nn.functional.normalize(encode(state.unwrapped_model, state.train_data, 64), dim=1)
    assert torch.equal(knn.bank, ema_bank)
    evaluate(state, "val", val, "model")
    raw_bank = torch.nn.functional.normalize(encode(state.unwrapped_model, state.train_data, 64), dim=1)
    assert torch.equal(knn.bank, raw_bank) and not torch.equal(raw_bank, ema_bank)
    # the linear probe reads the EMA weights too, and leaves the live ones as they were
    from batchkin.probe import probe_state

    live = {k: v.clone() for k, v in state.unwrapped_model.state_dict().items()}
    assert probe_state(state, epochs=1)["weights"] == "ema"
    assert all(torch.equal(v, live[k]) for k, v in state.unwrapped_model.state_dict().items())
