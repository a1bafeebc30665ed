"""The GPU check in one call: Triton parity compiled for real, the kernels against their peers, one
short epoch per method; results under bench/results/<gpu>/gpu_check.{json,md}.

Stages, in order, each written to the results as soon as it ends (a run cut short keeps what it
finished; a stage that fails is recorded with its error and the next one runs):

* ``env`` — versions, the device, its measured copy bandwidth and matmul throughput;
* ``parity`` — every op's Triton path (``BATCHKIN_KERNELS=triton``) on the device against the
  pure-PyTorch reference on the CPU, forward and backward, every dtype the op takes
  (batch_mix float32/float16/bfloat16/uint8 one and two views; batch attention with and without
  dropout; DRLoc positions, fused pairs and the first layer's gather and project strategies;
  the reversed sampler's epoch and explicit-uniform draws): integer results and batch_mix equal
  bit for bit, the others within the tests' per-dtype tolerances;
* ``mixing`` — batch_mix at 256x3x224x224 (float32 and uint8) as a fraction of the measured
  copy bandwidth (``out.copy_(x)``, the same bytes): target >= 0.80; timm's Mixup, lerp and paste
  as in bench/peers_kernels.py;
* ``layer`` — the BatchFormer layer forward + backward at B 512, C 2048 against
  ``nn.TransformerEncoderLayer`` (float32 and bfloat16; its ``torch.compile`` too when the time
  budget allows): target >= 2x;
* ``drloc`` — DRLoc pairs + first layer forward + backward against the original style at the
  benchmark's sizes: target >= 3x, and one step of ours under
  ``torch.cuda.set_sync_debug_mode("error")`` (no host synchronisation);
* ``e2e`` — one epoch of each method's digits config (``configs/``), timed, with its metrics;
* ``tests`` — the test suite's CUDA cases (``pytest tests/kernels -k cuda``), in what time is left.

``--dry`` runs the same code on the CPU with Triton's interpreter, tiny sizes and one or two
rounds (a minute at most; CI runs it, so the script is known to work before a GPU is lent).
``--budget-s`` (default 420) bounds the whole run: a stage that would start with too little
time left is recorded as skipped. Exit status 0 when every stage that ran completed (targets
missed are recorded, not errors), 1 otherwise.

    bench/gpu_check.sh                 # on the GPU machine, from the source checkout
    python bench/gpu_check.py --dry --out /tmp/gpu-dry
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY = "--dry" in sys.argv
if DRY:  # before triton is first imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests" / "kernels"), str(ROOT / "tests")]  # _util needs _common

#: the e2e stage: method -> its digits config
E2E_CONFIGS = {"ce": "quickstart.toml", "bbn": "bbn_digits.toml", "batchformer": "batchformer_digits.toml",
               "drloc": "drloc_digits.toml", "moco": "moco_digits.toml", "sdmp": "sdmp_digits.toml",
               "dino": "dino_digits.toml"}
#: seconds a stage needs at least to start (the tests stage takes whatever is left)
STAGE_MIN_S = {"env": 0, "parity": 60, "mixing": 30, "layer": 40, "drloc": 30, "e2e": 60, "tests": 30}


class ForcedPath:
    """``BATCHKIN_KERNELS=mode`` for a block."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.before = os.environ.get("BATCHKIN_KERNELS")
        os.environ["BATCHKIN_KERNELS"] = self.mode

    def __exit__(self, *exc):
        if self.before is None:
            os.environ.pop("BATCHKIN_KERNELS", None)
        else:
            os.environ["BATCHKIN_KERNELS"] = self.before


# ----------------------------------------------------------------------------------------------- env


def stage_env(device, dry):
    import triton

    from harness import device_name, measure_peaks

    info = {"device": device_name(device.type), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "dry": dry}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["peaks"] = measure_peaks()
    return info


# -------------------------------------------------------------------------------------------- parity


