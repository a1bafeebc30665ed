"""What ``--resume`` may change, and that it says so: allowed keys are applied and recorded
(config.toml, run.json's ``overrides``), every other change and every impossible epoch is
refused with one line and nothing written, and the plugin files a run was trained with are
found again (and checked) by ``eval`` and ``--resume``."""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import re
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from batchkin import faults
from batchkin.config import resume_keys

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _config(run) -> dict:
    return tomllib.loads((run / "config.toml").read_text())


def _overrides(run) -> list[tuple]:
    history = json.loads((run / "run.json").read_text()).get("overrides", [])
    for h in history:
        assert datetime.datetime.fromisoformat(h["time"]).tzinfo is not None
    return [(h["key"], h["old"], h["new"], h["epoch"]) for h in history]


def resume(run, *sets: str, extra=()) -> list[str]:
    return ["train", "--quiet", "--resume", run, *[a for s in sets for a in ("--set", s)], *extra]


# ------------------------------------------------------------------------------ allowed changes


def test_allowed_changes_are_applied_and_recorded(cli, old_run):
    run, _ = old_run
    saved = _config(run)
    cli.ok(resume(run, "epochs=3", "train.eval_every=2", "train.log_every=5"))
    want = copy.deepcopy(saved)
    want["epochs"], want["train"]["eval_every"], want["train"]["log_every"] = 3, 2, 5
    assert _config(run) == want
    assert _overrides(run) == [("epochs", 2, 3, 2), ("train.eval_every", 1, 2, 2), ("train.log_every", 1000, 5, 2)]
    lines = faults.epoch_lines(run)
    assert [(r["kind"], r["epoch"]) for r in lines] == [("epoch", 1), ("epoch", 2), ("epoch", 3), ("final", 3)]
    assert faults.checkpoint(run)["epoch"] == 3
    # a later resume appends to the history; a value given as it is saved is no change
    cli.ok(resume(run, "epochs=4", "train.eval_every=2"))
    assert _overrides(run)[3:] == [("epochs", 3, 4, 3)]
    assert _config(run)["epochs"] == 4


