"""The run report: report.md with its plots, the run's classes (classes.json) and the final line.

At the end of a run, and after ``--until``, the trainer writes classes.json (:func:`class_info`:
class names, training counts, many / medium / few groups, what evaluation measures) and the
report. :func:`write_report` reads the run folder — metrics.jsonl, run.json, config.toml,
classes.json and, when ``batchkin probe`` has run, probe.json — and writes:

* ``report.md``: the test metrics (or, for a run stopped by ``--until``, a *partial* report
  that says so and shows the latest validation instead), the linear probe, one row per
  epoch (training loss, validation loss, learning rate, validation accuracies) and, for up
  to :data:`CLASS_TABLE_MAX` classes, one row per class in frequency order;
* ``curves.png``: training loss and validation loss in one panel, learning rate,
  validation accuracy and, on long-tailed data, many / medium / few per epoch; below them
  every other number a method logs per epoch (BBN's ``bbn/alpha``, DRLoc's ``drloc/lambda``,
  the SSL bases' momentum, DINO's teacher temperature, ...), one panel a key, a row per
  prefix (the part before ``/``): a BBN run's rising loss shows above the α schedule that
  causes it;
* ``per_class.png``: per-class accuracy in frequency order with the class names, against the
  class's training count (bars, with the count on a second axis; and a scatter of accuracy
  against count).

Accuracies of a run whose evaluation is not the classifier (an SSL base sets
``evaluation = "kNN"`` on its method class) are labelled with it: "kNN top-1"
(:func:`evaluation_prefix`, which the epoch line uses too). The validation and test loss
(``val/loss``, ``test/loss``: the mean cross-entropy of the classifier's logits over the
split, :func:`batchkin.trainer.evaluate`) exist only where the classifier is evaluated; a
kNN evaluation has none, and the report then shows no loss column for it.
Many / medium / few are shown — in the report and the final line — only where the
training data is long-tailed (:func:`batchkin.metrics.is_long_tailed`: a long-tailed
subset was asked for, or the largest class has at least three times the images of the
smallest; digits at 130-145 images per class is not, its imbalance-factor-10 subset is).

Every file is written like a checkpoint (:func:`batchkin.rundir.atomic_write_bytes`):
rendered in memory, written to a temporary file, fsynced and renamed, so a full disk
leaves the previous version (or nothing), never a truncated or empty PNG; report.md is
written last.
"""

from __future__ import annotations

import io
import tomllib
from pathlib import Path

from .metrics import is_long_tailed
from .rundir import MARKER, RunDir, atomic_write_bytes, atomic_write_text

CLASSES = "classes.json"
PROBE = "probe.json"
#: The report lists classes one per row up to this many (the plot shows every class).
CLASS_TABLE_MAX = 100
SHOTS = ("many", "medium", "few")
SHOT_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
#: Per-epoch keys of the engine that the report shows in its own panels (not as method scalars).
ENGINE_KEYS = {"kind", "epoch", "step", "loss", "lr", "images_per_s"}



def run_evaluation(state) -> str:
    """What a run's val/test accuracies measure: ``"classifier"`` (the model's logits), or the
    first enabled method's own ``evaluation`` that is not (the SSL bases' ``"kNN"``)."""
    return next((e for e in (getattr(meth, "evaluation", "classifier") for meth in state.hooks.methods.values())
                 if e != "classifier"), "classifier")


def class_info(state) -> dict:
    """classes.json of a run: class names and training counts (label order), each class's
    many / medium / few group, whether the data is long-tailed, and what evaluation measures
    (:func:`run_evaluation`)."""
    from .metrics import shot_groups

    counts = [int(c) for c in state.splits.train_counts().tolist()]
    m = state.config.metrics
    groups, how = shot_groups(counts, m.many_threshold, m.few_threshold, m.shot_split)
    return {"names": [str(n) for n in state.splits.classes], "train_counts": counts, "groups": groups,
            "shot_split": how, "long_tailed": is_long_tailed(counts, state.config.data.imbalance_factor),
            "evaluation": run_evaluation(state)}


def evaluation_prefix(classes: dict) -> str:
    """The word naming a run's accuracies, with its space: ``""`` for the classifier, ``"kNN "``
    for an SSL base. The one place that decides it: the epoch line (``val kNN top-1``), the
    final line (``test kNN top-1``) and the report's headings and plots all use it."""
    evaluation = classes.get("evaluation", "classifier")
    return "" if evaluation == "classifier" else f"{evaluation} "


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.2f}"


