"""Fixtures of the reliability tests (the helpers they use live in contract.py and hostile.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from contract import TINY, assert_user_error, tree_hash

from batchkin.cli import main


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
