"""Accuracy benchmark: BatchFormer on long-tailed data — ``ce`` vs ``ce + batchformer`` and
``bbn`` vs ``bbn + batchformer``, 3 seeds, the same budget.

For each dataset the four runs share everything but the method (data, long-tailed
subset, backbone, schedule, epochs, seeds):

* digits-LT (imbalance factor 10): configs/ce_digits_lt.toml, configs/batchformer_digits.toml,
  configs/bbn_digits.toml and configs/bbn_digits.toml with ``methods = ["bbn", "batchformer"]``
  (BatchFormer's default options), as written;
* Fashion-MNIST-LT (imbalance factor 100): configs/fashion_mnist_lt.toml,
  configs/batchformer_fashion_mnist_lt.toml, configs/bbn_fashion_mnist_lt.toml and the
  latter with ``methods = ["bbn", "batchformer"]``, all with the same CPU budget overrides
  (``FASHION_BUDGET``: ResNet-8 of width 8, a 3000-image class-proportional subset of the
  long-tailed training set, 4 epochs; ``--full`` runs the configs as written: ResNet-32,
  the whole long-tailed set, 30 epochs).

Each run is a normal run folder (metrics.jsonl, checkpoints, report) under ``--out``;
finished runs found there are reused unless ``--overwrite`` (baselines are always run
here, never taken from another benchmark's folder: an identical config does not mean
identical code). The script writes the table (mean ± sample standard deviation over the seeds of the final
test metrics: top-1, class-balanced, many / medium / few) to docs/results/batchformer.md.

    python bench/accuracy_batchformer.py                      # everything, 1 torch thread
    python bench/accuracy_batchformer.py --only digits --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Overrides that fit Fashion-MNIST-LT into a shared two-core CPU's budget (applied to every
#: method alike): ResNet-8 of width 8, a class-proportional 3000-image subset of the IF-100
#: training set (so still IF ~100), batch 64, 4 epochs, validation only at the end.
FASHION_BUDGET = [
    "model.name=resnet8", "model.width=8", "epochs=4", "data.train_size=3000", "data.batch_size=64",
    "schedule.name=cosine", "schedule.milestones=[]", "schedule.warmup_epochs=0.5", "train.eval_every=4",
]
WITH_BBN = 'methods=["bbn","batchformer"]'

METRICS = (("top1", "top-1"), ("balanced_acc", "balanced"), ("many_acc", "many"), ("medium_acc", "medium"),
           ("few_acc", "few"))


def experiments(full: bool) -> list[dict]:
    fashion = [] if full else FASHION_BUDGET
    return [
        {"key": "digits", "title": "digits-LT (imbalance factor 10)",
         "runs": {"ce": ("configs/ce_digits_lt.toml", []),
                  "ce+batchformer": ("configs/batchformer_digits.toml", []),
                  "bbn": ("configs/bbn_digits.toml", []),
                  "bbn+batchformer": ("configs/bbn_digits.toml", [WITH_BBN])}},
        {"key": "fashion", "title": "Fashion-MNIST-LT (imbalance factor 100)",
         "runs": {"ce": ("configs/fashion_mnist_lt.toml", fashion),
                  "ce+batchformer": ("configs/batchformer_fashion_mnist_lt.toml", fashion),
                  "bbn": ("configs/bbn_fashion_mnist_lt.toml", fashion),
                  "bbn+batchformer": ("configs/bbn_fashion_mnist_lt.toml", [*fashion, WITH_BBN])}},
    ]


def plugins():
    """The plugin set with ``bbn`` and ``batchformer`` (built-ins once registered; modules until then)."""
    from batchkin.plugin import Plugins

    p = Plugins()
    missing = [n for n in ("bbn", "batchformer") if n not in p.registry.methods]
    if not missing:
        return p
    import importlib

    return Plugins(extra_modules=[importlib.import_module(f"batchkin.plugins.{n}") for n in missing])


def raw_config(config: str, overrides: list[str], seed: int) -> dict:
    from batchkin.config import apply_overrides, load_raw

    return apply_overrides(load_raw(ROOT / config), [*overrides, f"seed={seed}"])


def final_line(run: Path) -> dict | None:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return lines[-1] if lines and lines[-1].get("kind") == "final" else None


def run_one(raw: dict, out: Path, overwrite: bool, p) -> tuple[dict, float | None]:
    from batchkin.trainer import fit

    done = final_line(out)
    if done is not None and not overwrite:
        timing = out / "bench_wall_s.json"
        return done, json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
    t0 = time.perf_counter()
    result = fit(raw, out, overwrite=True, progress=False, plugins=p)
    took = time.perf_counter() - t0
    (out / "bench_wall_s.json").write_text(json.dumps({"wall_s": took}))
    return result.final, took


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def fmt(m: float, s: float) -> str:
    return "n/a" if m != m else f"{100 * m:.2f} ± {100 * s:.2f}"


def class_counts(run: Path, p) -> str:
    """The training class sizes, from the run's config (no training)."""
    from batchkin.config import build_config
    from batchkin.data import make_splits

    raw = tomllib.loads((run / "config.toml").read_text())
    cfg = build_config(raw, p.registry.methods)
    splits = make_splits(p.dataset(cfg.data.name).obj(cfg.data), cfg.data)
    return ", ".join(str(int(c)) for c in splits.train_counts())


