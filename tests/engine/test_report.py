"""The run report: classes in frequency order with names, long-tail-only groups, method scalars,
kNN labels, partial reports after --until, and the probe's result."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from batchkin.cli import main
from batchkin.report import final_line, is_long_tailed, method_scalars, write_report
from batchkin.trainer import fit, resume_config

PNG = b"\x89PNG\r\n\x1a\n"


def _png_ok(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG and path.stat().st_size > 1000


def test_long_tailed_means_the_largest_class_has_three_times_the_smallest():
    assert is_long_tailed([9, 3]) and is_long_tailed([100, 50, 10])
    assert not is_long_tailed([8, 3]) and not is_long_tailed([145, 130, 140]) and not is_long_tailed([])
    assert is_long_tailed([3, 0])  # an empty class counts as one image


RECORD = {"test/top1": 0.5, "test/balanced_acc": 0.25, "test/many_acc": 1.0, "test/medium_acc": 0.125,
          "test/few_acc": float("nan"), "test/shot_split": "relative"}


def test_final_line_shows_the_groups_only_for_long_tailed_data_and_names_knn():
    assert final_line(RECORD, {"long_tailed": True}) == (
        "batchkin: test top-1 50.00%, balanced 25.00%, many 100.00% / medium 12.50% / few n/a (relative split)")
    assert final_line(RECORD, {"long_tailed": False}) == "batchkin: test top-1 50.00%, balanced 25.00%"
    assert final_line(RECORD, {"long_tailed": False, "evaluation": "kNN"}) == \
        "batchkin: test kNN top-1 50.00%, balanced 25.00%"
    assert final_line({**RECORD, "test/loss": 0.123456}, {"long_tailed": False}) == \
        "batchkin: test top-1 50.00%, balanced 25.00%, loss 0.1235"


def test_method_scalars_are_every_other_number_grouped_by_prefix():
    epochs = [
        {"kind": "epoch", "epoch": 1, "step": 3, "loss": 1.0, "lr": 0.1, "images_per_s": 9.0, "train/ce": 1.0,
         "bbn/alpha": 1.0, "drloc/lambda": 0.0, "val/top1": 0.5, "val/balanced_acc": 0.5, "val/many_acc": 0.5,
         "val/per_class": [0.5], "val/shot_split": "relative", "val/top5": 0.9, "flag": True},
        {"kind": "epoch", "epoch": 2, "bbn/alpha": 0.5, "drloc/loss": 2.0, "data/skipped_images": 3, "momentum": 0.9},
    ]
    assert method_scalars(epochs) == {"bbn": ["bbn/alpha"], "drloc": ["drloc/lambda", "drloc/loss"],
                                      "val": ["val/top5"], "data": ["data/skipped_images"], "other": ["momentum"]}


def _fake_run(folder: Path, classes: dict | None, final: bool = True, probe: dict | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"methods": ["moco"], "seed": 0, "device": "cpu", "torch": "x"}))
    (folder / "config.toml").write_text("epochs = 5\n")
    per = [0.25, 1.0, 0.5]
    lines = [{"kind": "epoch", "epoch": e, "step": 2 * e, "loss": 1.0 / e, "lr": 0.1, "images_per_s": 10.0,
              "moco/momentum": 0.99 + e / 1000, "val/top1": 0.5, "val/balanced_acc": 0.5, "val/many_acc": 1.0,
              "val/medium_acc": 0.5, "val/few_acc": 0.25, "val/per_class": per} for e in (1, 2)]
    if final:
        lines.append({"kind": "final", "epoch": 2, "best_val_epoch": 2, **RECORD, "test/shot_split": "absolute",
                      "test/per_class": per})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if classes is not None:
        (folder / "classes.json").write_text(json.dumps(classes))
    if probe is not None:
        (folder / "probe.json").write_text(json.dumps(probe))
    return folder


CLASSES = {"names": ["cat", "dog", "emu"], "train_counts": [5, 40, 12], "groups": ["few", "many", "medium"],
           "shot_split": "absolute", "long_tailed": True, "evaluation": "kNN"}


def test_report_lists_classes_by_frequency_with_names_and_labels_knn(tmp_path):
    run = _fake_run(tmp_path / "r", CLASSES)
    text = write_report(run).read_text()
    assert "| kNN top-1 | balanced | many | medium | few |" in text
    assert "| 50.00 | 25.00 | 100.00 | 12.50 | n/a |" in text
    assert "## Classes, most frequent first (test kNN accuracy)" in text
    table = text.split("| label | class | training images | group | accuracy |\n|---|---|---|---|---|\n")[1]
    assert table.startswith("| 1 | dog | 40 | many | 100.00 |\n| 2 | emu | 12 | medium | 50.00 |\n"
                            "| 0 | cat | 5 | few | 25.00 |\n")
    assert "| epoch | loss | lr | val kNN top-1 | val balanced | val many | val medium | val few | img/s |" in text
    assert "Partial report" not in text
    assert _png_ok(run / "curves.png") and _png_ok(run / "per_class.png")
    assert "![curves](curves.png)" in text and "![per_class](per_class.png)" in text


def test_report_of_balanced_data_has_no_groups(tmp_path):
    run = _fake_run(tmp_path / "r", {**CLASSES, "train_counts": [10, 12, 11], "long_tailed": False,
                                     "evaluation": "classifier"})
    text = write_report(run).read_text()
    assert "| top-1 | balanced |\n|---|---|\n| 50.00 | 25.00 |" in text
    assert "many" not in text.lower() and "kNN" not in text


def test_partial_report_says_so_and_shows_the_latest_validation(tmp_path):
    run = _fake_run(tmp_path / "r", None, final=False)  # no classes.json: labels stand for the names
    text = write_report(run).read_text()
    assert "**Partial report: the run stopped after epoch 2 of 5** (`--until`)" in text
    assert "## Test" not in text
    assert "## Classes, most frequent first (validation (epoch 2) accuracy)" in text
    assert "| 0 | 0 | ? | - | 25.00 |" in text


def test_report_shows_the_probe(tmp_path):
    probe = {"last.pt": {"epoch": 2, "top1": 0.75, "balanced_acc": 0.5, "val_top1": 0.5, "train_top1": 1.0,
                         "epochs": 3, "lr": 0.1}}
    text = write_report(_fake_run(tmp_path / "r", CLASSES, probe=probe)).read_text()
    assert "| last.pt | 2 | 75.00 | 50.00 | 50.00 | 100.00 | 3 | 0.1 |" in text


# ------------------------------------------------------------------------------ real runs


def _ce_config(tiny, **over):
    return tiny(epochs=3, **over)


def test_until_leaves_a_partial_report_and_the_resumed_run_a_full_one(tmp_path, tiny):
    run = tmp_path / "run"
    raw = _ce_config(tiny)
    fit(raw, run, until=2, progress=False)
    text = (run / "report.md").read_text()
    assert "Partial report: the run stopped after epoch 2 of 3" in text
    assert _png_ok(run / "curves.png") and _png_ok(run / "per_class.png")
    fit(resume_config(run), run, resume=True, progress=False)
    text = (run / "report.md").read_text()
    assert "Partial report" not in text and "## Test (final weights)" in text and "| 3 |" in text


def test_classes_json_holds_names_counts_and_groups_and_the_final_line_shows_groups_on_long_tailed_data(
        tmp_path, tiny):
    stream = io.StringIO()
    lt = tiny(epochs=1, data={"synthetic_per_class": 40, "imbalance_factor": 6})
    result = fit(lt, tmp_path / "lt", progress=True, stream=stream)
    classes = json.loads((tmp_path / "lt" / "classes.json").read_text())
    counts = result.state.splits.train_counts().tolist()
    assert classes["names"] == result.state.splits.classes and classes["train_counts"] == counts
    assert counts[0] >= 3 * counts[-1] and classes["long_tailed"] is True and classes["evaluation"] == "classifier"
    assert len(classes["groups"]) == len(counts) and classes["groups"][0] == "many" and classes["groups"][-1] == "few"
    final = [line for line in stream.getvalue().splitlines() if line.startswith("batchkin: test")]
    assert final == [final_line(result.final, classes)] and " / few " in final[0]

    stream = io.StringIO()
    fit(tiny(epochs=1), tmp_path / "flat", progress=True, stream=stream)
    assert json.loads((tmp_path / "flat" / "classes.json").read_text())["long_tailed"] is False
    final = [line for line in stream.getvalue().splitlines() if line.startswith("batchkin: test")]
    assert len(final) == 1 and "many" not in final[0] and "balanced" in final[0]
    assert "val many" not in (tmp_path / "flat" / "report.md").read_text()


def test_image_folder_class_names_reach_the_report(tmp_path, tiny):
    from PIL import Image

    root = tmp_path / "images"
    for name, n, value in (("ankle boot", 12, 40), ("bag", 20, 200)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (6, 6), (value, i * 5, 0)).save(root / name / f"{i}.png")
    raw = tiny(epochs=1, data={"name": "imagefolder", "root": str(root), "test_fraction": 0.25,
                               "val_fraction": 0.25})
    fit(raw, tmp_path / "run", progress=False)
    assert json.loads((tmp_path / "run" / "classes.json").read_text())["names"] == ["ankle boot", "bag"]
    text = (tmp_path / "run" / "report.md").read_text()
    rows = text.split("| label | class | training images | accuracy |\n|---|---|---|---|\n")[1]  # not long-tailed
    assert rows.startswith("| 1 | bag | ") and "\n| 0 | ankle boot | " in rows  # the larger class first


def test_probe_saves_its_result_and_the_report_shows_it(tmp_path, tiny, capsys):
    run = tmp_path / "run"
    fit(tiny(epochs=1), run, progress=False)
    assert not (run / "probe.json").exists()
    assert main(["probe", str(run), "--epochs", "2", "--batch-size", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    saved = json.loads((run / "probe.json").read_text())
    assert list(saved) == ["last.pt"]
    assert saved["last.pt"]["top1"] == printed["top1"] and saved["last.pt"]["epochs"] == 2
    assert main(["probe", str(run), "--epochs", "3", "--batch-size", "8", "--best"]) == 0
    capsys.readouterr()
    saved = json.loads((run / "probe.json").read_text())
    assert sorted(saved) == ["best.pt", "last.pt"] and saved["best.pt"]["epochs"] == 3
    assert not [p for p in run.iterdir() if ".tmp" in p.name]
    text = (run / "report.md").read_text()
    assert "## Linear probe" in text and "| best.pt | 1 |" in text and "| last.pt | 1 |" in text


def test_ssl_bases_evaluate_with_knn():
    from batchkin.plugin import Method
    from batchkin.plugins.dino import DINO
    from batchkin.plugins.moco import MoCo

    assert Method.evaluation == "classifier"
    assert MoCo.evaluation == "kNN" and DINO.evaluation == "kNN"


def test_class_info_takes_an_enabled_methods_evaluation(tiny):
    from batchkin.report import class_info
    from batchkin.trainer import prepare

    state = prepare(tiny(epochs=1))
    assert class_info(state)["evaluation"] == "classifier"
    state.hooks.methods["ce"].evaluation = "kNN"  # an instance attribute, as a method could set it
    info = class_info(state)
    assert info["evaluation"] == "kNN" and info["names"] == state.splits.classes
    assert info["train_counts"] == [int(c) for c in torch.bincount(state.splits.train.y).tolist()]


@pytest.mark.parametrize("missing", ["classes.json", "run.json", "config.toml"])
def test_report_of_an_older_run_without_a_file(tmp_path, missing):
    run = _fake_run(tmp_path / "r", CLASSES, final=False)
    (run / missing).unlink()
    text = write_report(run).read_text()
    assert "Partial report" in text and "## Epochs" in text
