"""Nothing that existed is lost, end to end through the command line: ``--overwrite`` keeps
the old run until the new one has a checkpoint (also when killed at any point), a failed
``--resume`` changes nothing, a folder that is not a batchkin run is never replaced, and a
run killed before its first checkpoint can be started again."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from batchkin import faults

KILLER = faults.KILLER_ARGS


def _bad(*sets: str) -> list[str]:
    return ['methods=["ce","bad"]', *sets]


# ------------------------------------------------------------------------------ --overwrite

FIRST_STEP_FAILURES = {
    "diverging lr": (["optim.lr=1e30", 'train.on_nonfinite="stop"'], "epoch 1 step 2: non-finite"),
    "plugin returns NaN": (_bad('bad.how="nan"'), "epoch 1 step 1: non-finite loss term(s) 'bad' from method 'bad' (loss_terms)"),
    "allocation failure": (_bad('bad.how="oom"'), "out of memory at epoch 1 step 1"),
}


@pytest.mark.parametrize("case", sorted(FIRST_STEP_FAILURES))
def test_overwrite_keeps_the_old_run_when_the_new_one_fails_at_its_first_step(
        case, cli, old_run, bad_plugin, tiny_args, folder_hash, siblings_of):
    run, before = old_run
    sets, what = FIRST_STEP_FAILURES[case]
    line = cli.user_error([*tiny_args(1, *sets), "--plugin", bad_plugin, "--overwrite", "--out", run],
                          what, f"; {run} is unchanged (the new run was discarded)")
    assert "intact" not in line
    assert folder_hash(run) == before
    assert siblings_of(run) == []


def test_overwrite_keeps_the_old_run_when_a_plugin_hook_raises(cli, old_run, bad_plugin, tiny_args, folder_hash,
                                                              siblings_of):
    run, before = old_run
    try:
        rc, _, err = cli([*tiny_args(1, *_bad('bad.how="raise"')), "--plugin", bad_plugin, "--overwrite", "--out", run])
    except RuntimeError as exc:  # the plugin's own exception, as the command line passes it on
        assert str(exc) == "bad plugin: boom"
    else:
        assert rc == 2 and "boom" in err
    assert folder_hash(run) == before
    assert siblings_of(run) == []


def test_overwrite_keeps_the_old_run_when_the_disk_fills(cli, old_run, tiny_args, folder_hash, siblings_of,
                                                        monkeypatch):
    from batchkin import rundir

    real_open = open

    def full_disk_for_checkpoints(path, mode="r", *args, **kwargs):
        if "w" in mode and ".last.pt.tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(rundir, "open", full_disk_for_checkpoints, raising=False)
    run, before = old_run
    cli.user_error([*tiny_args(1), "--overwrite", "--out", run], "disk full while writing ",
                   "last.pt; no partial file was left", f"; {run} is unchanged (the new run was discarded)")
    assert folder_hash(run) == before
    assert siblings_of(run) == []


def test_overwrite_swaps_the_new_run_in_with_its_first_checkpoint(cli, old_run, bad_plugin, tiny_args, siblings_of):
    """A new run failing after its first checkpoint has replaced the old run, and says what is intact."""
    run, _ = old_run
    cli.user_error([*tiny_args(3, *_bad("bad.from_epoch=2")), "--plugin", bad_plugin, "--overwrite", "--out", run],
                   "epoch 2 step 5: non-finite", f"; checkpoints/last.pt of epoch 1 is intact; --resume {run} continues")
    assert siblings_of(run) == []
    assert faults.checkpoint(run)["epoch"] == 1
    assert [r["epoch"] for r in faults.epoch_lines(run)] == [1]
    assert json.loads((run / "run.json").read_text())["methods"] == ["ce", "bad"]
    assert tomllib.loads((run / "config.toml").read_text())["epochs"] == 3
    assert not (run / "report.md").exists()  # the old run's files went with it
    assert not (run / ".lock").exists()


def test_overwrite_without_an_atomic_exchange_renames_twice(cli, old_run, tiny_args, siblings_of, monkeypatch):
    from batchkin import rundir

    monkeypatch.setattr(rundir, "_exchange", lambda a, b: False)
    run, _ = old_run
    cli.ok([*tiny_args(1), "--overwrite", "--out", run])
    assert siblings_of(run) == []
    assert cli.evaluated_epoch(run) == 1
    assert [r["kind"] for r in faults.epoch_lines(run)] == ["epoch", "final"]


@pytest.mark.parametrize("fault,survivor", [
    (("step", 3), "old"),   # mid-epoch 1 of the new run
    (("write", 5), "old"),  # inside the new run's first checkpoints/last.pt
    (("write", 6), "new"),  # the first write after the swap (the final metrics line)
])
def test_overwrite_killed_at_any_point_leaves_the_old_or_the_new_run(
        fault, survivor, cli, old_run, child, tiny_args, folder_hash, siblings_of):
    run, before = old_run
    r = child([*tiny_args(1), *KILLER, "--overwrite", "--out", run], fault=fault)
    assert r.returncode == -9, r.stderr[-2000:]
    if survivor == "old":
        assert folder_hash(run, (".lock",)) == before
        assert siblings_of(run), "the unfinished new run is next to the old one"
    else:
        assert faults.checkpoint(run)["epoch"] == 1
    # a later command finds a run, and cleans what the killed process left
    assert cli.evaluated_epoch(run) == (2 if survivor == "old" else 1)
    assert siblings_of(run) == []


KILL_AFTER_EXCHANGE = """
    from batchkin import rundir

    exchange = rundir._exchange

    def exchange_then_die(a, b):
        assert exchange(a, b)
        os.kill(os.getpid(), signal.SIGKILL)

    rundir._exchange = exchange_then_die
