"""Faults: a process killed at any point, a full disk, out-of-memory, fuzzed configs."""

import errno
import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchkin import rundir
from batchkin.config import ENGINE_TABLES, build_config
from batchkin.errors import ConfigError, RunError
from batchkin.plugin import Plugins
from batchkin.rundir import load_checkpoint
from batchkin.testing import tiny_config
from batchkin.trainer import fit

import faults

ARGS = faults.tiny_run_args(epochs=4)
KILLER = faults.KILLER_ARGS


def _weights(run):
    return faults.checkpoint(run)["model"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of the same config (with the killer method, which never fires)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    r = faults.run("none", 0, ["train", "--quiet", "--out", str(run), *ARGS, *KILLER])
    assert r.returncode == 0, r.stderr
    return run


@pytest.mark.parametrize("kind,at", [
    ("step", 9),    # mid-epoch 2 (6 steps per epoch): epoch 1's checkpoint survives
    ("step", 13),   # early in epoch 3
    ("write", 6),   # inside the 2nd epoch's checkpoint write
    ("write", 4),   # inside the 1st epoch's metrics.jsonl append
])
def test_kill_then_resume_equals_uninterrupted(tmp_path, reference, kind, at):
    run = tmp_path / "run"
    cli = ["train", "--quiet", "--out", str(run), *ARGS, *KILLER]
    r = faults.run(kind, at, cli)
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    ckpt = run / "checkpoints" / "last.pt"
    if ckpt.exists():  # whatever is on disk is a complete, loadable checkpoint
        load_checkpoint(ckpt)
    if not ckpt.exists():  # killed before the first checkpoint: start again
        r = faults.run("none", 0, [*cli, "--overwrite"])
    else:
        r = faults.run("none", 0, ["train", "--quiet", "--resume", str(run), "--plugin", faults.PLUGIN_FILE])
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list((run / "checkpoints").glob(".*.tmp-*")), "stale temporary files are removed on resume"
    want, got = _weights(reference), _weights(run)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    assert faults.epoch_lines(run) == faults.epoch_lines(reference)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    raw = tiny_config(epochs=3)
    real_open = open
    calls = {"n": 0}

    class FullDisk(io.BufferedWriter):
        pass

    def open_full_on_epoch_2_checkpoint(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and "last.pt.tmp" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:
                fh.close()
                raise OSError(errno.ENOSPC, "No space left on device")
        return fh

    monkeypatch.setattr(rundir, "open", open_full_on_epoch_2_checkpoint, raising=False)
    with pytest.raises(RunError, match="disk full while writing .*last.pt; the previous version is intact"):
        fit(raw, out, progress=False)
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt")
    assert ckpt["epoch"] == 1
    assert not list((out / "checkpoints").glob(".*.tmp-*"))
    assert not (out / ".lock").exists()


def test_disk_full_through_the_cli_exits_2(tmp_path, monkeypatch, capsys):
    from batchkin.cli import main

    def full(path, data):
        raise RunError(f"disk full while writing {path}; the previous version is intact")

    monkeypatch.setattr(rundir, "atomic_write_bytes", full)
    code = main(["train", "--quiet", "--out", str(tmp_path / "run"), *ARGS[:-2]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("batchkin: error: disk full") and "Traceback" not in err


def test_out_of_memory_is_a_clear_message(tmp_path, monkeypatch):
    from batchkin import trainer

    def oom(state, indices):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trainer, "train_step", oom)
    with pytest.raises(
        RunError, match=r"out of memory at epoch 1 step 1 with data.batch_size = 16 .*--set data.batch_size=8"):
        fit(tiny_config(), tmp_path / "run", progress=False)
    # the run folder is consistent: config written, no checkpoint, no half files, unlocked
    assert (tmp_path / "run" / "config.toml").exists()
    assert not list((tmp_path / "run" / "checkpoints").iterdir())
    assert not (tmp_path / "run" / ".lock").exists()


# ------------------------------------------------------------------------------ fuzzing

_PLUGINS = None


def _methods():
    global _PLUGINS
    if _PLUGINS is None:
        _PLUGINS = Plugins(autoload=False)
    return _PLUGINS.registry.methods


values = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(st.text(
        max_size=4), st.integers(), max_size=2),
)
KEYS = [
    "seed", "epochs", "methods", "device", "data.name", "data.batch_size", "data.imbalance_factor", "data.val_fraction",
        "data.image_size", "data.hflip", "optim.name", "optim.lr", "optim.betas", "schedule.name",
        "schedule.milestones",
        "schedule.warmup_epochs", "train.amp", "train.grad_clip", "metrics.few_threshold", "model", "data", "nosuchkey",
        "data.nosuch"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=values)
def test_fuzzed_config_values_give_config_errors_only(key, value):
    raw = {}
    node = raw
    *path, last = key.split(".")
    for p in path:
        node = node.setdefault(p, {})
    if value is None:
        return  # TOML has no null
    node[last] = value
    try:
        build_config(raw, _methods())
    except ConfigError as exc:
        msg = str(exc)
        assert "\n" not in msg
        named = last if last not in ENGINE_TABLES else key
        assert named in msg or "table" in msg or "methods" in msg, msg
