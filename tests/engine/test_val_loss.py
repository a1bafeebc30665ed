"""Validation and test loss (the mean cross-entropy over the split, from the evaluation's one
forward pass) in metrics.jsonl, TensorBoard, CSV, the epoch line, the final line and the
report; none for a kNN evaluation, whose accuracies the epoch line labels as the report does;
and ``batchkin eval`` / ``batchkin probe`` with the run's ``train.threads``."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
import torch.nn.functional as F

from batchkin import report, trainer
from batchkin.cli import main
from batchkin.data import DeviceData
from batchkin.plugin import Plugins
from batchkin.report import evaluation_prefix, final_line, write_report
from batchkin.testing import tiny_config
from batchkin.trainer import _epoch_line, evaluate, fit, prepare


def _lines(run) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _by_hand(state, split) -> float:
    """F.cross_entropy of the whole split in one batch (eval mode: BatchNorm uses its running statistics)."""
    data = DeviceData(split, state.splits, state.device)
    model = state.unwrapped_model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.normalize(data.x)), data.y))


@pytest.fixture(scope="module")
def ce_run(tmp_path_factory):
    """Two epochs with label smoothing (the training loss is not plain cross-entropy), every logger,
    evaluation batches of 3 (the splits end in a short batch)."""
    run = tmp_path_factory.mktemp("val_loss") / "run"
    raw = tiny_config(["ce"], data={"eval_batch_size": 3}, ce={"label_smoothing": 0.3},
                      log={"backends": ["jsonl", "tensorboard", "csv"]})
    log = io.StringIO()
    result = fit(raw, run, stream=log)
    return run, result, log.getvalue()


def test_val_and_test_loss_are_the_mean_cross_entropy_over_the_split(ce_run):
    run, result, _ = ce_run
    state = result.state
    assert len(state.splits.val) % 3 and len(state.splits.test) % 3  # a short last batch in each
    lines = _lines(run)
    epochs, final = lines[:-1], lines[-1]
    assert [r["epoch"] for r in epochs] == [1, 2] and all(isinstance(r["val/loss"], float) for r in epochs)
    # the last epoch was evaluated with the final weights, as the test split was
    assert epochs[-1]["val/loss"] == pytest.approx(_by_hand(state, state.splits.val), rel=1e-6)
    assert final["test/loss"] == pytest.approx(_by_hand(state, state.splits.test), rel=1e-6)
    # plain cross-entropy, not the label-smoothed training term
    data = DeviceData(state.splits.val, state.splits, state.device)
    with torch.no_grad():
        smoothed = float(F.cross_entropy(state.unwrapped_model(data.normalize(data.x)), data.y, label_smoothing=0.3))
    assert abs(smoothed - epochs[-1]["val/loss"]) > 1e-3
    # evaluate() gives the same number again (no state kept between evaluations)
    assert evaluate(state, "val", data)["loss"] == epochs[-1]["val/loss"]


def test_the_loss_reaches_tensorboard_and_csv(ce_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = ce_run
    lines = _lines(run)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in ("val/loss", "test/loss")}
    assert tb["val/loss"] == [(r["step"], pytest.approx(r["val/loss"], rel=1e-6)) for r in lines[:-1]]
    assert tb["test/loss"] == [(lines[-1]["step"], pytest.approx(lines[-1]["test/loss"], rel=1e-6))]
    with open(run / "metrics.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [float(row["val/loss"]) for row in table[:-1]] == [r["val/loss"] for r in lines[:-1]]
    assert table[-1]["val/loss"] == "" and float(table[-1]["test/loss"]) == lines[-1]["test/loss"]


def test_the_epoch_line_the_final_line_and_the_report_show_the_loss(ce_run, monkeypatch):
    run, _, printed = ce_run
    lines = _lines(run)
    epoch_lines = [x for x in printed.splitlines() if x.startswith("batchkin: epoch ")]
    assert len(epoch_lines) == 2
    for text, r in zip(epoch_lines, lines):
        assert text.startswith(f"batchkin: epoch {r['epoch']}, loss {r['loss']:.4f}, val loss {r['val/loss']:.4f}, "
                               f"val top-1 {100 * r['val/top1']:.2f}%, balanced ")
        assert "many" not in text  # balanced data
    assert f"batchkin: test top-1 {100 * lines[-1]['test/top1']:.2f}%" in printed
    assert f", loss {lines[-1]['test/loss']:.4f}" in printed
    text = (run / "report.md").read_text()
    assert "| epoch | loss | val loss | lr | val top-1 | val balanced | img/s |" in text
    assert f"| 2 | {lines[1]['loss']:.4f} | {lines[1]['val/loss']:.4f} | " in text
    assert "| top-1 | balanced | loss |" in text and f" | {lines[-1]['test/loss']:.4f} |" in text
    # the curves' loss panel: training loss and validation loss, one point per epoch
    seen = {}

    def keep(fig, path):
        if path.name == "curves.png":
            ax = fig.axes[0]
            seen.update({line.get_label(): list(line.get_ydata()) for line in ax.get_lines()})
            seen["title"] = ax.get_title()
        return path

    monkeypatch.setattr(report, "_save_png", keep)
    write_report(run)
    assert seen["title"] == "loss"
    assert seen["validation loss"] == [r["val/loss"] for r in lines[:-1]]
    assert seen["training loss"] == [r["loss"] for r in lines[:-1]]


def test_epoch_line_names_the_evaluation_as_the_report_does():
    record = {"epoch": 3, "loss": 0.5, "images_per_s": 120.4, "val/top1": 0.5, "val/balanced_acc": 0.25}
    assert _epoch_line({**record, "val/loss": 0.75}, {"evaluation": "classifier"}) == \
        "batchkin: epoch 3, loss 0.5000, val loss 0.7500, val top-1 50.00%, balanced 25.00%, 120 img/s"
    assert _epoch_line({**record, "val/loss": 0.75, "val/weights": "ema"}, {}) == \
        "batchkin: epoch 3, loss 0.5000, val (EMA) loss 0.7500, val (EMA) top-1 50.00%, balanced 25.00%, 120 img/s"
    knn = {"evaluation": "kNN"}
    assert evaluation_prefix(knn) == "kNN "
    assert _epoch_line(record, knn) == \
        "batchkin: epoch 3, loss 0.5000, val kNN top-1 50.00%, balanced 25.00%, 120 img/s"
    assert _epoch_line({"epoch": 1, "loss": 1.0, "images_per_s": 9.0}, knn) == "batchkin: epoch 1, loss 1.0000, 9 img/s"


def test_an_evaluation_that_is_not_the_classifier_has_no_loss():
    state = prepare(tiny_config(["ce"]))
    val = DeviceData(state.splits.val, state.splits, state.device)
    with_loss = evaluate(state, "val", val)
    state.hooks.methods["ce"].evaluation = "kNN"  # as an SSL base declares it
    without = evaluate(state, "val", val)
    assert "loss" in with_loss and "loss" not in without
    assert {k: v for k, v in with_loss.items() if k != "loss"} == without


def test_a_knn_run_logs_no_loss_and_labels_its_accuracies(tmp_path):
    from batchkin.plugins import moco

    run = tmp_path / "run"
    log = io.StringIO()
    raw = tiny_config(["moco"], data={"augment": False}, epochs=1, log={"backends": ["jsonl", "csv"]})
    fit(raw, run, plugins=Plugins(extra_modules=[moco]), stream=log)
    lines = _lines(run)
    assert not [k for r in lines for k in r if k.endswith("/loss")]
    printed = log.getvalue()
    epoch = [x for x in printed.splitlines() if x.startswith("batchkin: epoch 1,")]
    assert len(epoch) == 1 and f", val kNN top-1 {100 * lines[0]['val/top1']:.2f}%, " in epoch[0]
    assert "val loss" not in epoch[0]
    classes = json.loads((run / "classes.json").read_text())
    assert final_line(lines[-1], classes) in printed and "test kNN top-1" in printed
    text = (run / "report.md").read_text()
    assert "val loss" not in text and "| epoch | loss | lr | val kNN top-1 |" in text
    with open(run / "metrics.csv", newline="") as fh:
        assert "val/loss" not in next(csv.reader(fh))


# ------------------------------------------------------------------------------ eval and probe: train.threads


@pytest.fixture(scope="module")
def two_thread_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("threads") / "run"
    fit(tiny_config(["ce"], epochs=1, train={"threads": 2}), run, progress=False)
    return run


def _record_threads(monkeypatch, module, name):
    seen = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return seen


def test_eval_uses_the_runs_threads_and_gives_the_callers_back(two_thread_run, monkeypatch, capsys):
    from batchkin import probe

    before = torch.get_num_threads()
    assert before == 1  # the engine tests run with one thread
    seen = _record_threads(monkeypatch, trainer, "evaluate")
    assert main(["eval", str(two_thread_run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert seen == [2] and torch.get_num_threads() == before
    assert out["threads"] == 2 and out["threads_from"] == "train.threads"
    final = _lines(two_thread_run)[-1]
    assert out["top1"] == final["test/top1"] and out["loss"] == final["test/loss"]
    # given back after an error too (after the threads were set: the empty-split check)
    raw_config = (two_thread_run / "config.toml").read_text()
    (two_thread_run / "config.toml").write_text(raw_config.replace("val_fraction = ", "val_fraction = 0.0 #"))
    try:
        assert main(["eval", str(two_thread_run), "--split", "val"]) == 2
    finally:
        (two_thread_run / "config.toml").write_text(raw_config)
    assert "is empty" in capsys.readouterr().err and seen == [2] and torch.get_num_threads() == before

    seen = _record_threads(monkeypatch, probe, "probe_state")
    assert main(["probe", str(two_thread_run), "--epochs", "1", "--batch-size", "16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert seen == [2] and torch.get_num_threads() == before
    assert out["threads"] == 2 and out["threads_from"] == "train.threads"
    saved = json.loads((two_thread_run / "probe.json").read_text())["last.pt"]
    assert saved["threads"] == 2


def test_eval_resolves_auto_threads_as_training_does(two_thread_run, monkeypatch, capsys, tmp_path):
    import shutil

    run = tmp_path / "auto"
    shutil.copytree(two_thread_run, run)
    (run / "config.toml").write_text((run / "config.toml").read_text().replace("threads = 2", 'threads = "auto"'))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    seen = _record_threads(monkeypatch, trainer, "evaluate")
    assert main(["eval", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert seen == [3] and torch.get_num_threads() == 1
    assert (out["threads"], out["threads_from"]) == (3, "train.threads = auto: OMP_NUM_THREADS")