def _compare(name, got, want, exact, tol):
    """One parity record: the largest absolute difference, and whether it passes."""
    got, want = got.detach().cpu(), want.detach().cpu()
    if got.shape != want.shape or got.dtype != want.dtype:
        return {"case": name, "ok": False, "why": f"{tuple(got.shape)} {got.dtype} vs {tuple(want.shape)} {want.dtype}"}
    diff = (got.double() - want.double()).abs().nan_to_num(0.0).max().item() if got.numel() else 0.0
    if exact:
        ok = torch.equal(got, want)
    else:
        ok = torch.allclose(got.double(), want.double(), rtol=tol["rtol"], atol=tol["atol"], equal_nan=True)
    return {"case": name, "ok": bool(ok), "max_abs_diff": diff}


def _pair(fn, device, name, exact, tol):
    """``fn(device)`` with the Triton path on ``device`` against ``fn("cpu")`` on the reference."""
    with ForcedPath("triton"):
        got = fn(device)
    with ForcedPath("ref"):
        want = fn(torch.device("cpu"))
    return [_compare(f"{name} [{i}]", g, w, exact, tol) for i, (g, w) in enumerate(zip(got, want))]


def stage_parity(device, dry):
    from batchkin.kernels import batch_attention as ba
    from batchkin.kernels import batch_mix as bm
    from batchkin.kernels import drloc_pairs as dp
    from batchkin.kernels import reversed_sampler as rs

    from _util import TOL

    records = []
    interp = device.type != "cuda"  # the interpreter truncates float32 -> bfloat16 stores
    g = torch.Generator().manual_seed(0)
    V_B_C_H_W = (5, 2, 7, 9) if dry else (33, 3, 37, 45)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
        for V in (1, 2):
            B, C, H, W = V_B_C_H_W
            x = torch.randn(V, B, C, H, W, generator=g) * 2
            x = (x * 30 + 128).clamp(0, 255).to(torch.uint8) if dtype == torch.uint8 else x.to(dtype)
            op = torch.arange(B) % 3
            lam = torch.rand(B, generator=g)
            boxes = bm.sample_mix_params(B, H, W, generator=g, num_views=V).boxes

            def mix(dev, x=x, op=op, lam=lam, boxes=boxes):
                return bm.batch_mix(x.to(dev), op.to(dev), lam.to(dev), boxes.to(dev))

            exact = not (interp and dtype == torch.bfloat16)
            records += _pair(mix, device, f"batch_mix {dtype} V{V}", exact, TOL[torch.bfloat16])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for p in (0.0, 0.3):
            for B, d in ((7, 16), (37, 64)) if dry else ((67, 32), (257, 64), (130, 256)):
                q, k, v, go = (torch.randn(4, B, d, generator=g).to(dtype) for _ in range(4))

                def attention(dev, q=q, k=k, v=v, go=go, p=p):
                    qkv = [t.to(dev).requires_grad_() for t in (q, k, v)]
                    out = ba.batch_attention(*qkv, dropout_p=p, seed=11)
                    return (out, *torch.autograd.grad(out, qkv, go.to(dev)))

                records += _pair(attention, device, f"batch_attention {dtype} p{p} B{B} d{d}", False, TOL[dtype])
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        B, C, H, W = (3, 8, 5, 7) if dry else (16, 96, 14, 14)
        grid = torch.randn(B, H * W, C, generator=g).to(dtype)  # ViT tokens, used through a permuted view
        weight = (torch.randn(16, 2 * C, generator=g) / (2 * C) ** 0.5).to(dtype)
        bias, go = torch.randn(16, generator=g).to(dtype), torch.randn(B, 8, 16, generator=g).to(dtype)
        ga = torch.randn(B, 8, C, generator=g).to(dtype)

        def pairs(dev, grid=grid, ga=ga):
            tokens = grid.to(dev).requires_grad_()
            gv = tokens.transpose(1, 2).unflatten(2, (H, W))
            e_a, e_b, tgt, pos = dp.drloc_pairs(gv, 8, 1234, mode="signed", normalize=True)
            (dg,) = torch.autograd.grad((e_a * ga.to(dev)).sum() + (e_b * ga.to(dev)).sum(), tokens)
            return e_a, e_b, tgt, pos, dg, dp.drloc_positions(B, 8, H, W, 99, device=dev)

        records += _pair(pairs, device, f"drloc_pairs {dtype}", False, TOL[dtype])
        for strategy in ("gather", "project"):
            def first_layer(dev, grid=grid, strategy=strategy, weight=weight, bias=bias, go=go):
                tokens, w, b = (t.to(dev).requires_grad_() for t in (grid, weight, bias))
                gv = tokens.transpose(1, 2).unflatten(2, (H, W))
                pos = dp.drloc_positions(B, 8, H, W, 7, device=dev)
                out = dp.drloc_first_layer(gv, pos, w, b, strategy=strategy)
                return (out, *torch.autograd.grad(out, (tokens, w, b), go.to(dev)))

            tol = {k: 4 * v for k, v in TOL[dtype].items()}  # sums over 2C products in the grads
            records += _pair(first_layer, device, f"drloc_first_layer {strategy} {dtype}", False, tol)
    labels = torch.repeat_interleave(torch.arange(6), torch.tensor([40, 20, 9, 5, 2, 1]))
    si, counts = rs.class_sorted_table(labels, 6)

    def sampler(dev):
        s = si.to(dev)
        u = (torch.arange(500, dtype=torch.float64) / 500).to(dev)
        return (rs.sample_epoch(s, counts, 5000, seed=3, epoch=2, start=17, stop=4000),
                rs.sample_from_uniforms(s, counts, rs.class_cdf(rs.class_probabilities(counts)).to(dev), u, u.flip(0)))

    records += _pair(sampler, device, "reversed_sampler", True, None)
    failed = [r for r in records if not r["ok"]]
    return {"cases": len(records), "failed": failed, "ok": not failed,
            "worst": sorted(records, key=lambda r: -r.get("max_abs_diff", 0.0))[:5]}


