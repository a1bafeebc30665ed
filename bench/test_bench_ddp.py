"""Multi-process training throughput on the CPU: 1 process vs 2 gloo processes, same global batch.

Each implementation keeps its processes alive for the whole benchmark (a small pool
started once: process group, ``prepare``, DistributedDataParallel as ``fit`` sets
them up), so a timed round is only ``STEPS`` calls of the engine's ``train_step`` on
every rank between two barriers — no interpreter start, no import, no data loading.

* ``1 process``: ``data.batch_size = G`` on one process;
* ``2 processes``: ``data.batch_size = G / 2`` on each of two gloo ranks (DDP, one
  gradient all-reduce of the model's parameters per step).

Every process runs ``THREADS`` intra-op threads (``BATCHKIN_BENCH_THREADS``, default 1:
one core per process, as torchrun's ``OMP_NUM_THREADS=1``, the CPU analogue of one
device per rank; on a loaded two-core machine two threads in one process are slower
than one).

Both see the same global batch of ``G`` images per step (the samplers shard one common
draw), so images/s = ``STEPS * G / round time``; ``extra_info`` records it with the
bytes DDP all-reduces per step (4 bytes per fp32 parameter).

    pytest bench/test_bench_ddp.py --benchmark-only          # pytest-benchmark table
    python bench/test_bench_ddp.py [--rounds 7] [--steps 10]  # interleaved rounds, medians

The script form alternates the implementations round by round (both pools alive), the
fair comparison on a shared machine; ``-m "not slow"`` keeps the ``ce`` case only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

STEPS = 10
THREADS = int(os.environ.get("BATCHKIN_BENCH_THREADS", "1"))
QUICK = os.environ.get("BATCHKIN_BENCH_QUICK") == "1"

BASE = {
    "seed": 0, "epochs": 1000, "device": "cpu",
    "data": {"name": "digits", "batch_size": 128, "crop_padding": 1},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
}
CONFIGS = {
    "ce-resnet8": {"methods": ["ce"], "model": {"name": "resnet8", "width": 16}},
    "moco-resnet8": {"methods": ["moco"], "model": {"name": "resnet8", "width": 16},
                     "moco": {"proj_hidden": 256, "proj_dim": 64, "pred_hidden": 256}},
}


def run_config(name: str, world: int) -> dict:
    """The raw config of case ``name`` for ``world`` processes (global batch kept)."""
    raw = {**BASE, **CONFIGS[name]}
    raw["data"] = {**BASE["data"], "batch_size": BASE["data"]["batch_size"] // world}
    return raw


def _worker(rank: int, world: int, init_file: str, raw: dict, threads: int, conn) -> None:
    import torch.distributed as dist

    from batchkin.distributed import DistContext
    from batchkin.trainer import prepare, train_step

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    state = prepare(raw, rank=rank, world_size=world)
    DistContext(rank, world).wrap(state)
    state.hooks.on_fit_start(state=state)
    state.epoch = 0
    batches = iter(())

    def next_batch():
        nonlocal batches
        idx = next(batches, None)
        if idx is None:
            state.epoch += 1
            state.sampler.set_epoch(state.epoch)
            state.hooks.on_epoch_start(state=state)
            state.model.train()
            batches = iter(state.sampler)
            idx = next(batches)
        return idx

    params = sum(p.numel() for p in state.unwrapped_model.parameters() if p.requires_grad)
    conn.send({"params": params})
    while (steps := conn.recv()) is not None:
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step(state, next_batch())
        if world > 1:
            dist.barrier()
        conn.send(time.perf_counter() - t0)
    if world > 1:
        dist.destroy_process_group()


class Pool:
    """``world`` live training processes of one run; :meth:`steps` trains them ``n`` steps."""

    def __init__(self, name: str, world: int):
        self.world = world
        self.global_batch = BASE["data"]["batch_size"]
        ctx = mp.get_context("spawn")
        self.tmp = tempfile.TemporaryDirectory()
        init_file = os.path.join(self.tmp.name, "rendezvous")
        threads = THREADS
        self.conns, self.procs = [], []
        for rank in range(world):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, world, init_file, run_config(name, world), threads, child),
                            daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        self.params = [c.recv() for c in self.conns][0]["params"]

    def steps(self, n: int) -> float:
        for c in self.conns:
            c.send(n)
        return max(c.recv() for c in self.conns)

    def close(self) -> None:
        for c in self.conns:
            c.send(None)
        for p in self.procs:
            p.join(timeout=60)
        self.tmp.cleanup()


CASES = [pytest.param("ce-resnet8", id="ce-resnet8"),
         pytest.param("moco-resnet8", id="moco-resnet8", marks=pytest.mark.slow)]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_ddp_throughput(benchmark, name, world):
    pool = Pool(name, world)
    try:
        benchmark.group = f"ddp {name} (global batch {pool.global_batch}, {STEPS} steps)"
        benchmark.extra_info.update({
            "impl": f"{world} process" + ("es" if world > 1 else ""), "world": world, "steps": STEPS,
            "global_batch": pool.global_batch, "threads_per_process": THREADS,
            "allreduce_bytes_per_step": 4 * pool.params if world > 1 else 0, "baseline": "1 process",
            "images": STEPS * pool.global_batch,
        })
        benchmark.pedantic(pool.steps, args=(STEPS,), rounds=3 if QUICK else 5, warmup_rounds=1)
        benchmark.extra_info["images_per_s"] = STEPS * pool.global_batch / benchmark.stats.stats.median
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cases", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    args = parser.parse_args()
    print(f"| case | processes | threads each | global batch | images/s (median of {args.rounds}) | "
          f"min..max | vs 1 process | all-reduce bytes/step |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.cases:
        pools = {w: Pool(name, w) for w in (1, 2)}
        try:
            for pool in pools.values():
                pool.steps(args.steps)  # warm-up
            rates: dict[int, list[float]] = {1: [], 2: []}
            for _ in range(args.rounds):  # interleaved: 1, 2, 1, 2, ...
                for w, pool in pools.items():
                    rates[w].append(args.steps * pool.global_batch / pool.steps(args.steps))
            base = statistics.median(rates[1])
            for w, pool in pools.items():
                med = statistics.median(rates[w])
                print(f"| {name} | {w} | {THREADS} | {pool.global_batch} | {med:.0f} | "
                      f"{min(rates[w]):.0f}..{max(rates[w]):.0f} | {med / base:.2f}x | "
                      f"{4 * pool.params if w > 1 else 0:,} |", flush=True)
        finally:
            for pool in pools.values():
                pool.close()


if __name__ == "__main__":
    main()
