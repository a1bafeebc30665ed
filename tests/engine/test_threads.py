"""``train.threads``: "auto" from the machine (or OMP_NUM_THREADS), printed at the start,
set for the run and given back to the caller when ``fit`` returns or fails."""

from __future__ import annotations

import io
import json

import pytest
import torch

from batchkin import threads
from batchkin.errors import ConfigError
from batchkin.plugin import Plugins
from batchkin.testing import tiny_config
from batchkin.trainer import fit


@pytest.mark.parametrize(("cores", "env", "want"), [
    (2, {}, (1, "2 cores, one left free")),
    (8, {}, (7, "8 cores, one left free")),
    (1, {}, (1, "1 core, one left free")),
    (8, {"OMP_NUM_THREADS": "3"}, (3, "OMP_NUM_THREADS")),
    (8, {"OMP_NUM_THREADS": "0"}, (7, "8 cores, one left free")),  # not a thread count: ignored
    (8, {"OMP_NUM_THREADS": "many"}, (7, "8 cores, one left free")),
])
def test_auto_leaves_one_core_free_unless_the_environment_says(monkeypatch, cores, env, want):
    monkeypatch.setattr(threads, "physical_cores", lambda: cores)
    assert threads.auto_threads(env) == want


def test_physical_cores_are_counted_among_the_usable_cpus():
    import os

    n = threads.physical_cores()
    assert 1 <= n <= len(os.sched_getaffinity(0))


RECORD = """
    import torch

    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    SEEN = []


    class Threads(Method):
        @hookimpl
        def after_step(self, state):
            SEEN.append(torch.get_num_threads())


    @hookimpl
    def register_methods(register):
        register("threads_seen", Threads)
"""


def test_the_run_uses_its_threads_prints_them_and_gives_the_callers_back(tmp_path, plugin_file, monkeypatch):
    import sys

    plugins = Plugins(extra_files=[plugin_file("threads_plugin", RECORD)])
    seen = sys.modules[plugins.registry.methods["threads_seen"].obj.__module__].SEEN
    before = torch.get_num_threads()
    assert before == 1  # the engine tests run with one thread
    log = io.StringIO()
    fit(tiny_config(["ce", "threads_seen"], epochs=1, train={"threads": 2}), tmp_path / "run", plugins=plugins,
        stream=log)
    assert set(seen) == {2} and torch.get_num_threads() == before
    assert json.loads((tmp_path / "run" / "run.json").read_text())["threads"] == 2
    assert "device cpu, 2 CPU threads (train.threads);" in log.getvalue()
    # given back when the run fails too (here after the threads were set: --until beyond epochs)
    with pytest.raises(ConfigError, match="--until 5 is beyond epochs = 1"):
        fit(tiny_config(["ce"], epochs=1, train={"threads": 2}), tmp_path / "other", until=5, progress=False)
    assert torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    log = io.StringIO()
    fit(tiny_config(["ce"], epochs=1), tmp_path / "auto", stream=log)
    assert "device cpu, 1 CPU thread (train.threads = auto: OMP_NUM_THREADS);" in log.getvalue()
