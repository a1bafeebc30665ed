"""The loggers (``[log] backends``): metrics.jsonl and steps.jsonl always, TensorBoard and
CSV read back with their own readers (EventAccumulator, the csv module), the methods'
scalars, every parameter group's learning rate, and resume without lost or repeated rows."""

from __future__ import annotations

import csv
import json
import math
import sys

import pytest

from batchkin.errors import ConfigError
from batchkin.plugin import Plugins
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import fit, resume_config

from _common import file_hashes, read_jsonl, read_metrics

BACKENDS = {"backends": ["jsonl", "tensorboard", "csv"]}

# a method reporting through the documented channel: an epoch scalar and a per-step scalar
# (a tensor, read only at the logging cadence); it fails at optimizer step FAIL_AT when set
SCALARS = """
    import torch

    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    FAIL_AT = [0]


    class Scalars(Method):
        @hookimpl
        def on_epoch_start(self, state):
            state.epoch_metrics["scalars/epoch_value"] = 10.0 * state.epoch

        @hookimpl
        def after_step(self, state):
            state.step_metrics["scalars/step_value"] = torch.tensor(0.5 * state.step)
            if state.step == FAIL_AT[0]:
                raise RuntimeError("stopped on purpose")


    @hookimpl
    def register_methods(register):
        register("scalars", Scalars)
"""


@pytest.fixture
def scalars(plugin_file):
    path = plugin_file("scalars_plugin", SCALARS)

    def plugins(fail_at: int = 0) -> Plugins:
        p = Plugins(extra_files=[path])
        sys.modules[p.registry.methods["scalars"].obj.__module__].FAIL_AT[0] = fail_at
        return p

    return plugins


def raw_config(**over) -> dict:
    """3 epochs of 4 optimizer steps, two parameter groups, every logger, a step row every 2 steps."""
    tables = {"epochs": 3, "log": BACKENDS, "optim": {"no_decay_norm_bias": True}, "train": {"log_every": 2}, **over}
    return tiny_config(["ce", "scalars"], **tables)