"""

KILL_BETWEEN_TWO_RENAMES = """
    from batchkin import rundir

    rundir._exchange = lambda a, b: False  # a system without an atomic exchange
    rename = os.rename

    def rename_then_die(a, b):
        rename(a, b)
        if ".batchkin-old-" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)

    os.rename = rename_then_die
"""


@pytest.mark.parametrize("setup", [KILL_AFTER_EXCHANGE, KILL_BETWEEN_TWO_RENAMES], ids=["exchange", "two-renames"])
def test_overwrite_killed_inside_the_swap_leaves_the_new_run(setup, cli, old_run, child, tiny_args, siblings_of):
    run, _ = old_run
    r = child([*tiny_args(1), "--overwrite", "--out", run], setup=setup)
    assert r.returncode == -9, r.stderr[-2000:]
    assert siblings_of(run), "the killed process left the old run (and the new one) next to the folder"
    assert run.exists() == (setup is KILL_AFTER_EXCHANGE)
    assert cli.evaluated_epoch(run) == 1  # the swap is completed: the new run
    assert siblings_of(run) == []
    assert [r["kind"] for r in faults.epoch_lines(run)] == ["epoch"]


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_recovery_moves_the_old_run_back_when_no_new_run_was_committed(cli, old_run, folder_hash, siblings_of):
    run, before = old_run
    pid = _dead_pid()
    run.rename(run.parent / f".run.batchkin-old-{pid}")
    unfinished = run.parent / f".run.batchkin-new-{pid}"
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / "run.json").write_text('{"batchkin": "0"}\n')
    assert cli.evaluated_epoch(run) == 2
    assert folder_hash(run) == before
    assert siblings_of(run) == []


def test_a_live_process_replacement_is_left_alone(cli, old_run, tiny_args, folder_hash, siblings_of):
    run, before = old_run
    holder = subprocess.Popen(["sleep", "60"])
    try:
        theirs = run.parent / f".run.batchkin-new-{holder.pid}"
        theirs.mkdir()
        (run / ".lock").write_text(str(holder.pid))
        cli.user_error([*tiny_args(1), "--overwrite", "--out", run], f"is in use by process {holder.pid}")
        assert siblings_of(run) == [theirs.name]
        assert folder_hash(run, (".lock",)) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.dist
def test_overwrite_with_two_ranks(cli, old_run, bad_plugin, tiny_args, folder_hash, siblings_of):
    """Under torchrun rank 0 alone builds and swaps the new run: a failure at the first step
    on both ranks leaves the old run as it was; a run that succeeds replaces it."""
    run, before = old_run
    argv = [sys.executable, "-m", "batchkin", *tiny_args(1), "--nproc", "2", "--overwrite", "--out", str(run),
            "--plugin", str(bad_plugin)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([*argv, "--set", 'methods=["ce","bad"]'], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode != 0 and f"{run} is unchanged (the new run was discarded)" in r.stderr, r.stderr[-3000:]
    assert folder_hash(run) == before
    assert siblings_of(run) == []
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert siblings_of(run) == []
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert cli.evaluated_epoch(run) == 1


# ------------------------------------------------------------------------------ --resume that fails


def test_a_failed_resume_leaves_the_folder_byte_identical(cli, tmp_path, bad_plugin, tiny_args, folder_hash):
    run = tmp_path / "run"
    cli.ok([*tiny_args(2, *_bad("bad.from_epoch=3")), "--plugin", bad_plugin, "--out", run])
    assert faults.epoch_lines(run)[-1]["kind"] == "final"
    before = folder_hash(run)
    cli.user_error(["train", "--quiet", "--resume", run, "--set", "epochs=3"],
                   "epoch 3 step 9: non-finite", f"; {run} is unchanged")
    assert folder_hash(run) == before


def test_a_resume_commits_with_its_first_new_epoch(cli, tmp_path, bad_plugin, tiny_args):
    """Extended from 2 to 4 epochs and failing in epoch 4: epoch 3 is committed (config
    change recorded, the final line of epoch 2 dropped), epoch 3's checkpoint is intact."""
    run = tmp_path / "run"
    cli.ok([*tiny_args(2, *_bad("bad.from_epoch=4")), "--plugin", bad_plugin, "--out", run])
    cli.user_error(["train", "--quiet", "--resume", run, "--set", "epochs=4"],
                   "epoch 4 step 13: non-finite", "; checkpoints/last.pt of epoch 3 is intact")
    assert [(r["kind"], r["epoch"]) for r in faults.epoch_lines(run)] == [("epoch", 1), ("epoch", 2), ("epoch", 3)]
    assert faults.checkpoint(run)["epoch"] == 3
    assert tomllib.loads((run / "config.toml").read_text())["epochs"] == 4
    history = json.loads((run / "run.json").read_text())["overrides"]
    assert [(h["key"], h["old"], h["new"], h["epoch"]) for h in history] == [("epochs", 2, 4, 2)]


