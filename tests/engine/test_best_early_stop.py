"""Checkpoint selection (``train.best_metric``) and early stopping (``[train.early_stop]``):
the default per kind of data, any validation metric by name (checked before anything is
written), best.pt, the stop itself and its exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from batchkin.cli import main
from batchkin.errors import ConfigError
from batchkin.metrics import is_long_tailed
from batchkin.plugin import Plugins
from batchkin.testing import tiny_config
from batchkin.trainer import fit, prepare, resume_config

# a method that adds a scripted validation metric: "score" by epoch (and "score_loss", its negative)
SCRIPTED = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    SCORES = {1: 0.50, 2: 0.52, 3: 0.56, 4: 0.57, 5: 0.58, 6: 0.90, 7: 0.95, 8: 0.99}


    class Scripted(Method):
        val_metrics = ("score", "score_loss")

        @hookimpl
        def on_evaluate(self, state, split, metrics):
            metrics["score"] = SCORES[state.epoch]
            metrics["score_loss"] = -SCORES[state.epoch]


    @hookimpl
    def register_methods(register):
        register("scripted", Scripted)
"""


@pytest.fixture
def scripted(plugin_file):
    path = plugin_file("scripted_plugin", SCRIPTED)
    return lambda: Plugins(extra_files=[path])


def run_json(run) -> dict:
    return json.loads((run / "run.json").read_text())


def test_long_tailed_data_is_recognised():
    assert is_long_tailed([10, 10, 10], imbalance_factor=10.0)  # asked for a long-tailed subset
    assert not is_long_tailed([178, 182, 177])  # digits
    assert is_long_tailed([100, 50, 20])  # 5:1
    assert is_long_tailed([30, 10]) and not is_long_tailed([29, 10])  # three times the smallest class or more
    assert is_long_tailed([5, 0])  # a class without images
    assert not is_long_tailed([])


def test_the_default_metric_is_balanced_accuracy_on_long_tailed_data(tmp_path):
    balanced = prepare(tiny_config(["ce"]))
    assert (balanced.selection.metric, balanced.selection.why) == ("top1", "auto: balanced training data")
    lt = prepare(tiny_config(["ce"], data={"imbalance_factor": 4.0}))
    assert (lt.selection.metric, lt.selection.mode) == ("balanced_acc", "max")
    assert lt.selection.why == "auto: long-tailed training data"
    fit(tiny_config(["ce"], epochs=1, data={"imbalance_factor": 4.0}), tmp_path / "lt", progress=False)
    assert run_json(tmp_path / "lt")["best_metric"] == {"metric": "balanced_acc", "mode": "max",
                                                        "chosen_by": "auto: long-tailed training data"}
    assert "early_stop" not in run_json(tmp_path / "lt")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("best_metric", "top-1",
     "train.best_metric = 'top-1' is not a validation metric of this run (did you mean 'top1'?)"),
    ("best_metric", "knn_top5", "train.best_metric = 'knn_top5' is not a validation metric of this run; one of top1, "
                                "balanced_acc, many_acc, medium_acc, few_acc"),
])
def test_an_unknown_metric_is_refused_before_anything_is_written(tmp_path, capsys, key, value, message):
    with pytest.raises(ConfigError) as info:
        prepare(tiny_config(["ce"], train={key: value}))
    assert str(info.value).startswith(message)
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "--set", f"train.{key}={value!r}".replace("'", '"'),
                 "--set", "data.name=synthetic", "--set", "model.name=tiny", "--set", "device=cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"batchkin: error: {message}") and err.count("\n") == 1 and not out.exists()
    with pytest.raises(ConfigError, match="train.early_stop.metric = 'scroe' is not a validation metric"):
        prepare(tiny_config(["ce"], train={"early_stop": {"patience": 2, "metric": "scroe"}}))


def test_best_checkpoint_follows_the_chosen_metric(tmp_path, scripted, metrics_lines):
    """best_metric = 'val/score_loss' (a method's, lower is better): best.pt is its lowest epoch."""
    raw = tiny_config(["ce", "scripted"], epochs=3, train={"best_metric": "val/score_loss"})
    fit(raw, tmp_path / "run", plugins=scripted(), progress=False)
    lines = metrics_lines(tmp_path / "run")
    assert [r["val/score_loss"] for r in lines[:3]] == [-0.50, -0.52, -0.56]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 3 and best["best"] == {"epoch": 3, "score_loss": -0.56}
    assert lines[-1]["best_val_epoch"] == 3
    assert run_json(tmp_path / "run")["best_metric"] == {"metric": "score_loss", "mode": "min",
                                                         "chosen_by": "train.best_metric"}