# ------------------------------------------------------------------------------------------ kernels


def stage_mixing(device, dry):
    import peers_kernels as pk

    rows = pk.mixing(device=device, rounds=2 if dry else 9,
                     sizes=((4, 3, 8, 8),) if dry else ((256, 3, 224, 224),))
    for r in rows:
        r["target_copy_fraction"] = 0.8
        r["met"] = r["copy_fraction"] >= 0.8
    return {"rows": rows}


def stage_layer(device, dry, left_s):
    import peers_kernels as pk

    size = ((16, 32),) if dry else ((512, 2048),)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        compiled = size if (not dry and dtype == torch.float32 and left_s() > 240) else ()
        rows += pk.layer(device=device, rounds=2 if dry else 9, sizes=size, compiled_sizes=compiled, dtype=dtype)
    for r in rows:
        r["target_vs_torch"] = 2.0
        r["met"] = r["times"]["torch"]["ratio"] >= 2.0
    return {"rows": rows}


def stage_drloc(device, dry):
    import test_bench_drloc_pairs as bd

    from batchkin.kernels import rng

    from harness import interleave

    grids = ((7, 7), (14, 14), (8, 16))
    sizes = [(8, 32, 7, 7)] if dry else [(256, C, H, W) for (H, W) in grids for C in (192, 384, 768)]
    rows = []
    for size in sizes:
        fns = bd._steps(size, device.type)
        for fn in fns.values():
            fn()
        res = interleave(fns, 2 if dry else 9, baseline="original")
        rows.append({"size": "B{} C{} {}x{}".format(*size), **{f"{k}_ms": round(1e3 * v, 3) for k, v in
                                                               res["median_s"].items()},
                     "ours_vs_original": round(res["median_ratio"]["ours"], 3), "ratios": res["ratios"]["ours"],
                     "met": res["median_ratio"]["ours"] >= 3.0})
    no_sync = "n/a (CPU)"
    if device.type == "cuda":
        B, C, H, W = sizes[0]
        tokens = torch.randn(B, H * W, C, device=device, requires_grad=True)
        linear = torch.nn.Linear(2 * C, bd.HIDDEN).to(device)
        bd._ours_step(tokens, H, W, linear, rng.derive_key(1, 0))  # first use outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out, _ = bd._ours_step(tokens, H, W, linear, rng.derive_key(1, 1))
            torch.autograd.grad(out.sum(), [tokens, linear.weight, linear.bias])
            no_sync = True
        except RuntimeError as exc:
            no_sync = f"host sync: {str(exc).splitlines()[0]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return {"rows": rows, "target": 3.0, "no_host_sync": no_sync}


# ---------------------------------------------------------------------------------------------- e2e