# ------------------------------------------------------------------------------ folders that are not runs


def _user_folder(folder, marker: str | None):
    folder.mkdir()
    (folder / "config.toml").write_text("epochs = 99\n")
    (folder / "report.md").write_text("# my own notes\n")
    (folder / "curves.png").write_bytes(b"\x89PNG\r\n\x1a\n my plot")
    if marker is not None:
        (folder / "run.json").write_text(marker)


@pytest.mark.parametrize("marker", [None, '{"tool": "another one"}\n', "not json"], ids=["none", "foreign", "broken"])
@pytest.mark.parametrize("how", ["overwrite", "plain", "resume"])
def test_a_folder_that_is_not_a_batchkin_run_is_never_replaced(how, marker, cli, tmp_path, tiny_args, folder_hash,
                                                              siblings_of):
    folder = tmp_path / "mine"
    _user_folder(folder, marker)
    before = folder_hash(folder)
    if how == "resume":
        cli.user_error(["train", "--quiet", "--resume", folder], f"nothing to resume in {folder}: no checkpoints/last.pt")
    else:
        what = "--overwrite replaces only batchkin run folders" if how == "overwrite" else \
            "already exists and is not a batchkin run folder (no run.json)"
        cli.user_error([*tiny_args(1), *(["--overwrite"] if how == "overwrite" else []), "--out", folder], what)
    assert folder_hash(folder) == before
    assert siblings_of(folder) == []


