"""Inputs and environments that used to end in a traceback: each is one line, exit code 2,
and nothing that existed before the command changes (each test is a class of cases)."""

from __future__ import annotations

import errno
import gzip
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from contract import TINY, assert_user_error, run_cli, tree_hash
from hostile import idx_bytes, idx_folder, plugin, small_idx_set

from batchkin import rundir
from batchkin.errors import RunError
from batchkin.report import write_report

TRAIN = ["train", *TINY]


# ------------------------------------------------------------------------------ IDX edge cases


def _idx_case(root, case):
    x, y = small_idx_set()
    if case == "dimension product overflows":
        # 2**22 * 2**21 * 2**21 = 2**64 wraps to 0 in an int64 product: "0 bytes expected", 0 bytes given
        folder = idx_folder(root, x, y)
        (folder / "train-images-idx3-ubyte").write_bytes(idx_bytes((2**22, 2**21, 2**21), b""))
        return folder, "train-images-idx3-ubyte", "expected 18446744073709551616"
    if case == "zero items":
        return idx_folder(root, x[:0], y[:0]), "train-images-idx3-ubyte", "holds no train images"
    if case == "corrupt gz":
        folder = idx_folder(root, x, y)
        blob = bytearray(gzip.compress((folder / "train-images-idx3-ubyte").read_bytes()))
        blob[len(blob) // 2] ^= 0xFF
        (folder / "train-images-idx3-ubyte").unlink()
        (folder / "train-images-idx3-ubyte.gz").write_bytes(bytes(blob))
        return folder, "train-images-idx3-ubyte.gz", "cannot read"
    if case == "not gzip":
        folder = idx_folder(root, x, y)
        (folder / "train-images-idx3-ubyte").rename(folder / "train-images-idx3-ubyte.gz")
        return folder, "train-images-idx3-ubyte.gz", "Not a gzipped file"
    if case == "zero-height images":
        return idx_folder(root, np.zeros((24, 0, 6), np.uint8), y), "train-images-idx3-ubyte", "of size 0x6 have no pixels"
    if case == "float labels":
        return idx_folder(root, x, y, label_code=0x0D), "train-labels-idx1-ubyte", "labels must be integers"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dimension product overflows", "zero items", "corrupt gz", "not gzip",
                                  "zero-height images", "float labels"])
def test_idx_edge_cases(user_error, tmp_path, case):
    root, name, fragment = _idx_case(tmp_path / "idx", case)
    out = tmp_path / "run"
    user_error([*TRAIN, "--set", "data.name=idx", "--set", f"data.root={root}", "--out", out],
               str(root / name), fragment, unchanged=[root, out])


# ------------------------------------------------------------------------------ configs that fail late


def test_deeply_nested_toml_file(user_error, tmp_path):
    cfg = tmp_path / "deep.toml"
    cfg.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    user_error([*TRAIN, cfg, "--out", tmp_path / "run"], str(cfg), "nested too deeply",
               unchanged=[cfg, tmp_path / "run"])


def test_deeply_nested_tables_and_set_values(user_error, tmp_path):
    cfg = tmp_path / "tables.toml"
    cfg.write_text("[" + ".".join(["t"] * 40) + "]\nx = 1\n")
    user_error([*TRAIN, cfg, "--out", tmp_path / "run"], str(cfg), "more than 32 levels deep", unchanged=[cfg])
    user_error([*TRAIN, "--set", "data.image_size=" + "[" * 50_000 + "]" * 50_000, "--out", tmp_path / "run"],
               "--set value", "nested too deeply", unchanged=[tmp_path / "run"])
    user_error([*TRAIN, "--set", "epochs=1" + "0" * 5000, "--out", tmp_path / "run"],
               "--set value", "integer string conversion", unchanged=[tmp_path / "run"])


@pytest.mark.parametrize("key, value", [("data.split_seed", 2**64), ("seed", -(2**63) - 1), ("epochs", 2**70)])
def test_integers_beyond_64_bits(user_error, tmp_path, key, value):
    user_error([*TRAIN, "--set", f"{key}={value}", "--out", tmp_path / "run"],
               f"{key} must fit in a 64-bit signed integer", unchanged=[tmp_path / "run"])


def test_the_largest_split_seed_trains(tmp_path):
    from batchkin.cli import main

    assert main([*TRAIN, "--set", f"data.split_seed={2**63 - 1}", "--out", str(tmp_path / "run")]) == 0