def stage_e2e(device, dry):
    import importlib.util

    import batchkin.report
    from batchkin.config import apply_overrides
    from batchkin.plugin import Plugins
    from batchkin.trainer import fit

    plugins = Plugins()
    rows = []
    # the GPU machine may lack the optional pieces: digits come from scikit-learn (else a synthetic
    # set of the same shape), the report's plots from matplotlib (else no report)
    data = [] if importlib.util.find_spec("sklearn") else [
        "data.name=synthetic", "data.synthetic_classes=10", "data.synthetic_per_class=180",
        "data.synthetic_shape=[1, 8, 8]"]
    no_plots = importlib.util.find_spec("matplotlib") is None
    real_report = batchkin.report.write_report
    if no_plots:
        batchkin.report.write_report = lambda *args, **kwargs: None
    for method, name in E2E_CONFIGS.items():
        raw = tomllib.loads((ROOT / "configs" / name).read_text())
        sets = ["epochs=1", f"device={device.type}", "train.log_every=1000000", *data]
        if dry:
            sets += ["data.train_size=96", "data.batch_size=32", "data.eval_batch_size=256"]
        raw = apply_overrides(copy.deepcopy(raw), sets)
        out = tempfile.mkdtemp(prefix=f"batchkin-gpu-check-{method}-")
        t0 = time.perf_counter()
        try:
            result = fit(raw, out, plugins=plugins, progress=False)
            metrics = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line]
            epoch = next(m for m in metrics if m.get("kind") == "epoch")
            rows.append({"method": method, "config": name, "ok": True, "seconds": round(time.perf_counter() - t0, 2),
                         "images_per_s": round(epoch["images_per_s"], 1), "loss": epoch["loss"],
                         "test_top1": result.final.get("test/top1"), "data": raw["data"]["name"],
                         "report": "skipped (no matplotlib)" if no_plots else "written"})
        except Exception as exc:  # one method's failure is recorded; the others still run
            rows.append({"method": method, "config": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]})
        finally:
            import shutil

            shutil.rmtree(out, ignore_errors=True)
    batchkin.report.write_report = real_report
    return {"rows": rows, "ok": all(r["ok"] for r in rows)}


# -------------------------------------------------------------------------------------------- tests


def stage_tests(device, dry, left_s):
    if dry:
        return {"skipped": "the test suite's CUDA cases need a GPU (CI runs the suite itself)"}
    timeout = max(30, int(left_s()) - 15)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "cuda", "tests/kernels"]
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout)
        tail = (r.stdout + r.stderr).strip().splitlines()[-15:]
        return {"returncode": r.returncode, "tail": tail, "ok": r.returncode == 0, "timeout_s": timeout}
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return {"returncode": None, "tail": out.strip().splitlines()[-15:], "ok": False,
                "timeout_s": timeout, "why": "timed out (time budget)"}


# --------------------------------------------------------------------------------------------- main


