"""End-to-end: training throughput of every method, its step-time breakdown, and the engine's overhead.

Fashion-MNIST (GPU-resident uint8 data on CUDA, on-device crop/flip/normalise) with
ResNet-32 and the small vision transformer, batch 128:

* ``test_train_steps``: the engine's training step for each method (images/s in the
  report). For ``ce`` the same work is also done by a plain hand-written PyTorch loop
  (same model and initial weights, same batches, augmentation, loss, optimizer and
  schedule) in the same process: the ratio engine / plain is the engine's overhead
  (target: within 5%); ``torch.compile`` on and off.
* ``test_step_breakdown``: where a step's time goes (data, hooks, forward, loss,
  backward, optimizer; :class:`batchkin.state.StepTimer`), measured in separate
  rounds because the timer synchronises the device at every phase boundary.

Run with ``batchkin bench e2e`` (or ``pytest bench/test_bench_engine.py --benchmark-only``);
``-m "not slow"`` keeps the ``ce`` / ResNet-32 case only. On a shared machine the
engine-vs-plain ratio is best read from interleaved rounds (engine and plain
alternating in one process, the median of the per-pair ratios):

    python bench/test_bench_engine.py --case ce-resnet32 --rounds 7
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from batchkin.data import random_crop_flip
from batchkin.state import StepTimer
from batchkin.trainer import lr_factor, prepare, train_step

from harness import interleave

STEPS = 10
BATCH = 128
MODELS = {"resnet32": {"name": "resnet32"}, "vit": {"name": "vit", "dim": 64, "depth": 4, "heads": 4, "patch": 4}}
#: method set, model, extra config tables
CASES = {
    "ce-resnet32": (["ce"], "resnet32", {}),
    "ce-vit": (["ce"], "vit", {}),
    "bbn-resnet32": (["bbn"], "resnet32", {}),
    "batchformer-resnet32": (["ce", "batchformer"], "resnet32", {}),
    "drloc-vit": (["ce", "drloc"], "vit", {}),
    "moco-resnet32": (["moco"], "resnet32", {"data": {"augment": False}}),
    "sdmp-resnet32": (["moco", "sdmp"], "resnet32", {"data": {"augment": False}}),
}
QUICK = "ce-resnet32"


def _raw(case: str, compile_: bool = False) -> dict:
    methods, model, extra = CASES[case]
    return {
        "seed": 0, "epochs": 50, "methods": methods, "device": "cuda" if torch.cuda.is_available() else "cpu",
        "data": {"name": "fashion_mnist", "batch_size": BATCH, "crop_padding": 2, **extra.get("data", {})},
        "model": dict(MODELS[model]),
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        "schedule": {"name": "cosine", "warmup_epochs": 1},
        "train": {"log_every": 10**9, "compile": compile_},
    }


def _state(case: str, compile_: bool = False):
    state = prepare(_raw(case, compile_))
    state.epoch = 1
    state.model.train()
    return state


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _engine_steps(state, batches):
    for idx in batches:
        train_step(state, idx)
    _sync(state.device)


def _plain_steps(model, opt, sched, data, batches, gen, cfg, hflip):
    for idx in batches:
        i = idx[""]
        x = random_crop_flip(data.x[i], cfg.data.crop_padding, hflip, gen)
        x = (x.float() / 255.0 - data.mean) / data.std
        loss = F.cross_entropy(model(x), data.y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _sync(x.device)


def _plain_args(state, batches, compile_: bool) -> tuple:
    """The plain loop's model (a copy of the engine's initial weights), optimizer, schedule and inputs."""
    model = copy.deepcopy(state.unwrapped_model)
    if compile_:
        model.forward_features = torch.compile(model.forward_features)
    cfg = state.config
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, state.steps_per_epoch))
    gen = torch.Generator(device=state.device).manual_seed(0)
    return model, opt, sched, state.train_data, batches, gen, cfg, state.splits.hflip


def _marks(case, impl="engine", compile_=False):
    return () if (case, impl, compile_) in ((QUICK, "engine", False), (QUICK, "plain", False)) else pytest.mark.slow


PARAMS = [pytest.param(case, impl, c, id=f"{case}-{impl}" + ("-compile" if c else ""), marks=_marks(case, impl, c))
          for case in CASES for impl in (("engine", "plain") if CASES[case][0] == ["ce"] else ("engine",))
          for c in ((False, True) if CASES[case][0] == ["ce"] else (False,))]


@pytest.mark.parametrize("case,impl,compile_", PARAMS)
def test_train_steps(benchmark, case, impl, compile_):
    state = _state(case, compile_)
    batches = [b for _, b in zip(range(STEPS), iter(state.sampler))]
    images = sum(len(i) for b in batches for i in b.values())
    benchmark.group = f"e2e {case}" + (" compiled" if compile_ else "") + f" ({STEPS} steps)"
    benchmark.extra_info.update({"impl": impl, "steps": STEPS, "batch": BATCH, "images": images,
                                 "compile": compile_, "device": str(state.device)})
    if impl == "engine":
        benchmark.pedantic(_engine_steps, args=(state, batches), rounds=3, warmup_rounds=1)
        return
    benchmark.pedantic(_plain_steps, args=_plain_args(state, batches, compile_), rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == QUICK else pytest.mark.slow) for c in CASES])
def test_step_breakdown(benchmark, case):
    state = _state(case)
    batches = [b for _, b in zip(range(STEPS), iter(state.sampler))]
    _engine_steps(state, batches)  # warm-up
    state.timer = StepTimer(state.device)
    benchmark.group = f"breakdown {case}"
    benchmark.extra_info.update({"impl": "engine+timer", "steps": STEPS, "batch": BATCH})
    benchmark.pedantic(_engine_steps, args=(state, batches), rounds=2, warmup_rounds=0)
    benchmark.extra_info["phases"] = {k: round(v, 4) for k, v in state.timer.fractions().items()}
    assert abs(sum(benchmark.extra_info["phases"].values()) - 1.0) < 1e-3


def interleaved(case: str, rounds: int, compile_: bool = False) -> dict:
    """Engine and plain rounds alternating on the same batches; per-pair ratios plain / engine."""
    state = _state(case, compile_)
    batches = [b for _, b in zip(range(STEPS), iter(state.sampler))]
    plain_args = _plain_args(state, batches, compile_)
    fns = {"plain": lambda: _plain_steps(*plain_args), "engine": lambda: _engine_steps(state, batches)}
    for fn in fns.values():  # warm-up both
        fn()
    res = interleave(fns, rounds, baseline="plain")
    return {"case": case, "compile": compile_, "rounds": rounds, "threads": torch.get_num_threads(),
            "steps": STEPS, "batch": BATCH,
            "engine_s": res["median_s"]["engine"], "plain_s": res["median_s"]["plain"],
            "ratio_plain_over_engine": res["median_ratio"]["engine"], "ratios": res["ratios"]["engine"]}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="engine vs plain loop, interleaved rounds")
    ap.add_argument("--case", default=QUICK, choices=[c for c in CASES if CASES[c][0] == ["ce"]])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    # one line: `batchkin bench interleaved` reads it
    print(json.dumps(interleaved(args.case, args.rounds, args.compile)))
