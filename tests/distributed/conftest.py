"""Helpers of the multi-process tests: launch ``batchkin train`` under torchrun (gloo, CPU)
or as one process with the same tiny run, and read a run folder's metrics.

They are fixtures (session-scoped, so module-scoped fixtures can use them too) that
return plain callables::

    def test_x(torchrun, single, metrics, config, tmp_path):
        r = torchrun(2, tmp_path / "two", "--set", "data.batch_size=8")
        assert r.returncode == 0, r.stderr[-3000:]
        print(metrics(tmp_path / "two")[-1])
        raw = config("--set", "data.batch_size=16")  # the same run as a raw config dict

Every process runs with one OpenMP thread: two ranks on a shared two-core machine
only slow each other down with more.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from _common import read_metrics

#: The tiny run every launch starts from: synthetic 1x8x8 images, the BatchNorm-free
#: ``tiny`` model, 2 epochs on the CPU; later ``--set`` arguments override these.
COMMON = [
    "--set", "data.name=synthetic", "--set", "model.name=tiny", "--set", "epochs=2", "--set", "device=cpu",
    "--set", "data.synthetic_per_class=40", "--set", "optim.lr=0.05", "--set", "train.log_every=1000",
]


def _env(extra: dict | None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}


def run_torchrun(nproc: int, out, *extra: str, timeout: float = 300,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N -m batchkin train --quiet --out OUT`` + COMMON + extra."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "batchkin", "train", "--quiet", "--out", str(out), *COMMON, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env))


def run_single(out, *extra: str, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same run in one process: ``python -m batchkin train --quiet --out OUT`` + COMMON + extra."""
    cmd = [sys.executable, "-m", "batchkin", "train", "--quiet", "--out", str(out), *COMMON, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(env))


def train_config(*args: str) -> dict:
    """The raw config ``batchkin train`` builds from COMMON + ``args`` (their ``--set`` pairs),
    for building the same run in the test's own process."""
    from batchkin.config import apply_overrides

    all_args = [*COMMON, *args]
    return apply_overrides({}, [all_args[i + 1] for i, a in enumerate(all_args) if a == "--set"])


@pytest.fixture(scope="session")
def torchrun():
    return run_torchrun


@pytest.fixture(scope="session")
def single():
    return run_single


@pytest.fixture(scope="session")
def metrics():
    return read_metrics


@pytest.fixture(scope="session")
def config():
    return train_config
