"""Helpers shared by every test folder: seeded generators and hashes of file trees.

* :func:`gen`: a CPU ``torch.Generator`` from a seed (and salts), the explicit
  randomness every test draws from;
* :func:`read_jsonl` and :func:`read_metrics`: the records of a JSON-lines file, and of a
  run folder's ``metrics.jsonl``;
* :func:`file_hashes` maps each entry of a tree to a digest of its mode and contents
  (assertions then name the entry that changed); :func:`tree_hash` folds that into one
  digest, for the tests that check a command left a folder as it was.

pytest puts this folder on ``sys.path`` (the root ``tests/conftest.py`` lives here), so
any test imports it as ``from _common import gen``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from batchkin.kernels import rng


def gen(seed: int = 0, *salt: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with ``rng.derive_key(seed, *salt)`` given salts."""
    return torch.Generator().manual_seed(rng.derive_key(seed, *salt) if salt else seed)


def read_jsonl(path) -> list[dict]:
    """The records of the JSON-lines file ``path``, in order (a blank or torn line fails to parse)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def read_metrics(run) -> list[dict]:
    """The records of the run folder ``run``'s ``metrics.jsonl``, in order."""
    return read_jsonl(Path(run) / "metrics.jsonl")


def file_hashes(path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every entry under ``path`` (hidden ones too, ``path`` itself as ``"."``): relative path ->
    sha256 of its mode and its bytes (a link's target; a folder's mode alone). Empty when
    ``path`` does not exist; ``ignore`` names entries left out (e.g. ``.lock``, which a
    process killed with SIGKILL cannot remove)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    out = {}
    for p in [path, *sorted(path.rglob("*"))] if path.is_dir() else [path]:
        if p != path and p.name in ignore:
            continue
        h = hashlib.sha256(f"{p.lstat().st_mode:o}\0".encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
        out["." if p == path else str(p.relative_to(path))] = h.hexdigest()
    return out


def tree_hash(path, ignore: tuple[str, ...] = ()) -> str:
    """One sha256 over :func:`file_hashes` of ``path`` (``"absent"`` when the path does not exist)."""
    entries = file_hashes(path, ignore)
    if not entries:
        return "absent"
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()
