"""Classification metrics: top-1, class-balanced accuracy, many/medium/few-shot, per class."""

from __future__ import annotations

import torch

#: a training set whose largest class has at least this many times the images of its smallest is long-tailed
LONG_TAIL_RATIO = 3.0


def is_long_tailed(train_counts, imbalance_factor: float = 1.0) -> bool:
    """Whether a run's training data is long-tailed: a long-tailed subset was asked for
    (``data.imbalance_factor > 1``), or the largest class has at least :data:`LONG_TAIL_RATIO`
    times the images of the smallest (a class without images counts as the smallest)."""
    counts = [int(c) for c in train_counts]
    if imbalance_factor > 1:
        return True
    if not counts:
        return False
    return max(counts) >= LONG_TAIL_RATIO * min(counts) and max(counts) > 0


def shot_groups(train_counts, many_threshold: int = 100, few_threshold: int = 20, split: str = "auto"):
    """Assign each class to "many", "medium" or "few" by its number of training images.

    ``absolute``: many > ``many_threshold``, few < ``few_threshold`` (the usual 100/20).
    ``relative``: classes sorted by count and cut in terciles (largest third many,
    smallest third few) — for datasets too small for absolute thresholds.
    ``auto``: absolute when it gives every group at least one class, else relative.
    Returns ``(groups, how)`` with ``groups`` a list of names per class.
    """
    counts = [int(c) for c in train_counts]
    k = len(counts)

    def absolute():
        return ["many" if c > many_threshold else "few" if c < few_threshold else "medium" for c in counts]

    def relative():
        order = sorted(range(k), key=lambda i: (-counts[i], i))
        groups = [""] * k
        for rank, i in enumerate(order):
            groups[i] = "many" if rank < k / 3 else "medium" if rank < 2 * k / 3 else "few"
        return groups

    if split == "absolute":
        return absolute(), "absolute"
    if split == "relative":
        return relative(), "relative"
    groups = absolute()
    if {"many", "medium", "few"} <= set(groups):
        return groups, "absolute"
    return relative(), "relative"


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, num_classes: int):
    """(correct per class, total per class) as int64 tensors."""
    total = torch.bincount(target, minlength=num_classes)
    correct = torch.bincount(target[pred == target], minlength=num_classes)
    return correct, total


def classification_metrics(correct, total, groups=None) -> dict:
    """Metrics from per-class correct/total counts (which sum exactly across processes)."""
    correct = torch.as_tensor(correct, dtype=torch.float64)
    total = torch.as_tensor(total, dtype=torch.float64)
    present = total > 0
    per_class = torch.where(present, correct / total.clamp_min(1), torch.full_like(total, float("nan")))
    out = {
        "top1": float(correct.sum() / total.sum().clamp_min(1)),
        "balanced_acc": float(per_class[present].mean()) if present.any() else float("nan"),
        "per_class": [round(float(v), 6) if v == v else None for v in per_class],
    }
    if groups is not None:
        for g in ("many", "medium", "few"):
            sel = torch.tensor([gi == g for gi in groups]) & present
            out[f"{g}_acc"] = float(per_class[sel].mean()) if sel.any() else float("nan")
    return out