def test_overwrite_of_an_empty_folder_starts_there(cli, tmp_path, tiny_args):
    folder = tmp_path / "empty"
    folder.mkdir()
    cli.ok([*tiny_args(1), "--overwrite", "--out", folder])
    assert cli.evaluated_epoch(folder) == 1


# ------------------------------------------------------------------------------ killed before the first checkpoint


@pytest.fixture(scope="module")
def killed_early(tmp_path_factory, child, tiny_args):
    """A run killed in epoch 1, before its first checkpoints/last.pt, and the same run uninterrupted."""
    from batchkin.cli import main

    base = tmp_path_factory.mktemp("early")
    run, reference = base / "killed", base / "reference"
    r = child([*tiny_args(2), *KILLER, "--out", run], fault=("step", 3))
    assert r.returncode == -9, r.stderr[-2000:]
    assert (run / "run.json").is_file() and (run / "config.toml").is_file()
    assert not (run / "checkpoints" / "last.pt").exists()
    assert main([*tiny_args(2), *KILLER, "--out", str(reference)]) == 0
    return run, reference


@pytest.mark.parametrize("how", ["the same command", "--resume"])
def test_a_run_killed_before_its_first_checkpoint_starts_again(how, killed_early, cli, tmp_path, tiny_args, siblings_of):
    killed, reference = killed_early
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    if how == "--resume":  # from its saved config, the plugin file found again through run.json
        cli.ok(["train", "--quiet", "--resume", run])
    else:
        cli.ok([*tiny_args(2), *KILLER, "--out", run])
    assert faults.epoch_lines(run) == faults.epoch_lines(reference)
    assert siblings_of(run) == []


def test_a_run_killed_before_it_wrote_its_config_starts_again_with_the_same_command(
        killed_early, cli, tmp_path, tiny_args, folder_hash):
    killed, reference = killed_early
    run = tmp_path / "run"
    shutil.copytree(killed, run)
    (run / "config.toml").unlink()  # killed between run.json and config.toml
    before = folder_hash(run, (".lock",))
    cli.user_error(["train", "--quiet", "--resume", run],
                   f"nothing to resume in {run}: its run stopped before it wrote config.toml; the command that "
                   "started it starts it again")
    assert folder_hash(run, (".lock",)) == before
    cli.ok([*tiny_args(2), *KILLER, "--out", run])
    assert faults.epoch_lines(run) == faults.epoch_lines(reference)


def test_a_fresh_run_failing_before_its_first_checkpoint_says_so(cli, tmp_path, bad_plugin, tiny_args):
    """The message does not claim a checkpoint, and its advice works: the same command (here
    with the plugin file fixed in between) starts the run again in the same folder."""
    run = tmp_path / "run"
    argv = [*tiny_args(1, *_bad()), "--plugin", bad_plugin, "--out", run]
    line = cli.user_error(argv, "non-finite", "; checkpoints/last.pt was not written yet; the same command starts the run again")
    assert "intact" not in line
    assert (run / "run.json").is_file() and not (run / "checkpoints" / "last.pt").exists()
    bad_plugin.write_text(bad_plugin.read_text().replace('default="nan"', 'default="none"').replace(
        'return {"bad": outputs["logits"].sum() * float("nan")}', 'return {"bad": outputs["logits"].sum() * 0.0}'))
    cli.ok(argv)
    assert [r["kind"] for r in faults.epoch_lines(run)] == ["epoch", "final"]


def test_a_run_killed_inside_its_first_write_starts_again_with_the_same_command(cli, child, tmp_path, tiny_args):
    """Killed while writing run.json: the folder holds no marker yet, only what the run made."""
    run = tmp_path / "run"
    argv = [*tiny_args(1), "--out", run]
    r = child(argv, fault=("write", 1))
    assert r.returncode == -9, r.stderr[-2000:]
    assert list(run.glob(".*.tmp-*")), "the half-written file of the killed process"
    cli.ok(argv)
    assert [r["kind"] for r in faults.epoch_lines(run)] == ["epoch", "final"]
    assert not list(run.glob(".*.tmp-*"))
