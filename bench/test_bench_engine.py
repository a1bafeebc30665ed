"""End-to-end: the engine's training step vs a plain hand-written PyTorch loop.

Both train the same model (same initial weights) on the same on-device data with
the same augmentation, loss, optimizer and schedule, in the same process, for the
same number of steps; the ratio engine / plain is the engine's overhead
(target: within 5%). Run with ``pytest bench/test_bench_engine.py --benchmark-only``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from batchkin.config import load_raw
from batchkin.data import random_crop_flip
from batchkin.trainer import lr_factor, prepare, train_step

STEPS = 20

CONFIGS = {
    "digits-resnet8": {"data": {"name": "digits", "batch_size": 64, "crop_padding": 1}, "model": {"name": "resnet8"}},
    "digits-vit": {"data": {"name": "digits", "batch_size": 64, "crop_padding": 1},
                   "model": {"name": "vit", "dim": 64, "depth": 2}},
}


def _state(name):
    raw = {**load_raw("configs/quickstart.toml"), **CONFIGS[name], "epochs": 50}
    state = prepare(raw)
    state.epoch = 1
    state.model.train()
    return state


def _engine_steps(state, batches):
    for idx in batches:
        train_step(state, idx)


def _plain_steps(model, opt, sched, data, batches, gen, cfg):
    for idx in batches:
        i = idx[""]
        x = random_crop_flip(data.x[i], cfg.data.crop_padding, False, gen)
        x = (x.float() / 255.0 - data.mean) / data.std
        loss = F.cross_entropy(model(x), data.y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("impl", ["engine", "plain"])
def test_train_steps(benchmark, name, impl):
    state = _state(name)
    batches = [b for _, b in zip(range(STEPS), iter(state.sampler))]
    benchmark.group = f"e2e {name} ({STEPS} steps)"
    benchmark.extra_info.update({"impl": impl, "steps": STEPS, "batch": state.config.data.batch_size})
    if impl == "engine":
        benchmark.pedantic(_engine_steps, args=(state, batches), rounds=5, warmup_rounds=1)
    else:
        model = copy.deepcopy(state.model)
        cfg = state.config
        opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                              weight_decay=cfg.optim.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, state.steps_per_epoch))
        gen = torch.Generator().manual_seed(0)
        benchmark.pedantic(_plain_steps, args=(model, opt, sched, state.train_data, batches, gen, cfg),
                           rounds=5, warmup_rounds=1)