def _loss(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.4f}"


def final_line(record: dict, classes: dict) -> str:
    """The line printed when a run ends: test top-1 and balanced accuracy (labelled with the
    evaluation, ``kNN``, where it is not the classifier: :func:`evaluation_prefix`), the test
    loss where the classifier is evaluated, and many / medium / few where the training data
    is long-tailed."""
    def pct(v):
        return "n/a" if v is None or v != v else f"{100 * v:.2f}%"

    text = (f"batchkin: test {evaluation_prefix(classes)}top-1 {pct(record['test/top1'])}, "
            f"balanced {pct(record['test/balanced_acc'])}")
    if "test/loss" in record:
        text += f", loss {_loss(record['test/loss'])}"
    if classes.get("long_tailed", True):
        text += (f", many {pct(record['test/many_acc'])} / medium {pct(record['test/medium_acc'])} / "
                 f"few {pct(record['test/few_acc'])} ({record['test/shot_split']} split)")
    return text


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def method_scalars(epochs: list[dict]) -> dict[str, list[str]]:
    """The numeric per-epoch keys the report's other panels do not show, grouped by their prefix
    (``bbn/alpha`` -> ``bbn``), groups and keys in the order they first appear."""
    shown = ENGINE_KEYS | {"val/top1", "val/balanced_acc", "val/loss"} | {f"val/{g}_acc" for g in SHOTS}
    groups: dict[str, list[str]] = {}
    for r in epochs:
        for key, value in r.items():
            if key in shown or key.startswith("train/") or not _is_number(value):
                continue
            group = groups.setdefault(key.partition("/")[0] if "/" in key else "other", [])
            if key not in group:
                group.append(key)
    return groups


