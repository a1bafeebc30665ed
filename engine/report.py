"""The run report: a Markdown table and PNG plots (curves, per-class accuracy).

Every file is written like a checkpoint (:func:`batchkin.rundir.atomic_write_bytes`):
rendered in memory, written to a temporary file, fsynced and renamed, so a full disk
leaves the previous version (or nothing), never a truncated or empty PNG.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from .rundir import RunDir, atomic_write_bytes, atomic_write_text


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def write_report(run_path: str | Path) -> Path:
    """Write report.md, curves.png and per_class.png from the run's metrics.jsonl."""
    run = RunDir(run_path)
    records = run.read_metrics()
    epochs = [r for r in records if r.get("kind") == "epoch"]
    final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
    info = json.loads((run.path / "run.json").read_text()) if (run.path / "run.json").exists() else {}
    lines = [f"# batchkin run `{run.path.name}`", ""]
    if info:
        lines += [f"methods: {' -> '.join(info.get('methods', []))}; seed {info.get('seed')}; device {info.get('device')}; "
                  f"torch {info.get('torch')}", ""]
    if final:
        lines += ["## Test (final weights)", "", "| top-1 | balanced | many | medium | few |", "|---|---|---|---|---|",
                  "| " + " | ".join(_pct(final.get(f"test/{k}")) for k in
                                   ("top1", "balanced_acc", "many_acc", "medium_acc", "few_acc")) + " |", "",
                  f"Many/medium/few groups: {final.get('test/shot_split')} split of the training class sizes. "
                  f"Best validation epoch: {final.get('best_val_epoch')}.", ""]
    lines += ["## Epochs", "", "| epoch | loss | lr | val top-1 | val balanced | img/s |", "|---|---|---|---|---|---|"]
    for r in epochs:
        lines.append(f"| {r['epoch']} | {r['loss']:.4f} | {r['lr']:.4g} | {_pct(r.get('val/top1'))} | "
                     f"{_pct(r.get('val/balanced_acc'))} | {r.get('images_per_s', 0):.0f} |")
    lines.append("")
    plots = _plots(run.path, epochs, final)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = run.path / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _plots(folder: Path, epochs: list, final: dict | None) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report still has its table
        return []
    out = []
    if epochs:
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        xs = [r["epoch"] for r in epochs]
        ax[0].plot(xs, [r["loss"] for r in epochs], marker="o")
        ax[0].set(xlabel="epoch", ylabel="training loss")
        val = [(r["epoch"], r["val/top1"]) for r in epochs if "val/top1" in r]
        if val:
            ax[1].plot(*zip(*[(e, 100 * v) for e, v in val]), marker="o", label="top-1")
            ax[1].plot(*zip(*[(r["epoch"], 100 * r["val/balanced_acc"]) for r in epochs if "val/top1" in r]),
                       marker="s", label="balanced")
            ax[1].legend()
        ax[1].set(xlabel="epoch", ylabel="validation accuracy (%)")
        fig.tight_layout()
        out.append(_save_png(fig, folder / "curves.png"))
    if final and final.get("test/per_class"):
        per = [100 * (v or 0) for v in final["test/per_class"]]
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(per)), 3))
        ax.bar(range(len(per)), per)
        ax.set(xlabel="class", ylabel="test accuracy (%)", ylim=(0, 100))
        fig.tight_layout()
        out.append(_save_png(fig, folder / "per_class.png"))
    return out


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
