"""``train.threads``: the intra-op CPU threads torch uses during a run.

torch's default is one thread per physical core. On a machine whose cores are shared —
with other runs, the data workers, a notebook — those threads wait on each other: on two
shared cores the quick-start took 67 s with two threads and 142 s with torch's default
against 12-15 s with one (docs/training.md has the measurement). ``"auto"`` therefore
leaves one core free:

* ``OMP_NUM_THREADS`` set in the environment (torchrun sets it to 1 for several
  processes per machine): that number, the user's choice;
* otherwise the physical cores this process may run on, less one, at least 1.

It depends only on the machine, not on its load at the moment, so a resumed run uses the
same count as the run it continues (the count can change floating-point sums).
:func:`batchkin.trainer.fit` sets it for the run and gives the caller's setting back
when it returns (``torch.set_num_threads`` is process-wide); ``batchkin eval`` and
:func:`batchkin.probe.linear_probe` (``batchkin probe``) use the run's own setting the
same way (:func:`using_threads`).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (logical CPUs where the
    topology cannot be read)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(tuple(topo.joinpath(f).read_text().strip() for f in ("physical_package_id", "core_id")))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


def auto_threads(environ=None) -> tuple[int, str]:
    """The thread count of ``train.threads = "auto"`` and why (a few words for the start line)."""
    environ = os.environ if environ is None else environ
    given = environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) >= 1:
        return int(given), "OMP_NUM_THREADS"
    cores = physical_cores()
    return max(cores - 1, 1), f"{cores} core{'s' if cores != 1 else ''}, one left free"


def run_threads(setting) -> tuple[int, str]:
    """``(threads, why)`` of a ``train.threads`` value (``"auto"`` or a count)."""
    if setting == "auto":
        n, why = auto_threads()
        return n, f"train.threads = auto: {why}"
    return int(setting), "train.threads"


@contextlib.contextmanager
def using_threads(setting):
    """Run a block with torch's intra-op threads set to a ``train.threads`` value (resolved by
    :func:`run_threads`); yields ``(threads, why)`` and gives the caller's count back after."""
    import torch

    threads, why = run_threads(setting)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads, why
    finally:
        torch.set_num_threads(before)