def tensorboard(run) -> dict:
    """{tag: [(step, value), ...]} read back with TensorBoard's own EventAccumulator."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def same(a, b) -> bool:
    return (isinstance(a, float) and math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6)


def test_every_backend_holds_every_row(tmp_path, scalars):
    run = tmp_path / "run"
    fit(raw_config(), run, plugins=scalars(), progress=False)
    epochs, steps = read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "steps.jsonl")
    # step rows: every 2nd optimizer step, each loss term, each group's learning rate, the method's scalar
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    first = steps[0]
    assert set(first) == {"step", "epoch", "loss", "train/ce", "lr/default", "lr/no_decay", "scalars/step_value"}
    assert first["scalars/step_value"] == 1.0 and first["loss"] == first["train/ce"]
    assert first["lr/default"] == first["lr/no_decay"] > 0
    # epoch rows: epoch means, learning rates, the method's epoch scalar, validation, images/s
    assert [r["scalars/epoch_value"] for r in epochs[:3]] == [10.0, 20.0, 30.0]
    assert {"loss", "train/ce", "lr", "lr/default", "lr/no_decay", "images_per_s", "val/top1"} <= set(epochs[0])
    # TensorBoard: epoch rows under their own names, step rows under step/, at the optimizer step
    tb = tensorboard(run)
    for r in epochs:
        for key, value in r.items():
            if key in ("kind", "step") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            assert [s for s, _ in tb[key] if s == r["step"]] == [r["step"]], key
            assert any(s == r["step"] and same(float(value), v) for s, v in tb[key]), key
    for r in steps:
        for key, value in r.items():
            if key not in ("step", "epoch"):
                assert (r["step"], pytest.approx(value, rel=1e-6)) in tb[f"step/{key}"], key
    assert len(tb["step/loss"]) == len(steps) and len(tb["val/top1"]) == 3 and len(tb["test/top1"]) == 1
    # CSV: one row per jsonl row, one column per scalar (lists stay in metrics.jsonl)
    table = read_csv(run / "metrics.csv")
    assert [r["kind"] for r in table] == ["epoch"] * 3 + ["final"]
    assert "val/per_class" not in table[0] and table[0]["val/shot_split"] == "relative"
    for r, row in zip(epochs, table):
        for key, value in r.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert same(float(row[key]), value), key
    assert table[0]["test/top1"] == "" and float(table[-1]["test/top1"]) == epochs[-1]["test/top1"]
    step_table = read_csv(run / "steps.csv")
    assert [int(r["step"]) for r in step_table] == [r["step"] for r in steps]
    assert all(float(row["loss"]) == r["loss"] for row, r in zip(step_table, steps))


def test_jsonl_alone_writes_no_other_file(tmp_path):
    run = tmp_path / "run"
    fit(tiny_config(["ce"], epochs=2, train={"log_every": 3}), run, progress=False)  # 4 steps per epoch
    names = {p.name for p in run.iterdir()}
    assert {"metrics.jsonl", "steps.jsonl"} <= names and not names & {"metrics.csv", "steps.csv", "tensorboard"}
    assert [r["step"] for r in read_jsonl(run / "steps.jsonl")] == [3, 6]


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


def _tb_without_timing(run) -> dict:
    return {k: v for k, v in tensorboard(run).items() if k != "images_per_s"}


def test_resume_neither_loses_nor_repeats_rows(tmp_path, scalars):
    """A run that failed in epoch 3 (its step rows of epoch 3 written, its checkpoint at step 8)
    resumed to the end holds the rows of an uninterrupted run, in every backend; a resume
    that fails before its first commit changes no file."""
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    fit(raw_config(), straight, plugins=scalars(), progress=False)
    with pytest.raises(Exception, match="stopped on purpose"):
        fit(raw_config(), parted, plugins=scalars(fail_at=11), progress=False)
    assert [r["step"] for r in read_jsonl(parted / "steps.jsonl")][-1] == 10  # a row past the checkpoint of step 8
    assert tensorboard(parted)["step/loss"][-1][0] == 10 and read_csv(parted / "steps.csv")[-1]["step"] == "10"
    before = file_hashes(parted, (".lock",))
    with pytest.raises(Exception, match="stopped on purpose"):
        fit(resume_config(parted), parted, resume=True, plugins=scalars(fail_at=11), progress=False)
    assert file_hashes(parted, (".lock",)) == before  # its step rows were held back: nothing changed
    fit(resume_config(parted), parted, resume=True, plugins=scalars(), progress=False)
    assert read_jsonl(parted / "steps.jsonl") == read_jsonl(straight / "steps.jsonl")
    assert _without_timing(read_metrics(parted)) == _without_timing(read_metrics(straight))
    assert _without_timing(read_csv(parted / "metrics.csv")) == _without_timing(read_csv(straight / "metrics.csv"))
    assert read_csv(parted / "steps.csv") == read_csv(straight / "steps.csv")
    assert _tb_without_timing(parted) == _tb_without_timing(straight)


def test_a_backend_added_on_resume_holds_the_whole_run(tmp_path, scalars):
    run = tmp_path / "run"
    fit(raw_config(log={"backends": ["jsonl"]}), run, plugins=scalars(), until=2, progress=False)
    assert not (run / "metrics.csv").exists()
    raw = resume_config(run)
    raw["log"]["backends"] = ["jsonl", "csv", "tensorboard"]
    fit(raw, run, resume=True, plugins=scalars(), progress=False)
    assert [r["epoch"] for r in read_csv(run / "metrics.csv")] == ["1", "2", "3", "3"]
    assert [int(r["step"]) for r in read_csv(run / "steps.csv")] == list(range(2, 13, 2))
    assert [s for s, _ in tensorboard(run)["val/top1"]] == [4, 8, 12]
    overrides = json.loads((run / "run.json").read_text())["overrides"]
    assert [(o["key"], o["new"]) for o in overrides] == [("log.backends", ["jsonl", "csv", "tensorboard"])]


def test_a_missing_tensorboard_package_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ConfigError, match=r"log.backends lists 'tensorboard' but the tensorboard package is not "
                                          r"installed; pip install 'batchkin\[tensorboard\]'"):
        fit(tiny_config(["ce"], log=BACKENDS), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_the_methods_report_their_step_scalars():
    """BBN's alpha and the SSL bases' momentum per optimizer step (state.step_metrics)."""
    moco = run_plugin(["moco"], steps=1)
    assert set(moco.step_metrics) == {"moco/momentum"}
    assert moco.step_metrics["moco/momentum"] == moco.hooks.methods["moco"].momentum
    bbn = run_plugin(["bbn"], steps=1, config=tiny_config(model={"name": "resnet8", "width": 4}))
    assert bbn.step_metrics == {"bbn/alpha": bbn.hooks.methods["bbn"].alpha}


def test_a_line_torn_by_a_killed_process_is_dropped_on_resume(tmp_path):
    """A process killed while appending leaves half a line: resume cuts steps.jsonl back to
    the checkpoint's step and writes the CSV files again from whole rows only."""
    from batchkin.loggers import RunLog
    from batchkin.rundir import RunDir

    run = RunDir(tmp_path)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "step": 2, "loss": 0.5}) + "\n")
    rows = [{"step": s, "epoch": 1 + (s > 2), "loss": 1.0 / s} for s in (1, 2, 3)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')
    log = RunLog(run, ["jsonl", "csv"], pending=True)
    log.step({"step": 3, "epoch": 2, "loss": 0.25})  # the resumed run's row: held until resume()
    before = (tmp_path / "steps.jsonl").read_text()
    assert before.endswith('{"step": 4, "lo') and not (tmp_path / "steps.csv").exists()
    log.resume(step=2)
    assert read_jsonl(tmp_path / "steps.jsonl") == rows[:2] + [{"step": 3, "epoch": 2, "loss": 0.25}]
    assert [r["step"] for r in read_csv(tmp_path / "steps.csv")] == ["1", "2", "3"]
    assert read_csv(tmp_path / "metrics.csv") == [{"kind": "epoch", "epoch": "1", "step": "2", "loss": "0.5"}]