def test_cadence_changes_leave_the_training_unchanged(cli, tmp_path, tiny_args):
    """4 epochs straight == 2 epochs, then --resume with every cadence key changed."""
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    cli.ok([*tiny_args(4), "--out", straight])
    cli.ok([*tiny_args(4), "--out", parted, "--until", "2"])
    cli.ok(resume(parted, "train.eval_every=4", "train.checkpoint_every=3", "train.log_every=1",
                  'train.on_nonfinite="skip"', "data.eval_batch_size=5"))
    a, b = faults.checkpoint(straight), faults.checkpoint(parted)
    assert a["epoch"] == b["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    pick = ("epoch", "step", "loss", "lr")
    assert [[r.get(k) for k in pick] for r in faults.epoch_lines(straight) if r["kind"] == "epoch"] == \
        [[r.get(k) for k in pick] for r in faults.epoch_lines(parted) if r["kind"] == "epoch"]
    assert ["val/top1" in r for r in faults.epoch_lines(parted)[:4]] == [True, True, False, True]


def test_the_readme_lists_the_keys_that_may_change_on_resume():
    section = README.split("### Resume semantics", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    line = next(x for x in section.splitlines() if x.startswith("- **May change**"))
    assert re.findall(r"`([\w.]+)`", line.split(":", 1)[1].split(";", 1)[0]) == resume_keys()


# ------------------------------------------------------------------------------ refused changes


REFUSED = ["optim.lr=1e30", 'optim.name="adamw"', "optim.no_decay_norm_bias=true", 'data.name="digits"', "seed=1",
           "data.batch_size=8", 'methods=["ce","bbn"]', "model.width=16", "schedule.warmup_epochs=0", 'device="cuda"',
           "data.synthetic_per_class=1000000000"]


@pytest.mark.parametrize("setting", REFUSED)
def test_changes_of_what_the_run_computes_are_refused(setting, cli, old_run, folder_hash):
    run, before = old_run
    key = setting.split("=")[0]
    cli.user_error(resume(run, setting), f"--resume cannot change {key} (",
                   "--resume may change only epochs, data.eval_batch_size, train.eval_every")
    assert folder_hash(run) == before


def test_an_unknown_key_on_resume_is_named(cli, old_run, folder_hash):
    run, before = old_run
    cli.user_error(resume(run, "train.eval_evry=2"), "unknown config key train.eval_evry (did you mean 'eval_every'?)")
    assert folder_hash(run) == before


def test_a_config_edited_to_another_optimizer_is_refused(cli, old_run, folder_hash):
    run, _ = old_run
    for old, new in (('name = "sgd"', 'name = "adamw"'), ("no_decay_norm_bias = false", "no_decay_norm_bias = true")):
        text = (run / "config.toml").read_text()
        (run / "config.toml").write_text(text.replace(old, new))
        before = folder_hash(run)
        cli.user_error(resume(run, "epochs=3"), "the checkpoint's optimizer is not the config's",
                       "the optimizer cannot change on resume")
        assert folder_hash(run) == before
        (run / "config.toml").write_text(text)


@pytest.mark.parametrize("args,what", [
    (["--set", "epochs=1"], "epochs = 1 is below the 2 epochs {run} has trained"),
    (["--until", "0"], "--until must be an epoch >= 1; got 0"),
    (["--until", "-1"], "--until must be an epoch >= 1; got -1"),
    (["--until", "1", "--set", "epochs=4"], "--until 1: {run} has already trained 2 epochs; give a later epoch, up to epochs = 4"),
    (["--until", "2", "--set", "epochs=4"], "--until 2: {run} has already trained 2 epochs"),
    (["--until", "5", "--set", "epochs=4"], "--until 5 is beyond epochs = 4"),
    (["--overwrite"], "--resume continues a run and --overwrite replaces it"),
    (["--out", "elsewhere"], "--out cannot differ"),
])
def test_impossible_epochs_on_resume_are_refused(args, what, cli, old_run, folder_hash):
    run, before = old_run
    cli.user_error(["train", "--quiet", "--resume", run, *args], what.format(run=run))
    assert folder_hash(run) == before


@pytest.mark.parametrize("until", ["0", "-1", "3"])
def test_impossible_until_on_a_new_run_creates_nothing(until, cli, tmp_path, tiny_args):
    run = tmp_path / "run"
    cli.user_error([*tiny_args(2), "--until", until, "--out", run], f"--until {until}" if until == "3" else
                   f"--until must be an epoch >= 1; got {until}")
    assert not run.exists()


# ------------------------------------------------------------------------------ plugin files


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def plugin_run(cli, tmp_path, bad_plugin, tiny_args):
    run = tmp_path / "run"
    cli.ok([*tiny_args(1, 'methods=["ce","bad"]', "bad.from_epoch=9"), "--plugin", bad_plugin, "--out", run])
    return run


def test_run_json_records_the_plugin_files(plugin_run, bad_plugin):
    info = json.loads((plugin_run / "run.json").read_text())
    assert info["plugin_files"] == [{"path": str(bad_plugin.absolute()), "sha256": _sha(bad_plugin)}]
    assert info["plugins"]["bad"] == f"file {bad_plugin}"


def test_eval_and_resume_load_the_plugin_files_again(cli, plugin_run, tmp_path, bad_plugin):
    run = plugin_run
    assert cli.evaluated_epoch(run) == 1  # no --plugin
    cli.ok(resume(run, "epochs=2"))
    assert faults.checkpoint(run)["epoch"] == 2
    # a copy of the same file, given with --plugin, serves when the original is gone
    copy_ = tmp_path / "copy" / "bad.py"
    copy_.parent.mkdir()
    shutil.copy(bad_plugin, copy_)
    bad_plugin.unlink()
    assert json.loads(cli.ok(["eval", run, "--plugin", copy_]))["epoch"] == 2


def test_a_changed_or_missing_plugin_file_is_refused(cli, plugin_run, tmp_path, bad_plugin, folder_hash):
    run = plugin_run
    before, old_sha = folder_hash(run), _sha(bad_plugin)
    bad_plugin.write_text(bad_plugin.read_text() + "\n# edited after the run\n")
    for argv in (["eval", run], resume(run, "epochs=2")):
        cli.user_error(argv, f"the plugin file {bad_plugin.absolute()} changed since {run} was trained with it",
                       f"sha256 {old_sha[:12]}, now {_sha(bad_plugin)[:12]}", "--allow-changed-plugins")
    other = tmp_path / "other" / "bad.py"
    other.parent.mkdir()
    other.write_text(bad_plugin.read_text())
    cli.user_error(["eval", run, "--plugin", other], f"{other} differs from the plugin file {bad_plugin.absolute()}")
    assert folder_hash(run) == before
    assert json.loads(cli.ok(["eval", run, "--allow-changed-plugins"]))["epoch"] == 1
    cli.user_error(["train", "--quiet", "--allow-changed-plugins", "--out", tmp_path / "new"],
                   "--allow-changed-plugins applies to --resume")
    # resuming with the changed file records it
    cli.ok(resume(run, "epochs=2", extra=["--allow-changed-plugins"]))
    history = json.loads((run / "run.json").read_text())["overrides"]
    assert [h["key"] for h in history] == ["epochs", "plugin_files"]
    assert history[1]["old"] == [{"path": str(bad_plugin.absolute()), "sha256": old_sha}]
    assert history[1]["new"] == [{"path": str(bad_plugin.absolute()), "sha256": _sha(bad_plugin)}]
    bad_plugin.unlink()
    cli.user_error(["eval", run], f"{run} was trained with the plugin file {bad_plugin.absolute()}, which is missing")
