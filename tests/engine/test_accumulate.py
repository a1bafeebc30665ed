"""Gradient accumulation (``train.accumulate``): N micro-batches make the optimizer step of
one batch N times larger (BatchNorm-free model), the schedule counts optimizer steps,
hooks fire per micro-batch or per step, and methods declare what accumulation means for
them (or refuse it with one line)."""

from __future__ import annotations

import json

import pytest
import torch

from batchkin.cli import main
from batchkin.errors import ConfigError, PluginError
from batchkin.plugin import Plugins
from batchkin.testing import tiny_config
from batchkin.trainer import fit, micro_batches, prepare, train_step

# 96 synthetic images: 24 test, 18 val, 54 training -> 6 micro-batches of 8 or 3 batches of 16
DATA = {"synthetic_classes": 3, "synthetic_per_class": 32, "synthetic_shape": [3, 6, 6], "val_fraction": 0.25,
        "test_fraction": 0.25, "augment": False}


def config(batch_size: int, accumulate: int, **tables) -> dict:
    return tiny_config(["ce"], data={**DATA, "batch_size": batch_size}, train={"accumulate": accumulate},
                       optim={"lr": 0.2, "momentum": 0.9, "weight_decay": 5e-4}, **tables)


def params(state) -> dict:
    return {n: p.detach().clone() for n, p in state.unwrapped_model.named_parameters()}


def test_one_optimizer_step_of_two_micro_batches_is_one_step_of_the_double_batch():
    big, acc = prepare(config(16, 1)), prepare(config(8, 2))
    assert all(torch.equal(a, b) for a, b in zip(params(big).values(), params(acc).values()))  # same initial weights
    for s in (big, acc):
        s.epoch = 1
        s.sampler.set_epoch(1)
    batch = next(iter(big.sampler))[""]
    halves = [idx[""] for _, idx in zip(range(2), iter(acc.sampler))]
    assert torch.equal(torch.cat(halves), batch)  # the micro-batches hold the big batch's samples
    train_step(big, {"": batch})
    initial = params(acc)
    for i, indices in micro_batches(acc, iter([{"": h} for h in halves])):
        assert acc.accumulation == (i, 2)
        train_step(acc, indices)
        if i == 0:  # the first micro-batch only accumulates its gradient
            assert acc.step == 0 and all(torch.equal(p, initial[n]) for n, p in params(acc).items())
    assert big.step == acc.step == 1 and acc.micro_step == 2
    assert big.optimizer.param_groups[0]["lr"] == acc.optimizer.param_groups[0]["lr"]
    one, two = params(big), params(acc)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=2e-6, atol=2e-7, msg=name)
    # not trivially equal: a step on the first half alone lands elsewhere
    half = prepare(config(8, 1))
    half.epoch = 1
    train_step(half, {"": halves[0]})
    assert any(not torch.allclose(params(half)[n], one[n], rtol=1e-4, atol=1e-6) for n in one)


def test_runs_with_accumulation_follow_the_double_batch_run(tmp_path, metrics_lines):
    """Two epochs: optimizer steps, learning rates and weights as with batches twice as large."""
    big = fit(config(16, 1, epochs=2), tmp_path / "big", progress=False)
    acc = fit(config(8, 2, epochs=2), tmp_path / "acc", progress=False)
    assert big.state.steps_per_epoch == acc.state.steps_per_epoch == 3
    assert acc.state.step == 6 and acc.state.micro_step == 12
    a, b = metrics_lines(tmp_path / "big"), metrics_lines(tmp_path / "acc")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [3, 6, 6]
    assert [r["lr"] for r in a[:2]] == [r["lr"] for r in b[:2]]
    # the logged loss is the mean over micro-batches: the mean over the same samples
    assert [r["loss"] for r in b[:2]] == pytest.approx([r["loss"] for r in a[:2]], rel=1e-5)
    wa, wb = params(big.state), params(acc.state)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=1e-6, msg=name)
    info = json.loads((tmp_path / "acc" / "run.json").read_text())
    assert info["accumulate"] == {"micro_batches": 2, "batch_size": 8, "methods": {"ce": "exact"}}
    assert "accumulate" not in json.loads((tmp_path / "big" / "run.json").read_text())


RECORDER = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    SEEN = []


    class Recorder(Method):
        @hookimpl
        def transform_batch(self, state):
            SEEN.append(("batch", state.accumulation, len(state.batch["y"])))

        @hookimpl
        def before_optimizer_step(self, state):
            SEEN.append(("before", state.accumulation, state.step))

        @hookimpl
        def after_step(self, state):
            SEEN.append(("after", state.accumulation, state.step))


    @hookimpl
    def register_methods(register):
        register("recorder", Recorder)
