"""batchkin's ops against the libraries a user would otherwise call, interleaved in one process.

Each section times every implementation in alternating rounds (:func:`harness.interleave`)
and reports ``peer time / batchkin time`` per round: the median and the range over the rounds
(above 1: batchkin is faster). Each also measures its physical floor in the same rounds.

* ``mixing`` — a mixing step: batchkin draws its parameters (:func:`sample_mix_params`) and
  mixes (:func:`batch_mix`, per-sample ``lam`` and boxes, a new tensor); the peers are timm's
  ``Mixup`` (``timm/data/mixup.py``; ``mode="batch"``, one ``lam`` and box for the batch, and
  ``mode="elem"``, per-sample ``lam`` as batchkin; both mix in place and build the mixed
  one-hot targets), eager ``torch.lerp`` of the flipped batch (mixup, one ``lam``) and a
  slice paste of the flipped box (cutmix, one box) on a clone. Floor: ``out.copy_(x)``, the
  same bytes read and written once; batchkin's mixing alone is reported as a fraction of it.
  timm's package import needs torchvision, which this machine's CPU torch cannot import: its
  ``mixup.py`` imports only numpy and torch, and is loaded by file path from the installed
  ``timm`` (``pip install --no-deps timm``), nothing stubbed. timm mixes float images only
  (its in-place ``mul_`` refuses uint8), so uint8 rows have no timm mixup peer.
* ``overhead`` — each op's public call against the kernel it runs (the same inputs, the
  kernel called directly), in microseconds per call: the median and range of the per-round
  differences. Target: at most 20 µs.
* ``sampler`` — one epoch of BBN's reversed stream as the engine takes it (``BBNSampler``:
  per-step index tensors of both streams) against ``list(WeightedRandomSampler)`` with the
  same number of draws (per-sample weights ``P_c / n_c``), ``torch.multinomial`` of the
  same, and the same dual stream built from them (the uniform permutation plus
  ``BatchSampler(WeightedRandomSampler)`` batches as tensors). Target: at least 2x.
* ``layer`` — BatchFormer's layer forward + backward against ``nn.TransformerEncoderLayer``
  (same weights, training mode, dropout 0.5) and its ``torch.compile``; floor: the layer's
  matrix products alone (forward and backward, as ``torch.mm``) in the same rounds.

``python bench/peers_kernels.py [--quick] [--json PATH] [--sections a,b]``: the JSON file is
rewritten after every section (partial results survive an interrupted run); the last line
printed is the whole result as JSON. ``batchkin bench peers`` runs it with torch's default
thread count (the machine's cores).
"""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import interleave

SECTIONS = ("mixing", "overhead", "sampler", "layer")


def summarize(res: dict, baseline: str) -> dict:
    """``{name: {"ms", "ratio", "range"}}``: median time and ``name time / baseline time`` per round
    (how many times faster ``baseline`` is), median and range."""
    times = res["times"]
    out = {}
    for name, ts in times.items():
        r = [t / b for t, b in zip(ts, times[baseline])]
        out[name] = {"ms": round(1e3 * statistics.median(ts), 4), "ratio": round(statistics.median(r), 3),
                     "range": [round(min(r), 3), round(max(r), 3)]}
    return out


def clock(device="cpu"):
    """The timer of a section: the process's CPU time on the CPU (the benchmarks run one torch
    thread there, so time spent descheduled by a shared machine's other work does not count),
    wall time on CUDA (each call synchronises)."""
    return time.process_time if torch.device(device).type == "cpu" else time.perf_counter