def markdown(results: dict) -> str:
    env = results.get("stages", {}).get("env", {}).get("result", {})
    lines = ["### GPU check" + (" (dry run: CPU, Triton interpreter, tiny sizes)" if results["dry"] else ""), "",
             f"Device: {env.get('gpu') or env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}; "
             f"{results['date']}. Command: `{results['command']}`. Peaks: {env.get('peaks')}.", ""]
    for name, st in results["stages"].items():
        head = f"#### {name} ({st['status']}, {st.get('seconds', 0):.1f} s)"
        lines += [head, ""]
        res = st.get("result")
        if res is None:
            lines += ["    " + line for line in (st.get("error") or st.get("why", "")).splitlines()[-20:]]
        elif name == "parity":
            lines += [f"{res['cases']} comparisons, {len(res['failed'])} failed. Largest differences: "
                      + "; ".join(f"{r['case']}: {r.get('max_abs_diff', 0):.3g}" for r in res["worst"]), ""]
            lines += [f"- FAILED {r['case']}: {r}" for r in res["failed"]]
        elif name == "mixing":
            lines += ["| shape | op | dtype | batchkin mix (ms) | fraction of copy | target 0.80 | worst peer |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {'x'.join(map(str, r['shape']))} | {r['operator']} | {r['dtype']} | {r['batchkin_mix_ms']} | "
                      f"{r['copy_fraction']:.2f} | {'met' if r['met'] else 'NOT met'} | {r['worst_peer']} |"
                      for r in res["rows"]]
        elif name == "layer":
            lines += ["| B | C | dtype | batchkin (ms) | torch / batchkin | compile / batchkin | over GEMM floor |",
                      "|---|---|---|---|---|---|---|"]
            for r in res["rows"]:
                t = r["times"]
                comp = f"{t['torch_compile']['ratio']:.2f}x" if "torch_compile" in t else "-"
                lines.append(f"| {r['B']} | {r['C']} | {r['dtype']} | {t['batchkin']['ms']} | "
                             f"{t['torch']['ratio']:.2f}x ({'met' if r['met'] else 'NOT met'}) | {comp} | "
                             f"{r['over_gemm_floor']}x |")
        elif name == "drloc":
            lines += [f"No host sync: {res['no_host_sync']}.", "",
                      "| size | original (ms) | ours (ms) | ours vs original |", "|---|---|---|---|"]
            lines += [f"| {r['size']} | {r['original_ms']} | {r['ours_ms']} | {r['ours_vs_original']:.2f}x "
                      f"({'met' if r['met'] else 'NOT met'}) |" for r in res["rows"]]
        elif name == "e2e":
            lines += ["| method | config | s | images/s | test top1 |", "|---|---|---|---|---|"]
            lines += [f"| {r['method']} | {r['config']} | {r.get('seconds', '-')} | {r.get('images_per_s', '-')} | "
                      f"{r.get('test_top1', r.get('error', '-'))} |" for r in res["rows"]]
        elif name == "tests":
            lines += ["    " + line for line in res.get("tail", [res.get("skipped", "")])]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="CPU, Triton interpreter, tiny sizes (CI)")
    ap.add_argument("--out", help="results folder (default bench/results/<device>/)")
    ap.add_argument("--budget-s", type=float, default=420.0, help="the whole run's time budget in seconds")
    ap.add_argument("--stages", default=",".join(STAGE_MIN_S), help="comma-separated subset of the stages")
    args = ap.parse_args(argv)
    chosen = [s for s in args.stages.split(",") if s]
    bad = [s for s in chosen if s not in STAGE_MIN_S]
    if bad:
        ap.error(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGE_MIN_S)}")
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --dry for the CPU dry run", file=sys.stderr)
        return 2
    from harness import device_name

    device = torch.device("cpu" if args.dry else "cuda")
    torch.set_num_threads(1 if args.dry else torch.get_num_threads())
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / device_name(device.type)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def left_s():
        return args.budget_s - (time.perf_counter() - start)

    results = {"dry": args.dry, "date": time.strftime("%Y-%m-%d %H:%M"), "budget_s": args.budget_s,
               "command": "bench/gpu_check.sh " + " ".join(argv if argv is not None else sys.argv[1:]), "stages": {}}
    stages = {"env": lambda: stage_env(device, args.dry), "parity": lambda: stage_parity(device, args.dry),
              "mixing": lambda: stage_mixing(device, args.dry), "layer": lambda: stage_layer(device, args.dry, left_s),
              "drloc": lambda: stage_drloc(device, args.dry), "e2e": lambda: stage_e2e(device, args.dry),
              "tests": lambda: stage_tests(device, args.dry, left_s)}
    failed = False
    for name in chosen:
        t0 = time.perf_counter()
        if not args.dry and left_s() < STAGE_MIN_S[name]:
            results["stages"][name] = {"status": "skipped", "why": f"{left_s():.0f} s left of the budget"}
        else:
            try:
                res = stages[name]()
                ok = res.get("ok", True) if isinstance(res, dict) else True
                results["stages"][name] = {"status": "done" if ok else "failed", "result": res}
                failed |= not ok
            except Exception as exc:
                results["stages"][name] = {"status": "error", "error": "".join(
                    traceback.format_exception_only(type(exc), exc)).strip() + "\n" + traceback.format_exc()[-3000:]}
                failed = True
        results["stages"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))  # flushed stage by stage
        (out / "gpu_check.md").write_text(markdown(results))
        print(f"gpu_check: {name}: {results['stages'][name]['status']} in {results['stages'][name]['seconds']} s "
              f"({left_s():.0f} s of the budget left)", file=sys.stderr, flush=True)
    print(f"gpu_check: results in {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
