"""The command line: user errors are one line and exit code 2; run folders are never clobbered."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from batchkin.cli import main


def set_args(raw: dict, prefix: str = "") -> list[str]:
    """``--set`` arguments equivalent to a raw config dict."""
    out = []
    for key, value in raw.items():
        if isinstance(value, dict):
            out += set_args(value, f"{prefix}{key}.")
        else:
            out += ["--set", f"{prefix}{key}={json.dumps(value)}"]
    return out


def tiny_args(tiny, **over) -> list[str]:
    return set_args(tiny(**over))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def expect_error(capsys, argv: list[str], *fragments: str) -> str:
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("batchkin: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def _idx(shape, payload: bytes, code: int = 0x08) -> bytes:
    return struct.pack(f">BBBB{len(shape)}I", 0, 0, code, len(shape), *shape) + payload


def _png(path: Path, size: tuple[int, int], value: int = 128) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)


class _RunsShell:
    """Pickled, this calls os.system when loaded by an unrestricted unpickler."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


# ------------------------------------------------------------------------------ bad inputs


def test_unknown_key(capsys, tmp_path, tiny):
    expect_error(capsys, ["train", "--quiet", *tiny_args(tiny), "--set", "data.batchsize=3", "--out", str(tmp_path / "r")],
                 "unknown config key data.batchsize (did you mean 'batch_size'?)")


def test_impossible_value(capsys, tmp_path, tiny):
    expect_error(capsys, ["train", "--quiet", *tiny_args(tiny), "--set", "data.batch_size=0", "--out", str(tmp_path / "r")],
                 "data.batch_size must be >= 1; got 0")


def test_wrong_type(capsys, tmp_path):
    expect_error(capsys, ["train", "--quiet", "--set", "epochs=x", "--out", str(tmp_path / "r")],
                 "epochs must be an integer, got str 'x'")


def test_bad_config_file(capsys, tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("epochs = = 3\n")
    expect_error(capsys, ["train", "--quiet", str(cfg), "--out", str(tmp_path / "r")], f"config file {cfg} is not valid TOML")
    expect_error(capsys, ["train", "--quiet", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "r")],
                 "config file not found")


def test_missing_data_folder(capsys, tmp_path):
    expect_error(capsys, ["train", "--quiet", "--set", "data.name=idx", "--set", "data.root=/nonexistent",
                          "--out", str(tmp_path / "r")], "data folder not found: /nonexistent")


def _idx_folder(root: Path) -> None:
    root.mkdir()
    (root / "train-labels-idx1-ubyte").write_bytes(_idx((4,), bytes([0, 1, 0, 1])))
    (root / "t10k-images-idx3-ubyte").write_bytes(_idx((2, 4, 4), bytes(32)))
    (root / "t10k-labels-idx1-ubyte").write_bytes(_idx((2,), bytes([0, 1])))


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("train-images-idx3-ubyte.gz", gzip.compress(_idx((4, 4, 4), bytes(64)))[:-6], "cannot read"),
        ("train-images-idx3-ubyte", _idx((4, 4, 4), bytes(40)), "is truncated or corrupt: 40 data bytes, expected 64"),
        ("train-images-idx3-ubyte", b"\x08\x03" + _idx((4, 4, 4), bytes(64))[2:], "is not an IDX file (bad magic number)"),
    ],
    ids=["truncated-gz", "truncated-raw", "wrong-magic"],
)
def test_corrupt_idx(capsys, tmp_path, name, content, fragment):
    root = tmp_path / "idx"
    _idx_folder(root)
    (root / name).write_bytes(content)
    expect_error(capsys, ["train", "--quiet", "--set", "data.name=idx", "--set", f"data.root={root}",
                          "--out", str(tmp_path / "r")], str(root / name), fragment)


def test_idx_happy_path_loads(tmp_path):
    from batchkin.config import DataConfig
    from batchkin.data import load_idx

    root = tmp_path / "idx"
    _idx_folder(root)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx((4, 4, 4), bytes(range(64)))))
    ds = load_idx(DataConfig(name="idx", root=str(root)))
    assert ds.x.shape == (4, 1, 4, 4) and ds.test_x.shape == (2, 1, 4, 4)
    assert ds.y.tolist() == [0, 1, 0, 1] and ds.classes == ["0", "1"]
    assert ds.x.flatten().tolist() == list(range(64))


