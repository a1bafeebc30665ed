"""Accuracy benchmark: MoCo v3 vs MoCo v3 + SDMP, kNN and linear-probe accuracy, several seeds.

For every dataset (digits, Fashion-MNIST) and seed it trains ``configs/moco_<data>.toml`` and
``configs/sdmp_<data>.toml`` (the same encoder, schedule, data and seed; SDMP only adds its
mixing and losses), then measures on the test split

* kNN top-1 (k = 20, cosine, weights exp(sim / 0.07), bank = the training split): the
  engine's final ``test/top1`` of an SSL run;
* linear-probe top-1: :func:`batchkin.plugins.ssl.linear_probe` on frozen features
  (100 epochs, SGD, lr 0.1, batch 256, seed 0);

and, for context, both metrics of the same encoder at its random initialisation (no
training). "time / run" is the wall-clock time of one run: training, its evaluations and
the linear probe (for the random rows: the kNN evaluation and the probe). Runs go to ``--runs`` (default ``runs/accuracy_sdmp``, one folder per run, a
``result.json`` in each; finished runs are skipped when the script is started again), the
table (mean ± sample std over seeds) is printed and, with ``--write``, written into
``docs/results/sdmp.md`` between its ``<!-- table -->`` markers.

    python bench/accuracy_sdmp.py                                  # digits + fashion_mnist, seeds 0 1 2
    python bench/accuracy_sdmp.py --datasets digits --epochs digits=15 --workers 2 --write

Each worker process uses one torch thread (several threads per process are much slower
on a shared two-core machine).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("moco", "sdmp")
LABELS = {"random": "random init (no training)", "moco": "MoCo v3", "sdmp": "MoCo v3 + SDMP"}
PROBE = {"epochs": 100, "lr": 0.1, "batch_size": 256, "seed": 0}


def _plugins():
    from batchkin.plugin import Plugins
    from batchkin.plugins import dino, moco, sdmp

    return Plugins(extra_modules=[moco, dino, sdmp])


def _raw(dataset: str, method: str, seed: int, epochs: int | None) -> dict:
    from batchkin.config import apply_overrides, load_raw

    name = "moco" if method == "random" else method
    sets = [f"seed={seed}"] + ([f"epochs={epochs}"] if epochs else [])
    return apply_overrides(load_raw(ROOT / "configs" / f"{name}_{dataset}.toml"), sets)


def run_one(job: dict) -> dict:
    """Train (or not, for ``random``) one run and measure kNN and probe accuracy."""
    import torch

    torch.set_num_threads(1)
    from batchkin.data import DeviceData
    from batchkin.plugins.ssl import linear_probe, probe_state
    from batchkin.trainer import evaluate, fit, prepare

    out = Path(job["out"])
    result_file = out / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    raw = _raw(job["dataset"], job["method"], job["seed"], job["epochs"])
    t0 = time.perf_counter()
    if job["method"] == "random":
        with torch.random.fork_rng(devices=[]):
            state = prepare(raw, _plugins())
            knn = evaluate(state, "test", DeviceData(state.splits.test, state.splits, state.device))
            probe = probe_state(state, **PROBE)
        out.mkdir(parents=True, exist_ok=True)
        train_s = 0.0
    else:
        res = fit(raw, out, overwrite=True, plugins=_plugins(), progress=False)
        train_s = time.perf_counter() - t0
        knn = {k.removeprefix("test/"): v for k, v in res.final.items() if k.startswith("test/")}
        probe = linear_probe(out, plugins=_plugins(), **PROBE)
    result = {**{k: job[k] for k in ("dataset", "method", "seed")}, "epochs": raw.get("epochs"),
              "knn_top1": knn["top1"], "knn_balanced": knn["balanced_acc"],
              "probe_top1": probe["top1"], "probe_balanced": probe["balanced_acc"],
              "train_seconds": round(train_s, 1), "total_seconds": round(time.perf_counter() - t0, 1)}
    result_file.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _fmt(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def table(results: list[dict], datasets: list[str]) -> str:
    lines = ["| dataset | method | epochs | seeds | kNN top-1 (%) | linear probe top-1 (%) | time / run (s) |",
             "|---|---|---|---|---|---|---|"]
    for ds in datasets:
        for method in ("random", *METHODS):
            rs = sorted((r for r in results if r["dataset"] == ds and r["method"] == method), key=lambda r: r["seed"])
            if not rs:
                continue
            epochs = "0" if method == "random" else str(rs[0]["epochs"])
            secs = f"{statistics.mean(r['total_seconds'] for r in rs):.0f}"
            lines.append(f"| {ds} | {LABELS[method]} | {epochs} | {','.join(str(r['seed']) for r in rs)} | "
                         f"{_fmt([r['knn_top1'] for r in rs])} | {_fmt([r['probe_top1'] for r in rs])} | {secs} |")
    return "\n".join(lines)


def per_seed(results: list[dict], datasets: list[str]) -> str:
    lines = ["| dataset | seed | MoCo v3 kNN | + SDMP kNN | MoCo v3 probe | + SDMP probe |", "|---|---|---|---|---|---|"]
    for ds in datasets:
        seeds = sorted({r["seed"] for r in results if r["dataset"] == ds})
        for s in seeds:
            get = {r["method"]: r for r in results if r["dataset"] == ds and r["seed"] == s}
            if not all(m in get for m in METHODS):
                continue
            lines.append(f"| {ds} | {s} | {100 * get['moco']['knn_top1']:.2f} | {100 * get['sdmp']['knn_top1']:.2f} | "
                         f"{100 * get['moco']['probe_top1']:.2f} | {100 * get['sdmp']['probe_top1']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", nargs="+", default=["digits", "fashion_mnist"], choices=["digits", "fashion_mnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", nargs="*", default=[], metavar="DATASET=N",
                   help="override a dataset's epochs (default: the config's)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", default="runs/accuracy_sdmp")
    p.add_argument("--no-random", action="store_true", help="skip the random-initialisation rows")
    p.add_argument("--write", action="store_true", help="write the tables into docs/results/sdmp.md")
    args = p.parse_args(argv)
    epochs = {}
    for item in args.epochs:
        ds, _, n = item.partition("=")
        epochs[ds] = int(n)
    jobs = []
    for ds in args.datasets:
        for seed in args.seeds:
            for method in ((() if args.no_random else ("random",)) + METHODS):
                jobs.append({"dataset": ds, "method": method, "seed": seed, "epochs": epochs.get(ds),
                             "out": str(Path(args.runs) / f"{ds}-{method}-s{seed}")})
    # the long SDMP runs first, so that the two workers finish together
    order = {"sdmp": 0, "moco": 1, "random": 2}
    jobs.sort(key=lambda j: (args.datasets.index(j["dataset"]), order[j["method"]], j["seed"]))
    t0 = time.perf_counter()
    results = []
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=get_context("spawn")) as pool:
        for r in pool.map(run_one, jobs):
            results.append(r)
            print(f"[{time.perf_counter() - t0:7.1f}s] {r['dataset']:>13} {r['method']:>6} seed {r['seed']}: "
                  f"kNN {100 * r['knn_top1']:.2f}%  probe {100 * r['probe_top1']:.2f}%  ({r['total_seconds']} s)",
                  flush=True)
    wall = time.perf_counter() - t0
    text = table(results, args.datasets)
    seeds = per_seed(results, args.datasets)
    print(text)
    print()
    print(seeds)
    print(f"\nwall time {wall:.0f} s with {args.workers} worker(s)")
    (Path(args.runs) / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        doc = ROOT / "docs" / "results" / "sdmp.md"
        body = doc.read_text()
        block = f"<!-- table -->\n{text}\n\nPer seed (test top-1, %):\n\n{seeds}\n\n" \
                f"Wall time of this benchmark: {wall / 60:.1f} min with {args.workers} worker process(es).\n<!-- /table -->"
        body = re.sub(r"<!-- table -->.*?<!-- /table -->", lambda _: block, body, flags=re.S)
        doc.write_text(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