STOP = {"best_metric": "score", "early_stop": {"patience": 2, "min_delta": 0.05}}


def test_early_stop_ends_the_run_cleanly(tmp_path, scripted, metrics_lines):
    """score 0.50, 0.52, 0.56, 0.57, 0.58: only epoch 3 beats the best by more than 0.05,
    so epochs 4 and 5 make two evaluations without improvement and the run stops at 5."""
    run = tmp_path / "run"
    result = fit(tiny_config(["ce", "scripted"], epochs=8, train=STOP), run, plugins=scripted(), progress=False)
    lines = metrics_lines(run)
    assert [(r["kind"], r["epoch"]) for r in lines] == [("epoch", e) for e in range(1, 6)] + [("final", 5)]
    final = lines[-1]
    assert final["early_stop_epoch"] == 5 and "test/top1" in final and result.final == final
    assert final["best_val_epoch"] == 5  # best.pt still takes any strict improvement
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 5 and last["early_stop"] == {"best": 0.56, "bad": 2, "stopped": 5}
    info = run_json(run)
    assert info["early_stop"] == {
        "metric": "score", "mode": "max", "patience": 2, "min_delta": 0.05, "stopped_epoch": 5}
    assert (run / "report.md").is_file()


def test_early_stop_resume_keeps_its_counters(tmp_path, scripted, comparable):
    raw = tiny_config(["ce", "scripted"], epochs=8, train=STOP)
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    fit(raw, straight, plugins=scripted(), progress=False)
    fit(raw, parted, until=4, plugins=scripted(), progress=False)  # one evaluation without improvement so far
    assert torch.load(parted / "checkpoints" / "last.pt", weights_only=True)["early_stop"] == \
        {"best": 0.56, "bad": 1, "stopped": 0}
    fit(resume_config(parted), parted, resume=True, plugins=scripted(), progress=False)
    assert comparable(parted) == comparable(straight)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(parted / "checkpoints" / "last.pt", weights_only=True)
    assert a["early_stop"] == b["early_stop"] and a["epoch"] == b["epoch"] == 5
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # a stopped run trains no further when resumed: its final evaluation is redone
    again = fit(resume_config(parted), parted, resume=True, plugins=scripted(), progress=False)
    assert again.state.epoch == 5 and comparable(parted) == comparable(straight)


def test_min_mode_and_no_validation_split(tmp_path, scripted, metrics_lines):
    # watching a loss: lower is better; score_loss keeps falling, so the run never stops
    raw = tiny_config(["ce", "scripted"], epochs=4, train={"early_stop": {"patience": 1, "metric": "score_loss"}})
    fit(raw, tmp_path / "run", plugins=scripted(), progress=False)
    assert "early_stop_epoch" not in metrics_lines(tmp_path / "run")[-1]
    # mode = max on the same metric: the first evaluation after epoch 1 does not improve
    raw["train"]["early_stop"]["mode"] = "max"
    fit(raw, tmp_path / "max", plugins=scripted(), progress=False)
    assert metrics_lines(tmp_path / "max")[-1]["early_stop_epoch"] == 2
    with pytest.raises(ConfigError, match=r"train.early_stop.patience = 2 needs a validation split; "
                                          r"data.val_fraction is 0.0"):
        prepare(tiny_config(["ce"], data={"val_fraction": 0.0}, train={"early_stop": {"patience": 2}}))


def test_the_validation_loss_selects_best_pt_lowest_first(tmp_path, metrics_lines):
    """best_metric = 'loss' (the classifier's mean cross-entropy, lower is better)."""
    raw = tiny_config(["ce"], epochs=3, optim={"lr": 0.5}, train={"best_metric": "loss"})
    fit(raw, tmp_path / "run", progress=False)
    losses = [r["val/loss"] for r in metrics_lines(tmp_path / "run")[:3]]
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["best"] == {"epoch": 1 + losses.index(min(losses)), "loss": min(losses)}
    assert run_json(tmp_path / "run")["best_metric"]["mode"] == "min"


def test_a_knn_evaluated_run_has_no_validation_loss_to_select_by():
    from batchkin.plugins import moco

    with pytest.raises(ConfigError, match="train.best_metric = 'loss' is not a validation metric of this run"):
        prepare(tiny_config(["moco"], data={"augment": False}, train={"best_metric": "loss"}),
                plugins=Plugins(extra_modules=[moco]))
