"""Multi-process training with torchrun on CPU (gloo, 2 processes, tiny shapes)."""

import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from batchkin.rundir import load_checkpoint

pytestmark = pytest.mark.dist

def test_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path, torchrun, single, metrics):
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = torchrun(2, two, "--set", "data.batch_size=8")
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = single(one, "--set", "data.batch_size=16")
    assert r1.returncode == 0, r1.stderr[-3000:]
    w2 = load_checkpoint(two / "checkpoints" / "last.pt")["model"]
    w1 = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    m2, m1 = metrics(two), metrics(one)
    # evaluation is reduced across ranks: the same weights give the same counts, so (nearly
    # identical weights) the same accuracies; the loss is logged from rank 0's shard only
    for a, b in zip(m1, m2):
        for key in ("val/top1", "val/balanced_acc", "test/top1"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-9), key
    # rank 0 alone writes: one line per epoch plus the final line
    assert [r["kind"] for r in m2] == ["epoch", "epoch", "final"]
    assert json.loads((two / "run.json").read_text())["world_size"] == 2


def test_two_ranks_accumulating_equal_one_rank_with_the_whole_batch(tmp_path, torchrun, single, metrics):
    """2 ranks x 2 micro-batches of 4 (no_sync on the first, reduced with the second) make
    the steps of one rank with batches of 16 (no augmentation: its draws are per micro-batch);
    rank 0 alone writes the loggers' files."""
    two, one = tmp_path / "two", tmp_path / "one"
    logs = ["--set", 'log.backends=["jsonl","csv"]', "--set", "train.log_every=1", "--set", "data.augment=false"]
    r2 = torchrun(2, two, "--set", "data.batch_size=4", "--set", "train.accumulate=2", *logs)
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = single(one, "--set", "data.batch_size=16", "--set", "data.augment=false")
    assert r1.returncode == 0, r1.stderr[-3000:]
    w2 = load_checkpoint(two / "checkpoints" / "last.pt")["model"]
    w1 = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["step"] for r in metrics(two)] == [r["step"] for r in metrics(one)]
    steps = [json.loads(x)["step"] for x in (two / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, metrics(two)[-1]["step"] + 1))  # one row per step: rank 0's
    assert (two / "steps.csv").read_text().count("\n") == len(steps) + 1


def test_two_rank_evaluation_equals_one_rank(tmp_path, single, metrics):
    """The same weights evaluated by 2 processes and by 1 give identical metrics."""
    one = tmp_path / "one"
    assert single(one, "--set", "data.batch_size=16").returncode == 0
    script = tmp_path / "eval2.py"
    script.write_text(textwrap.dedent(f"""
        import json, torch, torch.distributed as dist
        from batchkin.config import load_raw
        from batchkin.data import DeviceData
        from batchkin.distributed import DistContext
        from batchkin.rundir import load_checkpoint
        from batchkin.trainer import evaluate, prepare, restore
        ctx = DistContext.from_env()
        state = prepare(load_raw({str(one / 'config.toml')!r}), rank=ctx.rank, world_size=ctx.world_size)
        restore(state, load_checkpoint({str(one / 'checkpoints' / 'last.pt')!r}))
        m = evaluate(state, "test", DeviceData(state.splits.test, state.splits, state.device))
        if ctx.rank == 0:
            print("METRICS" + json.dumps(m))
        from batchkin.distributed import end_rank_process  # the exit path of `python -m batchkin` ranks
        end_rank_process(0)
    """))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads(r.stdout.split("METRICS", 1)[1].splitlines()[0])
    final = metrics(one)[-1]
    assert m2["top1"] == final["test/top1"]
    assert m2["per_class"] == final["test/per_class"]
    assert m2["loss"] == pytest.approx(final["test/loss"], rel=1e-6)  # the shards' sums reduced, over all images


def test_a_killed_rank_ends_the_run_with_a_message(tmp_path, torchrun):
    plugin = tmp_path / "killer.py"
    plugin.write_text(textwrap.dedent("""
        import os, signal
        from batchkin.hookspecs import hookimpl
        from batchkin.plugin import Method

        class Killer(Method):
            @hookimpl
            def after_step(self, state):
                if state.rank == 1 and state.step == 2:
                    os.kill(os.getpid(), signal.SIGKILL)

        @hookimpl
        def register_methods(register):
            register("killer", Killer)
    """))
    t0 = time.monotonic()
    r = torchrun(2, tmp_path / "run", "--set", 'methods=["ce","killer"]', "--set", "data.batch_size=8",
                 "--plugin", str(plugin), timeout=240, env={"BATCHKIN_DIST_TIMEOUT": "60"})
    assert r.returncode != 0
    assert time.monotonic() - t0 < 200
    assert "Signal 9" in r.stderr or "SIGKILL" in r.stderr or "exitcode: -9" in r.stderr, r.stderr[-3000:]


def test_a_rank_process_ends_with_its_code_and_its_output_flushed():
    """end_rank_process (run by ``python -m batchkin`` under torchrun) flushes the streams, then
    exits with the command's code without interpreter finalisation."""
    import subprocess
    import sys

    code = ("import sys\nfrom batchkin.distributed import end_rank_process\n"
            "print('out line', end='')\nsys.stderr.write('err line')\nend_rank_process(3)\nprint('never')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout, r.stderr) == (3, "out line", "err line")