def write_markdown(path: Path, exps, seeds, out: Path, finals: dict, times: dict, command: str,
                   threads: int, full: bool, p) -> None:
    lines = [
        "# BatchFormer on long-tailed data",
        "",
        "Written by `bench/accuracy_batchformer.py`. Final test-split metrics (the test split is never",
        "used to select a checkpoint: these are the last epoch's weights), in %, mean ± sample standard",
        f"deviation over seeds {', '.join(map(str, seeds))}. In each dataset the four runs share the data,",
        "long-tailed subset, backbone, schedule, epochs and seeds; only the method differs. BatchFormer",
        "uses its defaults (1 layer, 4 heads, FFN = C, dropout 0.5, shared classifier, local batch); with",
        "BBN it acts on BBN's combined features (see plugins/batchformer.py).",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    for exp in exps:
        lines += [f"## {exp['title']}", ""]
        for method, (config, overrides) in exp["runs"].items():
            extra = " with " + " ".join(f"`--set {o}`" for o in overrides) if overrides else ""
            lines.append(f"- `{method}`: `{config}`{extra}")
        first = out / exp["key"] / "ce+batchformer" / f"seed{seeds[0]}"
        if (first / "config.toml").is_file():
            lines.append(f"- training images per class: {class_counts(first, p)}")
        split = {finals.get((exp["key"], m, s), {}).get("test/shot_split") for m in exp["runs"] for s in seeds} - {None}
        if split:
            lines.append(f"- many / medium / few groups: {', '.join(sorted(split))} "
                         "(absolute: >100 / 20-100 / <20 training images; relative: terciles of the class sizes)")
        lines += ["", "| method | " + " | ".join(name for _, name in METRICS) + " | wall s / run |",
                  "|---|" + "---|" * (len(METRICS) + 1)]
        for method in exp["runs"]:
            rows = [finals.get((exp["key"], method, s)) for s in seeds]
            cells = [fmt(*mean_std([r[f"test/{key}"] for r in rows if r])) for key, _ in METRICS]
            ts = [t for t in (times.get((exp["key"], method, s)) for s in seeds) if t is not None]
            wall = f"{sum(ts) / len(ts):.0f}" if ts else "n/a"
            n = sum(r is not None for r in rows)
            name = method if n == len(seeds) else f"{method} ({n} of {len(seeds)} seeds)"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {wall} |")
        lines += ["", "Paired by seed, with batchformer minus without (top-1 / balanced, points):", ""]
        for base in ("ce", "bbn"):
            pairs = [(finals.get((exp["key"], base, s)), finals.get((exp["key"], f"{base}+batchformer", s)))
                     for s in seeds]
            pairs = [(a, b) for a, b in pairs if a and b]
            if pairs:
                d1 = [b["test/top1"] - a["test/top1"] for a, b in pairs]
                d2 = [b["test/balanced_acc"] - a["test/balanced_acc"] for a, b in pairs]
                per = ", ".join(f"{100 * d:+.2f}" for d in d1)
                lines.append(f"- `{base}+batchformer` − `{base}`: top-1 {fmt(*mean_std(d1))} "
                             f"(per seed {per}); balanced {fmt(*mean_std(d2))}")
        lines += ["", "Per seed (top-1 / balanced / many / medium / few):", ""]
        for method in exp["runs"]:
            for s in seeds:
                r = finals.get((exp["key"], method, s))
                if r:
                    vals = " / ".join("n/a" if r[f"test/{k}"] != r[f"test/{k}"] else f"{100 * r[f'test/{k}']:.2f}"
                                      for k, _ in METRICS)
                    lines.append(f"- {method} seed {s}: {vals}")
        lines.append("")
    lines += [
        "## One run by hand",
        "",
        "```bash",
        "OMP_NUM_THREADS=1 batchkin train configs/batchformer_digits.toml --set seed=1                 # ce + batchformer",
        "OMP_NUM_THREADS=1 batchkin train configs/ce_digits_lt.toml --set seed=1                      # its baseline",
        "OMP_NUM_THREADS=1 batchkin train configs/bbn_digits.toml --set 'methods=[\"bbn\",\"batchformer\"]'  # bbn + batchformer",
        "OMP_NUM_THREADS=1 batchkin train configs/batchformer_fashion_mnist_lt.toml"
        + "".join(f" --set {o}" for o in FASHION_BUDGET),
        "```",
        "",
        "",
    ]
    budget = ("the configs as written" if full else
              "Fashion-MNIST-LT with the CPU budget overrides above (ResNet-8 of width 8, a class-proportional "
              "3000-image subset of the IF-100 training set, batch 64, 4 epochs: far from converged, so the "
              "numbers compare the methods under one budget; they are comparable neither with "
              "docs/results/bbn.md's Fashion-MNIST budget nor with the papers' numbers)")
    lines += [
        "## Setting",
        "",
        f"- machine: {platform.machine()} CPU, {threads} torch thread(s) per run, runs one after another "
        f"(on a shared, loaded machine: wall times are indicative only); python {platform.python_version()}, "
        f"torch {_torch_version()};",
        f"- budget: {budget};",
        f"- run folders (metrics.jsonl with every epoch, checkpoints, report.md): `{out}`.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=["digits", "fashion"], action="append", help="run only these datasets")
    ap.add_argument("--methods", nargs="+", choices=["ce", "ce+batchformer", "bbn", "bbn+batchformer"],
                    help="run only these methods (the table still lists every finished run found)")
    ap.add_argument("--out", default="/tmp/batchformer_accuracy", help="folder of the run folders")
    ap.add_argument("--doc", default=str(ROOT / "docs/results/batchformer.md"), help="markdown file to write")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--full", action="store_true", help="Fashion-MNIST-LT without the CPU budget overrides")
    ap.add_argument("--overwrite", action="store_true", help="re-run finished runs instead of reusing them")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    p = plugins()
    out = Path(args.out)
    exps = [e for e in experiments(args.full) if not args.only or e["key"] in args.only]
    finals, times = {}, {}
    for exp in exps:
        for seed in args.seeds:
            for method, (config, overrides) in exp["runs"].items():
                run = out / exp["key"] / method / f"seed{seed}"
                if args.methods and method not in args.methods:
                    done = final_line(run)  # listed in the table when finished earlier
                    if done is not None:
                        finals[(exp["key"], method, seed)] = done
                    continue
                final, took = run_one(raw_config(config, overrides, seed), run, args.overwrite, p)
                finals[(exp["key"], method, seed)] = final
                if took is not None:
                    times[(exp["key"], method, seed)] = took
                msg = f"{exp['key']} {method} seed {seed}: top1 {100 * final['test/top1']:.2f}%"
                print(msg + (f" ({took:.0f} s)" if took is not None else ""), flush=True)
    given = argv if argv is not None else sys.argv[1:]
    cmd = "python bench/accuracy_batchformer.py" + "".join(f" {shlex.quote(a)}" for a in given)
    write_markdown(Path(args.doc), exps, args.seeds, out, finals, times, cmd, args.threads, args.full, p)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
