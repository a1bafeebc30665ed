"""Accuracy benchmark: the small vision transformer from scratch on small data, with and without DRLoc, 3 seeds.

For each dataset three runs share everything but the method (data, subset, model,
optimizer, schedule, epochs, seeds):

* ``ce``: the baseline (cross-entropy only);
* ``ce + drloc (l1)``: plus DRLoc with the l1 regression head;
* ``ce + drloc (ce)``: plus DRLoc with the classification (bins) head.

Datasets: scikit-learn's digits (configs/vit_digits.toml and configs/drloc_digits.toml as
written) and Fashion-MNIST subsets of 1,000 and 5,000 training images
(configs/drloc_fashion_mnist.toml; the baseline is the same file with ``methods=["ce"]``;
the 5,000-image subset trains ``FASHION_5K_EPOCHS`` epochs to fit a CPU budget).

Each run is a normal run folder (metrics.jsonl, checkpoints, report) under ``--out``;
finished runs found there are reused unless ``--overwrite``, so several invocations with
``--only`` can run side by side and a last invocation without it writes the whole table.
The table (mean ± sample standard deviation over the seeds of the final test top-1 and
class-balanced accuracy) goes to docs/results/drloc.md.

    python bench/accuracy_drloc.py                       # everything, 1 torch thread
    python bench/accuracy_drloc.py --only digits --seeds 0 1 2
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FASHION_5K_EPOCHS = 2
BASELINE = ['methods=["ce"]']
CE_HEAD = ["drloc.head=ce"]
METHODS = (("ce", "ce (baseline)"), ("drloc_l1", "ce + drloc (l1)"), ("drloc_ce", "ce + drloc (ce)"))


def experiments() -> list[dict]:
    fm = "configs/drloc_fashion_mnist.toml"
    k5 = ["data.train_size=5000", f"epochs={FASHION_5K_EPOCHS}"]
    return [
        {"key": "digits", "title": "digits (1,295 training images, 8x8, 10 classes)",
         "runs": {"ce": ("configs/vit_digits.toml", []),
                  "drloc_l1": ("configs/drloc_digits.toml", []),
                  "drloc_ce": ("configs/drloc_digits.toml", CE_HEAD)}},
        {"key": "fashion1k", "title": "Fashion-MNIST, 1,000 training images",
         "runs": {"ce": (fm, BASELINE), "drloc_l1": (fm, []), "drloc_ce": (fm, CE_HEAD)}},
        {"key": "fashion5k", "title": "Fashion-MNIST, 5,000 training images",
         "runs": {"ce": (fm, k5 + BASELINE), "drloc_l1": (fm, k5), "drloc_ce": (fm, k5 + CE_HEAD)}},
    ]


def plugins():
    """The plugin set with ``drloc`` (a built-in once registered; loaded as a module until then)."""
    from batchkin.plugin import Plugins

    p = Plugins()
    if "drloc" in p.registry.methods:
        return p
    import batchkin.plugins.drloc as drloc

    return Plugins(extra_modules=[drloc])


def read_lines(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def final_line(run: Path) -> dict | None:
    lines = read_lines(run)
    return lines[-1] if lines and lines[-1].get("kind") == "final" else None


def run_one(config: str, overrides: list[str], seed: int, out: Path, overwrite: bool) -> tuple[dict, float | None]:
    from batchkin.config import apply_overrides, load_raw
    from batchkin.trainer import fit

    done = final_line(out)
    if done is not None and not overwrite:
        timing = out / "bench_wall_s.json"
        return done, json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
    raw = apply_overrides(load_raw(ROOT / config), [*overrides, f"seed={seed}"])
    t0 = time.perf_counter()
    result = fit(raw, out, overwrite=True, progress=False, plugins=plugins())
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


def describe(run: Path) -> str:
    """Training images, epochs and steps of a finished run (from its folder)."""
    import tomllib

    cfg = tomllib.loads((run / "config.toml").read_text())
    epochs = [r for r in read_lines(run) if r.get("kind") == "epoch"]
    steps = epochs[-1]["step"] if epochs else 0
    m = cfg["model"]
    return (f"model vit dim {m['dim']}, depth {m['depth']}, heads {m['heads']}, patch {m['patch']}; "
            f"{cfg['epochs']} epochs, {steps} steps of batch {cfg['data']['batch_size']}, "
            f"AdamW lr {cfg['optim']['lr']}, cosine")


def write_markdown(path: Path, exps, seeds, out: Path, finals: dict, times: dict, command: str, threads: int,
                   note: str = "") -> None:
    import tomllib

    lines = [
        "# DRLoc: the small vision transformer from scratch on small data",
        "",
        "Written by `bench/accuracy_drloc.py`. Final test-split accuracy (the test split is never used",
        "to select a checkpoint: these are the last epoch's weights), in %, mean ± sample standard",
        f"deviation over seeds {', '.join(map(str, seeds))}. In each column the three runs share the data,",
        "subset, model, optimizer, schedule, epochs and seeds; only the method differs.",
        "",
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "## Top-1 (balanced accuracy in brackets)",
        "",
        "| method | " + " | ".join(e["title"] for e in exps) + " |",
        "|---|" + "---|" * len(exps),
    ]
    for method, label in METHODS:
        cells = []
        for exp in exps:
            rows = [finals.get((exp["key"], method, s)) for s in seeds]
            rows = [r for r in rows if r]
            top1 = fmt(*mean_std([r["test/top1"] for r in rows]))
            bal = fmt(*mean_std([r["test/balanced_acc"] for r in rows]))
            cells.append(f"{top1} ({bal})" if rows else "n/a")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Difference of the mean top-1 from the baseline, against the baseline's spread over seeds:", ""]
    for exp in exps:
        base = mean_std([r["test/top1"] for s in seeds if (r := finals.get((exp["key"], "ce", s)))])
        diffs = []
        for method, label in METHODS[1:]:
            m, _ = mean_std([r["test/top1"] for s in seeds if (r := finals.get((exp["key"], method, s)))])
            diffs.append(f"{label.removeprefix('ce + ')} {100 * (m - base[0]):+.2f}")
        lines.append(f"- {exp['title']}: {', '.join(diffs)} points (baseline std {100 * base[1]:.2f})")
    lines.append("")
    for exp in exps:
        lines += [f"## {exp['title']}", ""]
        for method, label in METHODS:
            config, overrides = exp["runs"][method]
            extra = " with " + " ".join(f"`--set {shlex.quote(o)}`" for o in overrides) if overrides else ""
            lines.append(f"- {label}: `{config}`{extra}")
        first = out / exp["key"] / "drloc_l1" / f"seed{seeds[0]}"
        if (first / "config.toml").is_file():
            lines.append(f"- {describe(first)}")
            d = tomllib.loads((first / "config.toml").read_text())["drloc"]
            lines.append(f"- drloc: m {d['m']} pairs per image, hidden {d['hidden']}, mode {d['mode']}, "
                         f"lambda0 {d['lambda0']}, {d['schedule']} with {d['warmup_epochs']} warm-up epoch(s)")
        lines += ["", "Per seed, test top-1 (wall seconds of the run):", ""]
        for method, label in METHODS:
            parts = []
            for s in seeds:
                r = finals.get((exp["key"], method, s))
                if r:
                    t = times.get((exp["key"], method, s))
                    parts.append(f"seed {s}: {100 * r['test/top1']:.2f}" + (f" ({t:.0f} s)" if t is not None else ""))
            lines.append(f"- {label}: " + "; ".join(parts))
        lines.append("")
    lines += [
        "## One run by hand",
        "",
        "```bash",
        "OMP_NUM_THREADS=1 batchkin train configs/vit_digits.toml --set seed=1                       # baseline",
        "OMP_NUM_THREADS=1 batchkin train configs/drloc_digits.toml --set seed=1                     # + drloc (l1)",
        "OMP_NUM_THREADS=1 batchkin train configs/drloc_digits.toml --set seed=1 --set drloc.head=ce  # + drloc (ce)",
        "OMP_NUM_THREADS=1 batchkin train configs/drloc_fashion_mnist.toml --set data.train_size=5000 "
        f"--set epochs={FASHION_5K_EPOCHS}",
        "```",
        "",
        "(Until `drloc` is a built-in, add `--plugin plugins/drloc.py`.)",
        "",
        "## Setting",
        "",
        f"- machine: {platform.machine()} CPU shared with other jobs, {threads} torch thread(s) per run; "
        f"python {platform.python_version()}, torch {_torch_version()};",
        "- budget: a tiny ViT (two blocks of width 32) and a few epochs, so that all 27 runs fit in about",
        "  25 minutes of a shared two-core CPU. These runs are far from converged and short for an",
        "  auxiliary loss whose published gains come from 100+ epochs; the numbers compare the methods",
        "  under one small budget and are not comparable with the paper's Swin-T / CIFAR numbers;",
        "- wall times are those of a loaded machine and only indicate cost;",
        f"- run folders (metrics.jsonl with every epoch, checkpoints, report.md): `{out}`.",
    ]
    if note:
        lines.append(f"- {note}")
    lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", choices=[e["key"] for e in experiments()], action="append",
                    help="run only these datasets")
    ap.add_argument("--out", default="/tmp/drloc_accuracy", help="folder of the run folders")
    ap.add_argument("--doc", default=str(ROOT / "docs/results/drloc.md"), help="markdown file to write")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--overwrite", action="store_true", help="re-run finished runs instead of reusing them")
    ap.add_argument("--note", default="", help="a line added to the Setting section (e.g. how the runs were split)")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    exps = [e for e in experiments() if not args.only or e["key"] in args.only]
    finals, times = {}, {}
    for exp in exps:
        for seed in args.seeds:
            for method, _ in METHODS:
                config, overrides = exp["runs"][method]
                run = out / exp["key"] / method / f"seed{seed}"
                final, took = run_one(config, overrides, seed, run, args.overwrite)
                finals[(exp["key"], method, seed)] = final
                if took is not None:
                    times[(exp["key"], method, seed)] = took
                msg = f"{exp['key']} {method} seed {seed}: top1 {100 * final['test/top1']:.2f}%"
                print(msg + (f" ({took:.0f} s)" if took is not None else ""), flush=True)
    given = argv if argv is not None else sys.argv[1:]
    cmd = "python bench/accuracy_drloc.py" + "".join(f" {shlex.quote(a)}" for a in given)
    write_markdown(Path(args.doc), exps, args.seeds, out, finals, times, cmd, args.threads, args.note)
    print(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