def _repeat_for(fn, budget_s: float = 2e-3, device="cpu") -> int:
    """Calls per timed unit so that one unit takes about ``budget_s`` (1 to 1000), from the
    fastest of five timed calls."""
    timer = clock(device)
    fn()
    best = math.inf
    for _ in range(5):
        t0 = timer()
        fn()
        best = min(best, timer() - t0)
    return max(1, min(1000, math.ceil(budget_s / max(best, 1e-7))))


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _synced(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


# --------------------------------------------------------------------------------------------- mixing


def load_timm_mixup():
    """timm's ``timm/data/mixup.py`` loaded by file path (``None`` when timm is not installed)."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "mixup.py"
    mod_spec = importlib.util.spec_from_file_location("timm_data_mixup", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    module.timm_version = _timm_version(path)
    return module


def _timm_version(mixup_path: Path) -> str:
    try:
        from importlib.metadata import version

        return version("timm")
    except Exception:
        return str(mixup_path)


MIX_SIZES = ((16, 3, 32, 32), (256, 3, 32, 32), (128, 3, 224, 224))
MIX_QUICK = ((16, 3, 32, 32),)


def mixing(device="cpu", quick=False, rounds=15, sizes=None) -> list[dict]:
    from batchkin.kernels import batch_mix as bm

    timm = load_timm_mixup()
    rows = []
    cases = [(s, op, dt) for s in (sizes or (MIX_QUICK if quick else MIX_SIZES))
             for op, dt in (("mixup", torch.float32), ("cutmix", torch.float32), ("cutmix", torch.uint8),
                            ("resizemix", torch.uint8))]
    for shape, name, dtype in cases:
        B, C, H, W = shape
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        x = ((x * 40 + 128).clamp_(0, 255).to(torch.uint8) if dtype == torch.uint8 else x).to(device)
        target = torch.randint(10, (B,), generator=g).to(device)
        params = bm.sample_mix_params(B, H, W, generator=g, ops=(name,), device=device)
        draw = torch.Generator().manual_seed(1)
        y0, x0, h, w = (int(v) for v in params.boxes[0, 0])
        lam0 = float(params.lam[0])
        out = torch.empty_like(x)
        work = x.clone()
        fns = {
            "batchkin": lambda: bm.batch_mix(x, *bm.sample_mix_params(B, H, W, generator=draw, ops=(name,),
                                                                      device=device)),
            "batchkin_mix": lambda: bm.batch_mix(x, *params),
            "copy": lambda: out.copy_(x),
        }
        if name == "mixup" and dtype != torch.uint8:
            fns["lerp"] = lambda: torch.lerp(x.flip(0), x, lam0)
        if name == "cutmix":
            def paste():
                o = x.clone()
                o[:, :, y0:y0 + h, x0:x0 + w] = x[:, :, y0:y0 + h, x0:x0 + w].flip(0)
                return o
            fns["paste"] = paste
        if name == "resizemix":
            def resize_paste():
                o = x.clone()
                src = x.flip(0) if dtype != torch.uint8 else x.flip(0).float()
                patch = F.interpolate(src, size=(max(h, 1), max(w, 1)), mode="bilinear", align_corners=False)
                o[:, :, y0:y0 + h, x0:x0 + w] = patch[:, :, :h, :w].round().clamp(0, 255).to(x.dtype) \
                    if dtype == torch.uint8 else patch[:, :, :h, :w]
                return o
            fns["resize_paste"] = resize_paste
        if timm is not None and name in ("mixup", "cutmix") and not (name == "mixup" and dtype == torch.uint8):
            mixup = name == "mixup"
            alpha = dict(mixup_alpha=1.0 if mixup else 0.0, cutmix_alpha=0.0 if mixup else 1.0)
            for mode in ("batch", "elem"):
                mixer = timm.Mixup(**alpha, prob=1.0, mode=mode, label_smoothing=0.0, num_classes=10)
                fns[f"timm_{mode}"] = (lambda m: lambda: m(work, target))(mixer)
        fns = {k: _synced(v, device) for k, v in fns.items()}
        repeat = _repeat_for(fns["batchkin"], device=device)
        for fn in fns.values():
            fn()
        res = interleave(fns, rounds, baseline="batchkin", repeat=repeat, timer=clock(device))
        # peers that draw their own parameters face batchkin's draw + mix; the others, given a
        # lam or a box, face batchkin's mixing given its parameters
        drawn = {k: v for k, v in summarize(res, "batchkin").items() if k.startswith("timm")}
        given = {k: v for k, v in summarize(res, "batchkin_mix").items() if k not in drawn and k != "batchkin"}
        peers = {**drawn, **{k: v for k, v in given.items() if k not in ("batchkin_mix", "copy")}}
        rows.append({
            "shape": list(shape), "operator": name, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
            "repeat": repeat, "batchkin_ms": round(1e3 * res["median_s"]["batchkin"], 4),
            "batchkin_mix_ms": round(1e3 * res["median_s"]["batchkin_mix"], 4),
            "vs_draw_and_mix": drawn, "vs_mix": given,
            "copy_fraction": given["copy"]["ratio"],
            "copy_GBps": round(bm.bytes_moved(x) / res["median_s"]["copy"] / 1e9, 2),
            "worst_peer": min(peers, key=lambda k: peers[k]["ratio"]) if peers else None,
        })
        ratios = ", ".join(f"{k} {v['ratio']}x" for k, v in peers.items())
        _progress(f"mixing {shape} {name} {rows[-1]['dtype']}: {ratios}")
    return rows


# ------------------------------------------------------------------------------------------- overhead


def overhead(quick=False, rounds=21) -> list[dict]:
    """Public call minus kernel, per op, in microseconds (CPU)."""
    from batchkin.kernels import batch_attention as ba
    from batchkin.kernels import batch_mix as bm
    from batchkin.kernels import dispatch
    from batchkin.kernels import drloc_pairs as dp
    from batchkin.kernels import reversed_sampler as rs
    from batchkin.kernels.batch_attention.cpu import sdpa_forward

    for name in ("batch_mix", "drloc_pairs", "reversed_sampler"):
        dispatch.load_cpp(dispatch.REGISTRY[name])
    ops = torch.ops.batchkin
    g = torch.Generator().manual_seed(0)
    cases = {}
    x = torch.randn(256, 3, 32, 32, generator=g)
    p = bm.sample_mix_params(256, 32, 32, generator=g, ops=("mixup",))
    cases["batch_mix 256x3x32x32 float32 mixup"] = (lambda: ops._batch_mix_cpu(x, p.op, p.lam, p.boxes),
                                                     lambda: bm.batch_mix(x, *p))
    v = torch.randint(0, 256, (2, 256, 3, 32, 32), generator=g, dtype=torch.uint8)
    pv = bm.sample_mix_params(256, 32, 32, generator=g, ops=("cutmix",), num_views=2)
    cases["batch_mix 2x256x3x32x32 uint8 cutmix"] = (lambda: ops._batch_mix_cpu(v, pv.op, pv.lam, pv.boxes),
                                                      lambda: bm.batch_mix(v, *pv))
    q, k, vv = (torch.randn(4, 256, 16, generator=g) for _ in range(3))
    cases["batch_attention [4, 256, 16] forward"] = (lambda: sdpa_forward(q, k, vv, 0.25, 0.0, 0, None),
                                                     lambda: ba.batch_attention(q, k, vv))
    grid = torch.randn(64, 96, 7, 7, generator=g)
    cases["drloc_pairs [64, 96, 7, 7] m 64"] = (lambda: ops._drloc_pairs_cpu(grid, 64, 123, False, False),
                                                lambda: dp.drloc_pairs(grid, 64, 123))
    cases["drloc_positions 64x64 pairs"] = (lambda: ops._drloc_positions_cpu(64, 64, 7, 7, 123),
                                            lambda: dp.drloc_positions(64, 64, 7, 7, 123))
    labels = torch.repeat_interleave(torch.arange(10), torch.tensor([400, 300, 200, 150, 100, 80, 60, 40, 20, 10]))
    si, counts = rs.class_sorted_table(labels, 10)
    tables = rs.prepare_tables(si, counts)
    key = rs.epoch_key(5, 1)
    cases["sample_epoch 1,360 draws (tables from counts)"] = (
        lambda: ops._reversed_sampler_cpu(si, *tables, key, 0, 1360),
        lambda: rs.sample_epoch(si, counts, 1360, seed=5, epoch=1))
    rows = []
    for label, (kernel, public) in list(cases.items())[: 2 if quick else None]:
        repeat = _repeat_for(public, 5e-3)
        res = interleave({"kernel": kernel, "public": public}, rounds, baseline="kernel", repeat=repeat,
                         timer=time.process_time)
        diffs = [1e6 * (b - a) for a, b in zip(res["times"]["kernel"], res["times"]["public"])]
        rows.append({"call": label, "kernel_us": round(1e6 * res["median_s"]["kernel"], 2),
                     "public_us": round(1e6 * res["median_s"]["public"], 2),
                     "overhead_us": round(statistics.median(diffs), 2),
                     "overhead_range_us": [round(min(diffs), 2), round(max(diffs), 2)], "repeat": repeat})
        _progress(f"overhead {label}: {rows[-1]['overhead_us']} us")
    draw = torch.Generator().manual_seed(2)
    res = interleave({"draw": lambda: bm.sample_mix_params(256, 32, 32, generator=draw, num_views=2)}, rounds, "draw",
                     repeat=200, timer=time.process_time)
    rows.append({"call": "sample_mix_params B 256, 2 views (the draw itself)", "kernel_us": None,
                 "public_us": round(1e6 * res["median_s"]["draw"], 2), "overhead_us": None, "overhead_range_us": None,
                 "repeat": 200})
    return rows


# -------------------------------------------------------------------------------------------- sampler

SAMPLER_SIZES = ((1_800, 10, 64), (20_000, 100, 128), (100_000, 1000, 256))


def long_tailed_labels(n: int, classes: int) -> torch.Tensor:
    """About ``n`` labels over ``classes`` classes, counts falling 100x from the first to the last."""
    counts = (torch.logspace(0, -2, classes, dtype=torch.float64) * 4 * n / classes).long().clamp(min=1)
    return torch.repeat_interleave(torch.arange(classes), counts)


def sampler(quick=False, rounds=21) -> list[dict]:
    from torch.utils.data import BatchSampler, WeightedRandomSampler

    from batchkin.data import ShuffleSampler
    from batchkin.kernels.reversed_sampler import class_probabilities
    from batchkin.plugins.bbn import BBNSampler

    rows = []
    for n, classes, batch in SAMPLER_SIZES[:1] if quick else SAMPLER_SIZES:
        labels = long_tailed_labels(n, classes)
        counts = torch.bincount(labels, minlength=classes)
        ours = BBNSampler(labels, classes, batch, seed=0)
        draws = ours.num_draws
        weights = (class_probabilities(counts) / counts)[labels]
        g = torch.Generator().manual_seed(0)
        wrs = WeightedRandomSampler(weights, draws, replacement=True, generator=g)
        uniform = ShuffleSampler(len(labels), batch, 0)
        epoch = [0]

        def bbn():
            epoch[0] += 1
            ours.set_epoch(epoch[0])
            return [step for step in ours]

        def dual_from_peers():
            epoch[0] += 1
            uniform.set_epoch(epoch[0])
            return [{"": u[""], "rev": torch.tensor(r)} for u, r in zip(uniform, BatchSampler(wrs, batch, True))]

        def bbn_reversed_epoch():  # the reversed stream's epoch as one tensor: list(WRS)'s work
            epoch[0] += 1
            ours.set_epoch(epoch[0])
            return ours.epoch_draws()

        fns = {"bbn": bbn, "bbn_reversed_epoch": bbn_reversed_epoch, "wrs_list": lambda: list(wrs),
               "multinomial": lambda: torch.multinomial(weights, draws, replacement=True, generator=g),
               "wrs_dual_stream": dual_from_peers}
        repeat = _repeat_for(bbn, 5e-3)
        res = interleave(fns, rounds, baseline="bbn", repeat=repeat, timer=time.process_time)
        rows.append({"labels": len(labels), "classes": classes, "batch": batch, "draws": draws,
                     "steps": len(ours), "repeat": repeat, "vs_bbn": summarize(res, "bbn"),
                     "vs_reversed_epoch": summarize(res, "bbn_reversed_epoch")})
        ratios = ", ".join(f"{k} {v['ratio']}x" for k, v in rows[-1]["vs_bbn"].items())
        _progress(f"sampler {len(labels)} labels: {ratios}")
    return rows


# ---------------------------------------------------------------------------------------------- layer

LAYER_SIZES = ((128, 64), (512, 512), (512, 2048))
COMPILED_SIZES = ((128, 64), (512, 512))


def _gemm_floor(B: int, C: int, device, dtype=torch.float32):
    """The layer's matrix products alone: in/out projections and the FFN, forward and backward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, generator=g).to(device, dtype)
    ws = [torch.randn(n, C, generator=g).to(device, dtype) for n in (3 * C, C, C, C)]
    gy = [torch.randn(B, n, generator=g).to(device, dtype) for n in (3 * C, C, C, C)]

    def run():
        for w, dy in zip(ws, gy):
            torch.mm(x, w.t())  # forward
            torch.mm(dy, w)  # grad input
            torch.mm(dy.t(), x)  # grad weight

    return run


def layer(device="cpu", quick=False, rounds=7, sizes=None, compiled_sizes=None, dtype=torch.float32) -> list[dict]:
    from torch import nn

    from batchkin.nn import BatchFormerLayer

    sizes = sizes or (LAYER_SIZES[:1] if quick else LAYER_SIZES)
    if compiled_sizes is None:
        compiled_sizes = () if quick else COMPILED_SIZES
    compiled_sizes = set(compiled_sizes)
    rows = []
    for B, C in sizes:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(C)
            torch_layer = nn.TransformerEncoderLayer(C, 4, C, 0.5)
        ours = BatchFormerLayer(C, 4, C, 0.5)
        ours.load_state_dict(torch_layer.state_dict())
        ours, torch_layer = (m.to(device, dtype).train() for m in (ours, torch_layer))
        x = torch.randn(B, C, generator=torch.Generator().manual_seed(B)).to(device, dtype).requires_grad_()

        def step(forward):
            def run():
                x.grad = None
                forward().float().sum().backward()
            return _synced(run, device)

        fns = {"batchkin": step(lambda: ours(x)), "torch": step(lambda: torch_layer(x.unsqueeze(1)).squeeze(1)),
               "gemm_floor": _synced(_gemm_floor(B, C, device, dtype), device)}
        if (B, C) in compiled_sizes:
            compiled = torch.compile(torch_layer)
            fns["torch_compile"] = step(lambda: compiled(x.unsqueeze(1)).squeeze(1))
        t0 = time.perf_counter()
        for fn in fns.values():  # warm-up (torch.compile compiles here)
            fn()
        warm_s = time.perf_counter() - t0
        res = interleave(fns, rounds, baseline="batchkin", repeat=_repeat_for(fns["batchkin"], 0.02, device),
                         timer=clock(device))
        s = summarize(res, "batchkin")
        rows.append({"B": B, "C": C, "dtype": str(dtype).removeprefix("torch."), "device": str(device), "times": s,
                     "over_gemm_floor": round(res["median_s"]["batchkin"] / res["median_s"]["gemm_floor"], 2),
                     "warmup_s": round(warm_s, 1)})
        _progress(f"layer B{B} C{C}: " + ", ".join(f"{k} {v['ratio']}x" for k, v in s.items()))
    return rows


# ----------------------------------------------------------------------------------------------- main


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(sections=SECTIONS, quick=False, json_path=None) -> dict:
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__, "sections": {}}
    timm = load_timm_mixup()
    result["timm"] = getattr(timm, "timm_version", None)
    for name in sections:
        t0 = time.perf_counter()
        fn = {"mixing": mixing, "overhead": overhead, "sampler": sampler, "layer": layer}[name]
        result["sections"][name] = {"rows": fn(quick=quick), "seconds": round(time.perf_counter() - t0, 1)}
        if json_path:
            Path(json_path).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the smallest size of each section")
    ap.add_argument("--json", help="rewrite this JSON file after every section")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    args = ap.parse_args()
    chosen = [s for s in args.sections.split(",") if s]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    print(json.dumps(run(chosen, args.quick, args.json)))