@pytest.mark.parametrize("args, fragment", [
    (["--seed", str(2**70)], "--seed must fit in a 64-bit signed integer"),
    (["--lr", "nan"], "--lr must be a finite number > 0; got nan"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0; got -1.0"),
])
def test_probe_arguments_that_would_fail_later(user_error, trained_run, args, fragment):
    user_error(["probe", trained_run, *args], fragment, unchanged=[trained_run])


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:", "gpu", "cuda:0:1", "cuda:123456"])
def test_device_strings(user_error, tmp_path, device):
    user_error([*TRAIN, "--set", f"device='{device}'", "--out", tmp_path / "run"],
               "device must be auto, cpu, cuda or cuda:N", unchanged=[tmp_path / "run"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA machines have a cuda:0")
def test_a_cuda_device_on_a_machine_without_cuda(user_error, tmp_path):
    user_error([*TRAIN, "--set", "device='cuda:0'", "--out", tmp_path / "run"], "CUDA is not available",
               unchanged=[tmp_path / "run"])


# ------------------------------------------------------------------------------ checkpoints that load but do not fit


@pytest.fixture
def run_copy(trained_run, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained_run, out)
    return out


def _rewrite_checkpoint(run, change):
    path = run / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=True)
    change(ckpt)
    torch.save(ckpt, path)


def test_a_checkpoint_without_keys(user_error, run_copy):
    _rewrite_checkpoint(run_copy, lambda c: (c.pop("optimizer"), c.pop("rng")))
    user_error(["eval", run_copy], "checkpoint", "last.pt is incomplete: it lacks optimizer, rng",
               unchanged=[run_copy])


@pytest.mark.parametrize("change, message", [
    (lambda c: c["optimizer"].update(param_groups=[]), "the checkpoint's optimizer is not the config's"),
    (lambda c: c.update(sampler={}), "the checkpoint's sampler state does not fit this run"),
    (lambda c: c["rng"].update(cpu=torch.zeros(3)), "the checkpoint's RNG state does not fit this run"),
], ids=["optimizer", "sampler", "rng"])
def test_a_checkpoint_whose_parts_do_not_fit(user_error, run_copy, change, message):
    _rewrite_checkpoint(run_copy, change)
    user_error(["eval", run_copy], message, unchanged=[run_copy])


# ------------------------------------------------------------------------------ run folders the file system refuses


def test_out_under_a_regular_file(user_error, tmp_path):
    (tmp_path / "file").write_text("mine")
    user_error([*TRAIN, "--out", tmp_path / "file" / "run"], str(tmp_path / "file" / "run"), "Not a directory",
               unchanged=[tmp_path])


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder on which the file system refuses to create anything (EROFS), as a read-only
    mount does (root ignores permission bits, so the refusal is simulated at the OS calls)."""
    ro = tmp_path / "ro"
    (ro / "empty").mkdir(parents=True)
    real_mkdir, real_open = os.mkdir, os.open

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def mkdir(path, *a, **k):
        return refuse(path) if str(path).startswith(str(ro)) else real_mkdir(path, *a, **k)

    def open_(path, flags, *a, **k):
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)
    return ro


def test_out_on_a_read_only_file_system(user_error, read_only):
    # a new folder (mkdir fails) and an existing empty one (the lock file cannot be created)
    user_error([*TRAIN, "--out", read_only / "run"], str(read_only / "run"), "Read-only file system",
               unchanged=[read_only])
    user_error([*TRAIN, "--out", read_only / "empty"], str(read_only / "empty" / ".lock"), "Read-only file system",
               unchanged=[read_only])


class _FullDisk(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _disk_full_for(monkeypatch, fragment):
    real_open = open

    def open_(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        if "w" in mode and fragment in str(path):
            fh.close()
            return io.BufferedWriter(_FullDisk())
        return fh

    monkeypatch.setattr(rundir, "open", open_, raising=False)


def test_disk_full_while_a_plot_is_written_keeps_the_previous_plot(run_copy, monkeypatch):
    before = tree_hash(run_copy)
    _disk_full_for(monkeypatch, "per_class.png")
    with pytest.raises(RunError, match=r"disk full while writing .*per_class\.png; the previous version is intact"):
        write_report(run_copy)
    assert tree_hash(run_copy) == before  # curves.png was rewritten with the same bytes; no temp file is left


def test_disk_full_while_the_report_of_a_new_run_is_written(user_error, tmp_path, monkeypatch):
    _disk_full_for(monkeypatch, "curves.png")
    out = tmp_path / "run"
    user_error([*TRAIN, "--out", out], "disk full while writing", "curves.png")
    names = sorted(p.name for p in out.iterdir())
    assert "curves.png" not in names and not [n for n in names if ".tmp" in n], names
    assert all(p.stat().st_size > 0 for p in out.rglob("*") if p.is_file() and p.name != ".lock")


# ------------------------------------------------------------------------------ --nproc


@pytest.mark.parametrize("n", ["-1", "0"])
def test_nproc_below_one(user_error, tmp_path, n):
    user_error([*TRAIN, "--nproc", n, "--out", tmp_path / "run"], f"--nproc must be >= 1 (the number of processes); got {n}",
               unchanged=[tmp_path / "run"])


@pytest.mark.dist
def test_nproc_ranks_report_their_own_line_and_no_torchrun_traceback(tmp_path):
    out = tmp_path / "run"
    r = run_cli(*TRAIN, "--nproc", "2", "--set", "data.batch_size=0", "--out", out)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "ChildFailedError" not in r.stderr, r.stderr[-3000:]
    lines = sorted(r.stderr.strip().splitlines())
    assert lines == [f"batchkin: error: rank {k}: data.batch_size must be >= 1; got 0" for k in (0, 1)], r.stderr
    assert not out.exists()


@pytest.mark.dist
def test_nproc_a_rank_killed_without_a_line_is_reported_once(tmp_path):
    killer = plugin(tmp_path, "rank_killer", """
        import os, signal

        class Killer(Method):
            @hookimpl
            def configure(self, state):
                if state.rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)

        @hookimpl
        def register_methods(register):
            register("killer", Killer)
    """)
    r = run_cli(*TRAIN, "--nproc", "2", "--plugin", killer, "--set", 'methods=["ce","killer"]', "--out", tmp_path / "run")
    assert_user_error(r.returncode, r.stderr, "rank 1 of 2 was killed by signal SIGKILL")


# ------------------------------------------------------------------------------ eval's output


def test_eval_into_a_closed_pipe_ends_quietly(trained_run):
    before = tree_hash(trained_run)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "batchkin", "eval", str(trained_run)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before anything is written, as `| head` after its lines
    err = p.stderr.read().decode()
    assert p.wait(timeout=300) == 141 and err == "", err
    assert tree_hash(trained_run) == before


def test_eval_of_an_empty_validation_split(user_error, tmp_path):
    from batchkin.cli import main

    out = tmp_path / "run"
    assert main([*TRAIN, "--set", "data.val_fraction=0", "--out", str(out)]) == 0
    user_error(["eval", out, "--split", "val"], "the val split", "is empty (data.val_fraction = 0.0)",
               unchanged=[out])


def test_eval_prints_strict_json_with_null_for_undefined_metrics(trained_run, capsys):
    from batchkin.cli import main

    capsys.readouterr()
    assert main(["eval", str(trained_run)]) == 0
    out = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"bare {constant} in the JSON output")

    result = json.loads(out, parse_constant=refuse)
    # absolute groups, and the tiny run's classes all have fewer than 20 training images: 'many' is empty
    assert result["many_acc"] is None and result["few_acc"] is not None


# ------------------------------------------------------------------------------ plugins' models and datasets


def test_moco_with_a_model_without_feature_dim(user_error, tmp_path):
    path = plugin(tmp_path, "no_feature_dim", """
        import torch

        class Net(torch.nn.Module):
            def __init__(self, c):
                super().__init__()
                self.conv = torch.nn.Conv2d(c, 4, 3)
                self.classifier = torch.nn.Linear(4, 3)

            def forward_features(self, x):
                return {"features": self.conv(x).mean((2, 3))}

        @hookimpl
        def register_models(register):
            register("nofeat", lambda options, num_classes, in_channels, image_size: Net(in_channels))
    """)
    user_error([*TRAIN, "--plugin", path, "--set", 'methods=["moco"]', "--set", "model.name=nofeat",
                "--set", "data.augment=false", "--out", tmp_path / "run"],
               "moco needs a model following the classifier protocol", "model.name = 'nofeat' lacks feature_dim",
               unchanged=[path, tmp_path / "run"])


@pytest.mark.parametrize("body, fragments", [
    ("open('/nonexistent/batchkin/labels.bin', 'rb')",
     ["dataset 'mine' (file", "cannot read /nonexistent/batchkin/labels.bin: No such file or directory"]),
    ("return {}['x']", ["dataset 'mine' (file", "failed to load: KeyError: 'x'"]),
    ("return [1, 2]", ["dataset 'mine' (file", "returned list, not a batchkin.data.ImageDataset"]),
])
def test_a_plugin_dataset_that_fails(user_error, tmp_path, body, fragments):
    path = plugin(tmp_path, f"dataset_{abs(hash(body))}", f"""
        def load(cfg):
            {body}

        @hookimpl
        def register_datasets(register):
            register("mine", load)
    """)
    user_error([*TRAIN, "--plugin", path, "--set", "data.name=mine", "--out", tmp_path / "run"], *fragments,
               unchanged=[path, tmp_path / "run"])