def test_corrupt_cifar_file(capsys, tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    (root / "data_batch_1").write_bytes(b"\x80\x04garbage" * 7)
    expect_error(capsys, ["train", "--quiet", "--set", "data.name=cifar10", "--set", f"data.root={root}",
                          "--out", str(tmp_path / "r")],
                 f"{root / 'data_batch_1'} is not a readable CIFAR python-format file")


def test_cifar_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    marker = tmp_path / "PWNED"
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": _RunsShell(f"touch {marker}"), b"labels": [0]}))
    proc = subprocess.run(
        [sys.executable, "-m", "batchkin", "train", "--quiet", "--set", "data.name=cifar10",
         "--set", f"data.root={root}", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchkin: error: "), proc.stderr
    assert "refusing to load" in lines[0] and "system" in lines[0] and "data_batch_1" in lines[0]
    assert not marker.exists()


def test_image_folder_with_mixed_sizes(capsys, tmp_path):
    root = tmp_path / "images"
    _png(root / "cat" / "a.png", (8, 8))
    _png(root / "cat" / "b.png", (8, 8))
    _png(root / "dog" / "c.png", (10, 8))
    msg = expect_error(capsys, ["train", "--quiet", "--set", "data.name=imagefolder", "--set", f"data.root={root}",
                                "--out", str(tmp_path / "r")], "images of mixed sizes", "data.image_size")
    assert "c.png" in msg


def test_image_folder_loads_and_resizes(tmp_path):
    from batchkin.config import DataConfig
    from batchkin.data import load_image_folder

    root = tmp_path / "images"
    _png(root / "cat" / "a.png", (8, 6), 10)
    _png(root / "dog" / "b.png", (8, 6), 20)
    _png(root / "dog" / "c.png", (8, 6), 30)
    ds = load_image_folder(DataConfig(name="imagefolder", root=str(root)))
    assert ds.classes == ["cat", "dog"] and ds.y.tolist() == [0, 1, 1]
    assert ds.x.shape == (3, 1, 6, 8)  # PIL sizes are (W, H)
    assert ds.x[:, 0, 0, 0].tolist() == [10, 20, 30]
    _png(root / "dog" / "d.png", (5, 5), 40)
    resized = load_image_folder(DataConfig(name="imagefolder", root=str(root), image_size=[4, 4]))
    assert resized.x.shape == (4, 1, 4, 4)


def test_broken_plugin_file(capsys, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import batchkin_no_such_module_xyz\n")
    expect_error(capsys, ["train", "--quiet", "--plugin", str(broken), "--out", str(tmp_path / "r")],
                 f"plugin file {broken} failed to import: ModuleNotFoundError")
    expect_error(capsys, ["plugins", "--plugin", str(tmp_path / "nope.py")], "plugin file not found")


def test_failed_config_check_leaves_no_run_folder(capsys, tmp_path, tiny):
    """A run refused before it starts leaves nothing that blocks re-running the same command."""
    out = tmp_path / "r"
    expect_error(capsys, ["train", "--quiet", *tiny_args(tiny), "--set", "data.batch_size=0", "--out", str(out)])
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


def test_overwrite_with_a_bad_config_keeps_the_old_run(capsys, tmp_path, tiny):
    """--overwrite replaces a run folder with a new run; a run refused before it starts must not
    have deleted the old one."""
    run = tmp_path / "run"
    before = _fake_run(run)
    expect_error(capsys, ["train", "--quiet", *tiny_args(tiny), "--set", "data.batch_size=0", "--overwrite",
                          "--out", str(run)], "data.batch_size must be >= 1; got 0")
    assert snapshot(run) == before


# ------------------------------------------------------------------------------ run folders


def _fake_run(folder: Path) -> dict[str, bytes]:
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.toml").write_text("epochs = 3\n")
    (folder / "metrics.jsonl").write_text('{"kind": "epoch", "epoch": 1}\n')
    (folder / "run.json").write_text('{"batchkin": "0.1.0"}\n')
    (folder / "checkpoints" / "last.pt").write_bytes(b"\x00weights\x01" * 50)
    (folder / "checkpoints" / "best.pt").write_bytes(b"\x00best\x01" * 50)
    return snapshot(folder)


def test_existing_run_folder_needs_overwrite(capsys, tmp_path, tiny):
    run = tmp_path / "run"
    before = _fake_run(run)
    expect_error(capsys, ["train", "--quiet", *tiny_args(tiny), "--out", str(run)],
                 f"run folder {run} already exists", "--overwrite")
    assert snapshot(run) == before


@pytest.mark.parametrize("how", ["overwrite", "resume"])
def test_locked_run_folder_is_refused(capsys, tmp_path, tiny, how):
    run = tmp_path / "run"
    _fake_run(run)
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run / ".lock").write_text(str(holder.pid))
        before = snapshot(run)
        args = ["--overwrite", "--out", str(run)] if how == "overwrite" else ["--resume", str(run)]
        expect_error(capsys, ["train", "--quiet", *tiny_args(tiny), *args] if how == "overwrite"
                     else ["train", "--quiet", *args], f"is in use by process {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(capsys, tmp_path, tiny, metrics_lines):
    run = tmp_path / "run"
    _fake_run(run)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / ".lock").write_text(str(dead.pid))
    rc = main(["train", "--quiet", *tiny_args(tiny, epochs=1), "--overwrite", "--out", str(run)])
    _, err = capsys.readouterr()
    assert rc == 0, err
    assert not (run / ".lock").exists()
    lines = metrics_lines(run)
    assert [r["kind"] for r in lines] == ["epoch", "final"]
    assert (run / "checkpoints" / "last.pt").read_bytes() != b"\x00weights\x01" * 50


def test_resume_without_a_checkpoint(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    expect_error(capsys, ["train", "--quiet", "--resume", str(run)], "is not a batchkin run folder (no config.toml)")
    expect_error(capsys, ["train", "--quiet", "--resume", str(run), "cfg.toml"], "--resume takes the run folder's own config")


def test_training_one_channel_images_with_one_thread(tmp_path, tiny):
    """Digits, Fashion-MNIST and MNIST are 1-channel; torchrun runs each process with
    OMP_NUM_THREADS=1. Augmented 1-channel batches must train there (the crop's output
    must not carry channels-last strides into the model)."""
    # the crash is heap corruption: a few dozen steps make it show up reliably
    args = tiny_args(tiny, epochs=3, data={"synthetic_shape": [1, 6, 6], "synthetic_per_class": 32, "augment": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "batchkin", "train", "--quiet", *args, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ------------------------------------------------------------------------------ batchkin plugins


def test_plugins_lists_ce_with_origin_and_hooks(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "methods:"
    ce = [line.split() for line in lines if line.split()[:1] == ["ce"]]
    assert ce == [["ce", "builtin", "hooks:", "loss_terms"]]
    for name in ("resnet8", "resnet32", "vit", "digits", "synthetic", "idx", "cifar10", "imagefolder"):
        assert any(line.split()[:2] == [name, "builtin"] for line in lines), name

    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["methods"]["ce"] == {"origin": "builtin", "hooks": ["loss_terms"]}
    assert data["plugins"]["ce"] == "builtin"
    assert data["models"]["vit"] == "builtin" and data["datasets"]["digits"] == "builtin"

    assert main(["plugins", "--hook", "loss_terms"]) == 0
    implementers = capsys.readouterr().out.split()
    assert "ce" in implementers
    assert all("loss_terms" in data["methods"][m]["hooks"] for m in implementers)
    assert sorted(implementers) == sorted(m for m, e in data["methods"].items() if "loss_terms" in e["hooks"])
    assert main(["plugins", "--hook", "on_fit_end"]) == 0  # no built-in method implements it
    assert capsys.readouterr().out.strip() == "(no plugin implements on_fit_end)"


def test_plugins_unknown_hook(capsys):
    expect_error(capsys, ["plugins", "--hook", "los_terms"], "unknown hook 'los_terms' (did you mean 'loss_terms'?)")
