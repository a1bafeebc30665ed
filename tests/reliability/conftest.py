"""Fixtures and helpers of the reliability tests: hash a folder, run the CLI in this process or
in a child process (with a fault armed), check a user error, list the siblings a replacement
leaves next to a run folder. The one-line user-error contract and the hostile-input builders
live in contract.py and hostile.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from contract import TINY, assert_user_error, tree_hash

from batchkin import faults
from batchkin.cli import main


def file_hashes(folder: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every file (hidden ones too) and folder under ``folder``: relative path -> sha256 of the
    bytes ("dir" for a folder). ``ignore`` names files left out (e.g. ``.lock``, which a
    process killed with SIGKILL cannot remove)."""
    out = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.name in ignore:
            continue
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def siblings(run: Path) -> list[str]:
    """The hidden folders a replacement of ``run`` builds or sets aside next to it."""
    return sorted(p.name for p in run.parent.iterdir() if p.name.startswith(f".{run.name}.batchkin-"))


def tiny(epochs: int, *sets: str) -> list[str]:
    """``train --quiet`` arguments of the tiny run, with more ``--set KEY=VALUE`` pairs."""
    return ["train", "--quiet", *faults.tiny_run_args(epochs), *[a for s in sets for a in ("--set", s)]]


class Cli:
    """``batchkin ARGV`` in this process: ``(exit code, stdout, stderr)``."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, argv: list[str]) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, argv: list[str]) -> str:
        rc, out, err = self(argv)
        assert rc == 0, err
        return out

    def user_error(self, argv: list[str], *fragments: str) -> str:
        """Exit code 2, one stderr line ``batchkin: error: ...`` holding every fragment."""
        rc, out, err = self(argv)
        return assert_user_error(rc, err, *fragments, out=out)

    def evaluated_epoch(self, run: Path) -> int:
        """The epoch of the checkpoint ``batchkin eval RUN`` finds (the run is usable)."""
        return json.loads(self.ok(["eval", run]))["epoch"]


@pytest.fixture
def cli(capsys):
    return Cli(capsys)


def run_child(argv: list[str], setup: str = "", fault: tuple[str, int] = ("none", 0)) -> subprocess.CompletedProcess:
    """``batchkin ARGV`` in a child process, after the Python code ``setup`` (which may arm a
    fault, e.g. replace a function of ``batchkin.rundir``) or with a fault of
    :mod:`batchkin.faults` (``("step", 3)``: SIGKILL after optimizer step 3, the run
    enabling the ``killer`` method; ``("write", 5)``: SIGKILL inside the 5th atomic write)."""
    argv = [str(a) for a in argv]
    if not setup:
        return faults.run(*fault, argv)
    code = "import os, signal, sys\n" + textwrap.dedent(setup) + \
        "\nfrom batchkin.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished 2-epoch tiny run (checkpoints, metrics with the final line, report)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    rc = main([*tiny(2), "--out", str(run)])
    assert rc == 0
    return run


@pytest.fixture
def old_run(finished_run, tmp_path):
    """A private copy of the finished run, and its hash."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run, file_hashes(run)


def write_plugin(folder: Path, stem: str, source: str) -> Path:
    path = Path(folder) / f"{stem}.py"
    path.write_text(textwrap.dedent(source))
    return path


#: A method whose loss term misbehaves from epoch ``bad.from_epoch`` on: NaN, an exception,
#: or an allocation failure (``bad.how``).
BAD_PLUGIN = """
    from dataclasses import dataclass, field

    import torch

    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class Bad(Method):
        @dataclass
        class Options:
            from_epoch: int = field(default=1, metadata={"ge": 1, "help": "first epoch that misbehaves"})
            how: str = field(default="nan", metadata={"help": "nan, raise or oom"})

        @hookimpl
        def loss_terms(self, state, outputs):
            if state.epoch < self.options.from_epoch:
                return {"bad": outputs["logits"].sum() * 0.0}
            if self.options.how == "raise":
                raise RuntimeError("bad plugin: boom")
            if self.options.how == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
            return {"bad": outputs["logits"].sum() * float("nan")}


    @hookimpl
    def register_methods(register):
        register("bad", Bad)
"""


@pytest.fixture
def bad_plugin(tmp_path):
    folder = tmp_path / "plugins"
    folder.mkdir()
    return write_plugin(folder, "bad", BAD_PLUGIN)


# the helpers above, as fixtures (test modules do not import conftest)

@pytest.fixture(scope="session")
def folder_hash():
    return file_hashes


@pytest.fixture(scope="session")
def siblings_of():
    return siblings


@pytest.fixture(scope="session")
def tiny_args():
    return tiny


@pytest.fixture(scope="session")
def child():
    return run_child


@pytest.fixture
def user_error(capsys):
    """``user_error(argv, *fragments, unchanged=[paths])``: run the CLI in this process and
    check the contract, and that every path in ``unchanged`` hashes the same after."""

    def run(argv, *fragments, unchanged=()):
        before = {str(p): tree_hash(p) for p in unchanged}
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        line = assert_user_error(rc, err, *fragments, out=out)
        assert {str(p): tree_hash(p) for p in unchanged} == before, "a path that existed before the command changed"
        return line

    return run


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """A finished tiny run (1 epoch, report and plots written; absolute many/medium/few groups,
    of which only 'few' has classes). Tests must not change it: copy it first to alter it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(["train", *TINY, "--set", "metrics.shot_split=absolute", "--out", str(out)]) == 0
    assert (out / "checkpoints" / "last.pt").is_file() and (out / "curves.png").is_file()
    return out
