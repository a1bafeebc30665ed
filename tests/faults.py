"""Fault injection for the reliability tests and the soak benchmark (bench/soak.py).

A test tool, not part of the installed package: the tests import it as ``faults`` (tests/
is on ``sys.path`` under pytest), bench/soak.py puts tests/ on ``sys.path`` first.
``python tests/faults.py KIND AT CLI-ARGS...`` runs batchkin's command line in this
process with one fault armed (absolute imports: the file is also loaded as a plugin file):

* ``step N``: SIGKILL right after optimizer step N (the run must enable the ``killer``
  method this module registers: ``--plugin <this file> --set 'methods=[..., "killer"]'``;
  it reads N from ``BATCHKIN_KILL_AT_STEP``, which this entry point sets);
* ``write N``: during the N-th atomic file write of the run folder (checkpoints,
  metrics.jsonl, config.toml, ...), half of the bytes reach the temporary file, then SIGKILL;
* ``none 0``: no fault (the killer stays inert).

:func:`run` starts such a child and returns its ``CompletedProcess``; a killed child has
``returncode == -9``. This module is only ever loaded as a plugin when named explicitly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence

from batchkin.hookspecs import hookimpl
from batchkin.plugin import Method

ENV_STEP = "BATCHKIN_KILL_AT_STEP"
KINDS = ("none", "step", "write")
PLUGIN_FILE = os.path.abspath(__file__)
#: CLI arguments that enable the killer next to ``ce``
KILLER_ARGS = ["--plugin", PLUGIN_FILE, "--set", 'methods=["ce","killer"]']


def tiny_run_args(epochs: int) -> list[str]:
    """CLI ``--set`` arguments of a tiny deterministic CPU run (synthetic data, 6 steps per epoch)."""
    sets = ["data.name=synthetic", "model.name=tiny", f"epochs={epochs}", "device=cpu", "data.synthetic_per_class=24",
            "data.batch_size=16", "schedule.warmup_epochs=1", "train.log_every=1000"]
    return [a for s in sets for a in ("--set", s)]


def checkpoint(run) -> dict | None:
    """The run folder's ``last.pt`` (loaded with ``weights_only``), or None when there is none yet."""
    from pathlib import Path

    from batchkin.rundir import load_checkpoint

    path = Path(run) / "checkpoints" / "last.pt"
    return load_checkpoint(path) if path.is_file() else None


def epoch_lines(run) -> list[dict]:
    """The run's metrics.jsonl lines without their wall-clock fields (``[]`` when there is no file yet)."""
    import json
    from pathlib import Path

    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    for r in lines:
        r.pop("images_per_s", None)
    return lines


class Killer(Method):
    """Kills its own process with SIGKILL after the optimizer step ``$BATCHKIN_KILL_AT_STEP``."""

    @hookimpl
    def after_step(self, state):
        if state.step == int(os.environ.get(ENV_STEP, "-1")):
            os.kill(os.getpid(), signal.SIGKILL)


@hookimpl
def register_methods(register):
    register("killer", Killer)


def arm_write_fault(at: int) -> None:
    """Make the ``at``-th atomic write leave half its bytes in the temporary file and SIGKILL."""
    from batchkin import rundir

    original, count = rundir.atomic_write_bytes, [0]

    def dying_write(path, data):
        count[0] += 1
        if count[0] == at:
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            with open(tmp, "wb") as fh:
                fh.write(data[: len(data) // 2])
                fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return original(path, data)

    rundir.atomic_write_bytes = dying_write


def command(kind: str, at: int, cli: Sequence[str], env: dict | None = None) -> tuple[list[str], dict]:
    """The argv and environment of a child running ``batchkin CLI...`` with the fault ``kind`` at ``at``."""
    if kind not in KINDS:
        raise ValueError(f"fault kind must be one of {KINDS}; got {kind!r}")
    return ([sys.executable, PLUGIN_FILE, kind, str(int(at)), *cli],
            {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run(kind: str, at: int, cli: Sequence[str], *, env: dict | None = None, timeout: float = 300,
        ) -> subprocess.CompletedProcess:
    """Run ``batchkin CLI...`` in a child process with the fault ``kind`` at ``at``."""
    argv, child_env = command(kind, at, cli, env)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env)


def main(argv: Sequence[str]) -> int:
    kind, at, cli = argv[0], int(argv[1]), list(argv[2:])
    os.environ[ENV_STEP] = str(at) if kind == "step" else "-1"
    if kind == "write":
        arm_write_fault(at)
    from batchkin.cli import main as cli_main

    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