"""


def test_an_epochs_last_group_holds_what_is_left_and_hooks_fire_per_micro_batch_or_step(plugin_file, tmp_path):
    """5 micro-batches with accumulate = 2: groups of 2, 2, 1; the schedule counts 3 steps."""
    import sys

    plugins = Plugins(extra_files=[plugin_file("recorder_plugin", RECORDER)])
    raw = tiny_config(["ce", "recorder"], data={**DATA, "batch_size": 10, "drop_last": True}, train={"accumulate": 2},
                      epochs=1)
    result = fit(raw, tmp_path / "run", plugins=plugins, progress=False)
    seen = sys.modules[plugins.registry.methods["recorder"].obj.__module__].SEEN
    assert result.state.steps_per_epoch == 3 and result.state.step == 3
    assert seen == [
        ("batch", (0, 2), 10), ("batch", (1, 2), 10), ("before", (1, 2), 0), ("after", (1, 2), 1),
        ("batch", (0, 2), 10), ("batch", (1, 2), 10), ("before", (1, 2), 1), ("after", (1, 2), 2),
        ("batch", (0, 1), 10), ("before", (0, 1), 2), ("after", (0, 1), 3),
    ]


def test_the_last_micro_batch_alone_is_not_scaled_down():
    """A group of one micro-batch (the epoch's remainder) steps with that batch's full
    gradient: the same update as a run without accumulation on that batch."""
    alone, acc = prepare(config(8, 1)), prepare(config(8, 3))
    idx = {"": torch.arange(8)}
    for s in (alone, acc):
        s.epoch = 1
    acc.accumulation = (0, 1)
    train_step(alone, idx)
    train_step(acc, idx)
    for name, p in params(alone).items():
        assert torch.equal(params(acc)[name], p), name


def test_moco_refuses_accumulation_with_one_line(tmp_path, capsys):
    raw = tiny_config(["moco"], train={"accumulate": 2})
    with pytest.raises(ConfigError, match=r"^train.accumulate = 2: method 'moco' does not train with gradient "
                                          r"accumulation: its InfoNCE loss takes the negatives from the batch"):
        prepare(raw)
    out = tmp_path / "run"
    code = main(["train", "--quiet", "--out", str(out), "--set", 'methods=["moco"]', "--set", "train.accumulate=2",
                 "--set", "data.name=synthetic", "--set", "model.name=tiny", "--set", "device=cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("batchkin: error: train.accumulate = 2: method 'moco'")
    assert not out.exists()
    prepare(tiny_config(["moco"]))  # without accumulation moco trains


BAD_DECLARATION = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class Odd(Method):
        accumulation = "sometimes"


    @hookimpl
    def register_methods(register):
        register("odd", Odd)
"""


def test_a_method_declaring_an_unknown_accumulation_kind_is_named(plugin_file):
    plugins = Plugins(extra_files=[plugin_file("odd_plugin", BAD_DECLARATION)])
    with pytest.raises(PluginError, match="method 'odd' declares accumulation = 'sometimes'; it must be one of"):
        prepare(tiny_config(["ce", "odd"]), plugins)


def test_the_methods_declare_what_accumulation_means_for_them():
    from batchkin.plugin import Plugins as P

    methods = P().registry.methods
    kinds = {name: methods[name].obj.accumulation for name in (
        "ce", "bbn", "drloc", "batchformer", "moco", "dino", "sdmp")}
    assert kinds == {"ce": "exact", "bbn": "exact", "drloc": "exact", "batchformer": "micro-batch", "moco": "refuse",
                     "dino": "exact", "sdmp": "micro-batch"}
    for name in ("batchformer", "moco", "sdmp"):
        assert methods[name].obj.accumulation_note


def test_dino_updates_its_centre_once_per_step_from_every_micro_batch(monkeypatch):
    """The centre is a batch statistic: one update per optimizer step, over the teacher
    outputs of all its micro-batches (the rows of the accumulated batch, in order)."""
    from batchkin.plugins import dino

    calls = []
    original = dino.update_center

    def recording(center, teacher_out, *args, **kwargs):
        calls.append(teacher_out.clone())
        return original(center, teacher_out, *args, **kwargs)

    monkeypatch.setattr(dino, "update_center", recording)
    state = prepare(tiny_config(["dino"], data={"batch_size": 8}, train={"accumulate": 2},
                                dino={"out_dim": 16, "hidden_dim": 16, "bottleneck_dim": 8}))
    state.epoch = 1
    state.sampler.set_epoch(1)
    state.hooks.on_epoch_start(state=state)
    method = state.hooks.methods["dino"]
    for i, indices in micro_batches(state, iter(state.sampler)):
        train_step(state, indices)
        if i == 0:
            assert calls == [] and len(method.teacher_rows) == 1
            rows = list(method.teacher_rows)
        if i == 1:
            break
    assert len(calls) == 1 and calls[0].shape == (2, 16, 16)  # V = 2 views, 2 x 8 rows, out_dim 16
    assert torch.equal(calls[0][:, :8], rows[0])
    assert method.teacher_rows == []


def test_streamed_data_with_accumulation_resumes_exactly(tmp_path):
    """Streamed augmentation is keyed by the micro-batch (state.micro_step): a resumed run
    draws what the uninterrupted run drew, and two micro-batches of a step draw differently."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(12):
            Image.fromarray((rng.random((10, 10, 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{k}.png")
    raw = {"seed": 0, "epochs": 2, "device": "cpu", "methods": ["ce"], "model": {"name": "tiny", "width": 4},
           "data": {"name": "imagefolder", "root": str(root), "storage": "stream", "image_size": [8, 8],
                    "batch_size": 4, "eval_batch_size": 8, "num_workers": 0, "val_fraction": 0.2,
                    "test_fraction": 0.2},
           "train": {"accumulate": 2}}
    straight = fit(raw, tmp_path / "straight", progress=False)
    assert straight.state.micro_step == 2 * len(straight.state.sampler)
    fit(raw, tmp_path / "parted", until=1, progress=False)
    from batchkin.trainer import resume_config

    parted = fit(resume_config(tmp_path / "parted"), tmp_path / "parted", resume=True, progress=False)
    assert parted.state.micro_step == straight.state.micro_step
    a, b = params(straight.state), params(parted.state)
    for name in a:
        assert torch.equal(a[name], b[name]), name