def write_report(run_path: str | Path, classes: dict | None = None) -> Path:
    """Write report.md and its plots from the run folder (see the module docstring); ``classes``
    (:func:`class_info`), when given, is written to classes.json first."""
    run = RunDir(run_path)
    if classes is not None:
        run.write_json(CLASSES, classes)
    records = run.read_metrics()
    epochs = [r for r in records if r.get("kind") == "epoch"]
    final = next((r for r in reversed(records) if r.get("kind") == "final"), None)
    info, classes, probe = run.read_json(MARKER), run.read_json(CLASSES), run.read_json(PROBE)
    planned = _planned_epochs(run.path)
    label = evaluation_prefix(classes)
    long_tailed = classes.get("long_tailed", True)
    lines = [f"# batchkin run `{run.path.name}`", ""]
    if info:
        lines += [f"methods: {' -> '.join(info.get('methods', []))}; seed {info.get('seed')}; "
                  f"device {info.get('device')}; torch {info.get('torch')}", ""]
    if final is None:
        done = epochs[-1]["epoch"] if epochs else 0
        lines += [f"**Partial report: the run stopped after epoch {done} of {planned or '?'}** (`--until`). "
                  "The test split is evaluated when it finishes (`batchkin train --resume RUN_DIR`); the "
                  "per-class accuracies below are the latest validation's.", ""]
    shot_cols = list(SHOTS) if long_tailed else []
    if final:
        heads = [f"{label}top-1", "balanced", *shot_cols]
        cells = [_pct(final.get(f"test/{k}")) for k in ("top1", "balanced_acc", *(f"{g}_acc" for g in shot_cols))]
        if "test/loss" in final:  # the classifier's evaluation only (not kNN)
            heads.append("loss")
            cells.append(_loss(final["test/loss"]))
        lines += [f"## Test (final weights){' — ' + label.strip() + ' evaluation' if label else ''}", "",
                  "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads), "| " + " | ".join(cells) + " |", ""]
        if "test/loss" in final:
            lines += ["Loss: the mean cross-entropy of the classifier's logits over the test split.", ""]
        if long_tailed:
            lines += [f"Many/medium/few groups: {final.get('test/shot_split')} split of the training class sizes. "]
        lines += [f"Best validation epoch: {final.get('best_val_epoch')}.", ""]
    if probe:
        lines += _probe_lines(probe)
    val_loss = any("val/loss" in r for r in epochs)  # the classifier's evaluation only (not kNN)
    heads = ["epoch", "loss", *(["val loss"] if val_loss else []), "lr", f"val {label}top-1", "val balanced",
             *(f"val {g}" for g in shot_cols), "img/s"]
    lines += ["## Epochs", "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in epochs:
        cells = [str(r["epoch"]), f"{r['loss']:.4f}", *([_loss(r.get("val/loss"))] if val_loss else []),
                 f"{r['lr']:.4g}", _pct(r.get("val/top1")),
                 _pct(r.get("val/balanced_acc")), *(_pct(r.get(f"val/{g}_acc")) for g in shot_cols),
                 f"{r.get('images_per_s', 0):.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    per_class, source = _per_class(final, epochs)
    rows = _class_rows(classes, per_class)
    if rows and len(rows) <= CLASS_TABLE_MAX:
        group_col = ["group"] if long_tailed else []
        heads = ["label", "class", "training images", *group_col, "accuracy"]
        lines += [f"## Classes, most frequent first ({source} {label}accuracy)", "",
                  "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        for i, name, count, group, acc in rows:
            cells = [str(i), name, "?" if count is None else str(count), *([group or "-"] if long_tailed else []),
                     _pct(acc)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    plots = _plots(run.path, epochs, rows, source, label, long_tailed)
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = run.path / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _planned_epochs(folder: Path) -> int | None:
    try:
        return int(tomllib.loads((folder / "config.toml").read_text()).get("epochs"))
    except (OSError, ValueError, TypeError, tomllib.TOMLDecodeError):
        return None


def _probe_lines(probe: dict) -> list[str]:
    lines = ["## Linear probe (`batchkin probe`, frozen features)", "",
             "| checkpoint | epoch | test top-1 | test balanced | val top-1 | train top-1 | probe epochs | lr |",
             "|---|---|---|---|---|---|---|---|"]
    for name, p in sorted(probe.items()):
        if isinstance(p, dict):
            lines.append(f"| {name} | {p.get('epoch')} | {_pct(p.get('top1'))} | {_pct(p.get('balanced_acc'))} | "
                         f"{_pct(p.get('val_top1'))} | {_pct(p.get('train_top1'))} | {p.get('epochs')} | "
                         f"{p.get('lr')} |")
    return lines + [""]


def _per_class(final: dict | None, epochs: list[dict]) -> tuple[list | None, str]:
    if final and final.get("test/per_class"):
        return final["test/per_class"], "test"
    last = next((r for r in reversed(epochs) if r.get("val/per_class")), None)
    return (last["val/per_class"], f"validation (epoch {last['epoch']})") if last else (None, "")


def _class_rows(classes: dict, per_class: list | None) -> list[tuple]:
    """``(label, name, training count, group, accuracy)`` per class, most frequent first (ties by label)."""
    if not per_class:
        return []
    k = len(per_class)
    names, counts, groups = classes.get("names"), classes.get("train_counts"), classes.get("groups")
    if not (isinstance(names, list) and len(names) == k):
        names = [str(i) for i in range(k)]
    if not (isinstance(counts, list) and len(counts) == k):
        counts = [None] * k
    if not (isinstance(groups, list) and len(groups) == k):
        groups = [None] * k
    order = sorted(range(k), key=lambda i: (-(counts[i] or 0), i))
    return [(i, names[i], counts[i], groups[i], per_class[i]) for i in order]


def _plots(folder: Path, epochs: list, rows: list[tuple], source: str, label: str, long_tailed: bool) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the report still has its tables
        return []
    out = []
    if epochs:
        out.append(_curves(plt, folder, epochs, label, long_tailed))
    if rows:
        out.append(_per_class_plot(plt, folder, rows, source, label, long_tailed))
    return out


def _series(epochs: list, key: str, scale: float = 1.0):
    pts = [(r["epoch"], scale * r[key]) for r in epochs if _is_number(r.get(key))]
    return tuple(zip(*pts)) if pts else ((), ())


def _epoch_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch", fontsize=8)
    ax.tick_params(labelsize=7)


def _curves(plt, folder: Path, epochs: list, label: str, long_tailed: bool) -> Path:
    """First row: loss, learning rate, validation accuracy (and many / medium / few on long-tailed
    data); then one panel per method scalar, a row per prefix (wrapped at four)."""
    shots = long_tailed and any(f"val/{g}_acc" in r for r in epochs for g in SHOTS)
    groups = method_scalars(epochs)
    cols = 4
    scalar_rows = [keys[i:i + cols] for keys in groups.values() for i in range(0, len(keys), cols)]
    fig, axes = plt.subplots(1 + len(scalar_rows), cols, figsize=(3.4 * cols, 2.9 * (1 + len(scalar_rows))),
                             squeeze=False)
    ax = axes[0]
    ax[0].plot(*_series(epochs, "loss"), marker="o", label="training loss")
    terms = sorted({k for r in epochs for k in r if k.startswith("train/") and _is_number(r[k])})
    if len(terms) > 1:  # one term is the loss itself
        for key in terms:
            ax[0].plot(*_series(epochs, key), linestyle="--", label=f"{key} (last step)")
    if any("val/loss" in r for r in epochs):
        ax[0].plot(*_series(epochs, "val/loss"), marker="s", label="validation loss")
    ax[0].set_title("loss", fontsize=9)
    ax[0].legend(fontsize=7)
    ax[1].plot(*_series(epochs, "lr"), marker="o")
    ax[1].set_title("learning rate (end of epoch)", fontsize=9)
    ax[2].set_title(f"validation {label}accuracy (%)", fontsize=9)
    if any("val/top1" in r for r in epochs):
        ax[2].plot(*_series(epochs, "val/top1", 100), marker="o", label=f"{label}top-1")
        ax[2].plot(*_series(epochs, "val/balanced_acc", 100), marker="s", label=f"{label}balanced")
        ax[2].legend(fontsize=7)
    if shots:
        for g, marker in zip(SHOTS, "o^v"):
            ax[3].plot(*_series(epochs, f"val/{g}_acc", 100), marker=marker, color=SHOT_COLOURS[g], label=g)
        ax[3].set_title(f"validation {label}accuracy (%): many / medium / few", fontsize=9)
        ax[3].legend(fontsize=7)
    for a in ax[: 4 if shots else 3]:
        _epoch_axis(a)
    if not shots:
        ax[3].axis("off")
    for row, keys in zip(axes[1:], scalar_rows):
        for a, key in zip(row, keys):
            a.plot(*_series(epochs, key), marker="o", markersize=3, color="tab:green")
            a.set_title(key, fontsize=9)
            _epoch_axis(a)
        for a in row[len(keys):]:
            a.axis("off")
    fig.tight_layout()
    return _save_png(fig, folder / "curves.png")


def _per_class_plot(plt, folder: Path, rows: list[tuple], source: str, label: str, long_tailed: bool) -> Path:
    from matplotlib.ticker import NullFormatter

    k = len(rows)
    acc = [100 * a if a is not None and a == a else 0.0 for _, _, _, _, a in rows]
    counts = [c for _, _, c, _, _ in rows]
    bar_colours = [SHOT_COLOURS.get(g, "tab:blue") if long_tailed else "tab:blue" for _, _, _, g, _ in rows]
    has_counts = all(c is not None for c in counts)
    width = min(max(6, 0.32 * k), 16) + (4 if has_counts else 0)
    fig, axes = plt.subplots(1, 2 if has_counts else 1, figsize=(width, 3.8),
                             squeeze=False, gridspec_kw={"width_ratios": [3, 1]} if has_counts else None)
    ax = axes[0][0]
    ax.bar(range(k), acc, color=bar_colours)
    ax.set(ylabel=f"{source} {label}accuracy (%)", ylim=(0, 100), xlim=(-0.6, k - 0.4),
           title="per class, most frequent first")
    if k <= 60:
        ax.set_xticks(range(k))
        ax.set_xticklabels([_short(name) for _, name, _, _, _ in rows], rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xlabel(f"{k} classes, most frequent first")
    if has_counts:
        twin = ax.twinx()
        twin.plot(range(k), counts, color="black", marker=".", linewidth=1)
        twin.set_ylabel("training images")
        if long_tailed:
            twin.set_yscale("log")
            twin.yaxis.set_minor_formatter(NullFormatter())
        sc = axes[0][1]
        sc.scatter([max(c, 1) for c in counts], acc, c=bar_colours, s=14)
        sc.set(xlabel="training images", ylabel=f"{label}accuracy (%)", ylim=(0, 100), title="accuracy vs count")
        if long_tailed:
            sc.set_xscale("log")
            sc.xaxis.set_minor_formatter(NullFormatter())
    if long_tailed:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=SHOT_COLOURS[g], label=g) for g in SHOTS], fontsize=7, loc="lower left")
    fig.tight_layout()
    return _save_png(fig, folder / "per_class.png")


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=90)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
