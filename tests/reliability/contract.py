"""The user-error contract of the reliability tests, tree hashes, and a tiny run's CLI arguments.

The contract every bad input is held to: exit code 2, exactly one stderr line
starting ``batchkin: error: ``, no traceback anywhere, and every file tree that
existed before the command (a data folder, a run folder, a plugin file) hashes the
same afterwards; a path that did not exist (a new ``--out``) still does not.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

#: a tiny CPU run on the command line: synthetic 3x6x6 images, the BatchNorm-free tiny model
TINY = ["--quiet", "--set", "device=cpu", "--set", "epochs=1", "--set", "data.name=synthetic",
        "--set", "model.name=tiny", "--set", "data.synthetic_shape=[3,6,6]", "--set", "data.synthetic_per_class=16",
        "--set", "data.batch_size=8", "--set", "train.log_every=1000"]


def tree_hash(path) -> str:
    """sha256 over a file tree: each entry's relative path, mode and bytes (``"absent"`` when
    the path does not exist)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return "absent"
    h = hashlib.sha256()
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        st = p.lstat()
        h.update(f"{p.relative_to(path) if p != path else '.'}\0{st.st_mode:o}\0".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
        h.update(b"\1")
    return h.hexdigest()


def assert_user_error(rc: int, err: str, *fragments: str, out: str = "") -> str:
    """The one-line contract; returns the line."""
    assert rc == 2, (rc, err[-3000:])
    assert "Traceback" not in err and "Traceback" not in out, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchkin: error: "), err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run_cli(*args, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    """``python -m batchkin ARGS`` in a child process (one OpenMP thread)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "batchkin", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, **kwargs)
