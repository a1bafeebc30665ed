"""The engine against a plain PyTorch loop and Lightning's Trainer: per-step overhead and fit's fixed cost.

The case is the quickstart's: ResNet-8 (width 16) on scikit-learn's digits, batch 64, SGD with
momentum and a cosine schedule, one torch thread. Every side does the same work per step: the
sampler's indices, batched random crop on the uint8 images, normalisation, forward,
cross-entropy, backward, optimizer and scheduler step.

* :func:`step_overhead` — one training step of the engine (``train_step``) against one step of
  a plain hand-written loop, alternating step by step for hundreds of rounds
  (:func:`harness.interleave`), timed in process CPU time: with one thread, time the
  process spends descheduled on a shared machine does not count. Target: within 2%.
* :func:`fixed_cost` — what ``fit`` costs besides its training steps. Each round runs one
  epoch three ways, alternating: the plain loop over the epoch's steps, ``batchkin.fit``
  into a fresh run folder, and (when ``lightning`` imports) ``Trainer(...)`` +
  ``trainer.fit`` with the same steps in a ``training_step`` (its default checkpointing and
  logger, no progress bar or model summary). A side's fixed cost is its wall time minus the
  plain loop's in the same round (wall time: waiting for the disk counts). Imports and
  plugin discovery happen before the rounds (``Plugins()`` is timed once on its own);
  batchkin's dataset loading, its final test evaluation and its report (PNG plots), which
  Lightning's ``fit`` does not do, are timed inside each run and reported apart from the
  comparable fixed cost. The durable writes (``fsync``) batchkin makes so that a crash
  leaves every file whole are counted and their time reported.

``python bench/peers_engine.py [--rounds N] [--step-rounds N]`` prints one JSON line;
``batchkin bench peers`` runs it with ``OMP_NUM_THREADS=1``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F

from harness import interleave

RAW = {
    "seed": 0, "epochs": 1, "methods": ["ce"], "device": "cpu",
    "data": {"name": "digits", "batch_size": 64, "crop_padding": 1},
    "model": {"name": "resnet8", "width": 16},
    "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "schedule": {"name": "cosine", "warmup_epochs": 1},
    "train": {"log_every": 10**9},
}


def _setup(plugins=None):
    """The engine's state for RAW (epoch 1) and one epoch of the sampler's steps."""
    from batchkin.trainer import prepare

    state = prepare(copy.deepcopy(RAW), plugins)
    state.epoch = 1
    state.sampler.set_epoch(1)
    state.model.train()
    return state, list(state.sampler)


class PlainLoop:
    """The hand-written loop: the engine's initial weights, optimizer settings and schedule."""

    def __init__(self, state, steps):
        from batchkin.trainer import lr_factor

        self.data, self.cfg, self.hflip, self.steps = state.train_data, state.config, state.splits.hflip, steps
        self.model = copy.deepcopy(state.unwrapped_model)
        o = self.cfg.optim
        self.opt = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_factor(self.cfg, len(steps)))
        self.gen = torch.Generator().manual_seed(0)

    def step(self, idx):
        from batchkin.data import random_crop_flip

        d = self.data
        x = random_crop_flip(d.x[idx], self.cfg.data.crop_padding, self.hflip, self.gen)
        x = (x.float() / 255.0 - d.mean) / d.std
        loss = F.cross_entropy(self.model(x), d.y[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()

    def epoch(self):
        for indices in self.steps:
            self.step(indices[""])


def step_overhead(rounds: int = 400) -> dict:
    """One engine step against one plain step, ``rounds`` times, in process CPU time."""
    from batchkin.trainer import train_step

    state, steps = _setup()
    plain = PlainLoop(state, steps)
    pos = {"plain": 0, "engine": 0}

    def nxt(name):
        pos[name] = (pos[name] + 1) % len(steps)
        return steps[pos[name]]

    fns = {"plain": lambda: plain.step(nxt("plain")[""]), "engine": lambda: train_step(state, nxt("engine"))}
    for _ in range(2 * len(steps)):  # warm-up
        for fn in fns.values():
            fn()
    res = interleave(fns, rounds, baseline="plain", timer=time.process_time)
    ratios = res["ratios"]["engine"]
    return {"case": "ce resnet8 digits, batch 64, 1 thread", "rounds": rounds, "timer": "process CPU time",
            "plain_ms": 1e3 * res["median_s"]["plain"], "engine_ms": 1e3 * res["median_s"]["engine"],
            "plain_over_engine": res["median_ratio"]["engine"],
            "overhead_pct": 100 * (1 / res["median_ratio"]["engine"] - 1),
            "quartiles": [round(q, 4) for q in statistics.quantiles(ratios, n=4)],
            "range": [min(ratios), max(ratios)]}


class _Clock:
    """Wall time spent in chosen functions during a run (the parts reported apart). A call made
    inside another timed one is also counted under ``<label> in <outer>`` (the report's fsyncs)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self.count: dict[str, int] = {}
        self.inside: list[str] = []

    def wrap(self, obj, attr: str, label: str):
        real = getattr(obj, attr)

        def timed(*args, **kwargs):
            labels = [label] + [f"{label} in {outer}" for outer in self.inside[-1:]]
            self.inside.append(label)
            t0 = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.inside.pop()
                for name in labels:
                    self.seconds[name] = self.seconds.get(name, 0.0) + dt
                    self.count[name] = self.count.get(name, 0) + 1

        setattr(obj, attr, timed)
        return real


@contextlib.contextmanager
def _clocked(plugins):
    """Time batchkin's dataset loading, test evaluation, report and fsyncs during a ``fit``."""
    import batchkin.report
    import batchkin.trainer

    clock = _Clock()
    entry = plugins.dataset(RAW["data"]["name"])
    undo = [(batchkin.trainer, "evaluate", clock.wrap(batchkin.trainer, "evaluate", "evaluation")),
            (batchkin.report, "write_report", clock.wrap(batchkin.report, "write_report", "report")),
            (os, "fsync", clock.wrap(os, "fsync", "fsync")),
            (entry, "obj", clock.wrap(entry, "obj", "dataset"))]
    try:
        yield clock
    finally:
        for obj, attr, real in undo:
            setattr(obj, attr, real)


def _lightning_module(state, steps):
    import lightning.pytorch as L

    from batchkin.data import random_crop_flip
    from batchkin.trainer import lr_factor

    data, cfg, hflip = state.train_data, state.config, state.splits.hflip

    class Module(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.gen = torch.Generator().manual_seed(0)

        def training_step(self, idx, _):
            x = random_crop_flip(data.x[idx], cfg.data.crop_padding, hflip, self.gen)
            x = (x.float() / 255.0 - data.mean) / data.std
            return F.cross_entropy(self.model(x), data.y[idx])

        def configure_optimizers(self):
            o = cfg.optim
            opt = torch.optim.SGD(self.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, len(steps)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Steps:  # the epoch's index batches as a loader (a list would read as several loaders)
        def __iter__(self):
            return (s[""] for s in steps)

        def __len__(self):
            return len(steps)

    def run(folder):
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=folder)
        trainer.fit(Module(copy.deepcopy(state.unwrapped_model)), train_dataloaders=Steps())
        assert trainer.global_step == len(steps)

    return run


def fixed_cost(rounds: int = 9) -> dict:
    """fit's fixed cost against the plain loop and Lightning's Trainer, ``rounds`` interleaved rounds."""
    from batchkin.plugin import Plugins
    from batchkin.trainer import fit

    t0 = time.perf_counter()
    plugins = Plugins()
    plugin_s = time.perf_counter() - t0
    state, steps = _setup(plugins)
    plain = PlainLoop(state, steps)
    try:
        import lightning  # noqa: F401

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", module="lightning")
        lightning_run = _lightning_module(state, steps)
        lightning_version = lightning.__version__
    except ImportError:
        lightning_run, lightning_version = None, None
    root = tempfile.mkdtemp(prefix="batchkin-fixed-cost-")
    parts: list[dict] = []

    def batchkin_fit():
        out = tempfile.mkdtemp(dir=root)
        with _clocked(plugins) as clock:
            fit(copy.deepcopy(RAW), out, plugins=plugins, progress=False)
        parts.append(dict(clock.seconds, fsyncs=clock.count.get("fsync", 0) - clock.count.get("fsync in report", 0)))
        shutil.rmtree(out)

    def lightning_fit():
        out = tempfile.mkdtemp(dir=root)
        lightning_run(out)
        shutil.rmtree(out)

    fns = {"plain": plain.epoch, "batchkin": batchkin_fit}
    if lightning_run is not None:
        fns["lightning"] = lightning_fit
    try:
        for fn in fns.values():  # warm-up (first-use costs: allocator, kernels, lazy imports)
            fn()
        parts.clear()
        res = interleave(fns, rounds, baseline="plain")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    times = res["times"]
    apart = ("dataset", "evaluation", "report")
    bk_fixed = [b - p - sum(d.get(k, 0.0) for k in apart) for b, p, d in zip(times["batchkin"], times["plain"], parts)]
    out = {"case": "ce resnet8 digits, one epoch of %d steps of batch 64, 1 thread" % len(steps), "rounds": rounds,
           "steps": len(steps), "plugins_s": plugin_s, "plain_epoch_s": res["median_s"]["plain"],
           "batchkin_total_s": res["median_s"]["batchkin"],
           "batchkin_fixed_s": statistics.median(bk_fixed), "batchkin_fixed_range_s": [min(bk_fixed), max(bk_fixed)],
           "batchkin_apart_s": {k: statistics.median(d.get(k, 0.0) for d in parts) for k in apart},
           # the durable writes' waits within the fixed cost (the report's own are in its time)
           "batchkin_fsync_s": statistics.median(d.get("fsync", 0.0) - d.get("fsync in report", 0.0) for d in parts),
           "batchkin_fixed_without_fsync_s": statistics.median(
               f - d.get("fsync", 0.0) + d.get("fsync in report", 0.0) for f, d in zip(bk_fixed, parts)),
           "batchkin_fsyncs": parts[0]["fsyncs"], "lightning": lightning_version}
    if lightning_run is not None:
        lf = [t - p for t, p in zip(times["lightning"], times["plain"])]
        out.update(lightning_total_s=res["median_s"]["lightning"], lightning_fixed_s=statistics.median(lf),
                   lightning_fixed_range_s=[min(lf), max(lf)],
                   lightning_over_batchkin=[round(a / b, 3) if b > 0 else None for a, b in zip(lf, bk_fixed)])
    return out


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9, help="fixed-cost rounds")
    ap.add_argument("--step-rounds", type=int, default=400, help="per-step rounds")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"step": step_overhead(args.step_rounds), "fixed": fixed_cost(args.rounds)}
    print(json.dumps(result), file=sys.stdout)
