"""The reversed class sampler's tables: class probabilities and cdf, the class-sorted index
table, and the epoch's key and uniforms (all host-side argument handling)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import checks, rng

MODES = ("reversed", "balanced", "instance")
#: The most draws in one epoch: the uniforms' offsets ``2 * i + 1`` stay below 2**32.
MAX_DRAWS = 2**31 - 1

_INT_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _counts_cpu(counts, name: str = "counts") -> torch.Tensor:
    """``counts`` as a CPU int64 tensor, every entry >= 1 (ValueError otherwise)."""
    if isinstance(counts, torch.Tensor):
        checks.check_tensor(name, counts, ndim=1, dtypes=_INT_DTYPES, min_numel=1)
        values = counts.detach().to(device="cpu", dtype=torch.int64)
    elif isinstance(counts, Sequence) and not isinstance(counts, (str, bytes)):
        if len(counts) == 0:
            raise ValueError(f"{name} must have at least 1 element; got an empty sequence")
        for j, v in enumerate(counts):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}[{j}] must be an int, got {type(v).__name__}")
        values = torch.tensor(list(counts), dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {type(counts).__name__}")
    bad = torch.nonzero(values <= 0).flatten()
    if bad.numel():
        j = int(bad[0])
        raise ValueError(
            f"{name}[{j}] is {int(values[j])}: class {j} is empty or has a non-positive count "
            "(every class needs at least one sample)"
        )
    return values


def _weights_cpu(weights, num_classes: int, name: str = "weights") -> torch.Tensor:
    """Non-negative, finite float64 CPU weights of length ``num_classes`` with a positive sum."""
    if isinstance(weights, torch.Tensor):
        checks.check_tensor(name, weights, ndim=1)
        if weights.dtype == torch.bool or weights.is_complex():
            raise TypeError(f"{name} must hold real numbers; got dtype {str(weights.dtype).replace('torch.', '')}")
        values = weights.detach().to(device="cpu", dtype=torch.float64)
    elif isinstance(weights, Sequence) and not isinstance(weights, (str, bytes)):
        for j, v in enumerate(weights):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{name}[{j}] must be a number, got {type(v).__name__}")
        values = torch.tensor([float(v) for v in weights], dtype=torch.float64)
    else:
        raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers, got {type(weights).__name__}")
    if values.numel() != num_classes:
        raise ValueError(f"{name} must have one entry per class ({num_classes}); got {values.numel()}")
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} must be finite; got {values.tolist() if num_classes <= 16 else 'a NaN or inf'}")
    if bool((values < 0).any()):
        j = int(torch.nonzero(values < 0).flatten()[0])
        raise ValueError(f"{name}[{j}] is {float(values[j])}: weights must be >= 0")
    if not bool((values > 0).any()):
        raise ValueError(f"{name} are all 0: at least one class needs a positive weight")
    return values


def _check_mode(mode) -> str:
    if not isinstance(mode, str):
        raise TypeError(f"mode must be a str, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def class_probabilities(counts, mode: str = "reversed", weights=None) -> torch.Tensor:
    """Per-class sampling probabilities ``P`` (float64, length ``C``, summing to 1).

    ``counts[c]`` is the number of samples of class ``c`` (all >= 1). ``mode``:
    ``reversed`` (``w_c = n_max / n_c``), ``balanced`` (``1 / C``) or ``instance``
    (``n_c / N``). Explicit ``weights`` (>= 0, finite, not all 0) override the mode.
    The result is on ``counts``' device (CPU for a sequence).
    """
    mode = _check_mode(mode)
    n = _counts_cpu(counts)
    if weights is not None:
        w = _weights_cpu(weights, n.numel())
    elif mode == "reversed":
        n64 = n.to(torch.float64)
        w = n64.max() / n64
    elif mode == "balanced":
        w = torch.ones(n.numel(), dtype=torch.float64)
    else:  # instance
        w = n.to(torch.float64)
    p = w / w.sum()
    device = counts.device if isinstance(counts, torch.Tensor) else torch.device("cpu")
    return p.to(device)


def class_cdf(probabilities) -> torch.Tensor:
    """The float64 cumulative distribution used by the sampler, ending at exactly 1.0.

    ``probabilities`` may be any non-negative finite weights (not all 0); they are
    normalised. ``cdf[c] = sum_{j<=c} w_j / sum_j w_j`` computed on the CPU, so every
    path and device sees the same values; entries from the last positive weight on
    are exactly 1.0. Returned on the input's device.
    """
    num = probabilities.numel() if isinstance(probabilities, torch.Tensor) else len(probabilities)
    w = _weights_cpu(probabilities, num, name="probabilities")
    csum = torch.cumsum(w, 0)
    cdf = csum / csum[-1]  # exact 1.0 from the last positive entry on
    device = probabilities.device if isinstance(probabilities, torch.Tensor) else torch.device("cpu")
    return cdf.to(device)


def class_sorted_table(labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sorted_indices, counts)`` for integer ``labels`` in ``[0, num_classes)``.

    ``sorted_indices`` (int64, length N) lists the dataset indices grouped by class,
    in class order and, within a class, in dataset order (a stable sort);
    ``counts`` (int64, length ``num_classes``) is the class histogram. Both are on
    ``labels``' device. Classes without samples get a count of 0 (which the
    sampler refuses).
    """
    checks.check_tensor("labels", labels, ndim=1, dtypes=_LABEL_DTYPES, min_numel=1)
    checks.check_int("num_classes", num_classes, min_value=1)
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes={num_classes}); got values in [{lo}, {hi}]")
    sorted_indices = torch.argsort(labels, stable=True).to(torch.int64)
    counts = torch.bincount(labels.to(torch.int64), minlength=num_classes)
    return sorted_indices, counts


class SamplerTables(NamedTuple):
    """The per-class tables the op consumes, all on the index table's device."""

    offsets: torch.Tensor  # int64 [C], exclusive cumulative sum of counts
    counts: torch.Tensor  # int64 [C], all >= 1
    cdf: torch.Tensor  # float64 [C], non-decreasing, last entry exactly 1.0


def _check_sorted_indices(sorted_indices) -> torch.Tensor:
    checks.check_tensor("sorted_indices", sorted_indices, ndim=1, dtypes=(torch.int64,), min_numel=1)
    return sorted_indices


def _counts_matching(sorted_indices: torch.Tensor, counts) -> torch.Tensor:
    if isinstance(counts, torch.Tensor) and counts.device not in (torch.device("cpu"), sorted_indices.device):
        raise ValueError(f"counts is on {counts.device} but sorted_indices is on {sorted_indices.device}")
    n = _counts_cpu(counts)
    total = int(n.sum())
    if total != sorted_indices.numel():
        raise ValueError(
            f"counts sum to {total} but sorted_indices has {sorted_indices.numel()} entries; "
            "they must describe the same class-sorted table"
        )
    return n


def prepare_tables(sorted_indices: torch.Tensor, counts, mode: str = "reversed", weights=None) -> SamplerTables:
    """Validate the class table and build :class:`SamplerTables` on ``sorted_indices``' device."""
    _check_sorted_indices(sorted_indices)
    n = _counts_matching(sorted_indices, counts)
    cdf = class_cdf(class_probabilities(n, mode, weights))
    offsets = torch.cumsum(n, 0) - n
    device = sorted_indices.device
    return SamplerTables(offsets.to(device), n.to(device), cdf.to(device))


def epoch_key(seed: int, epoch: int) -> int:
    """The 32-bit key of one epoch's uniforms (``rng.derive_key(seed, epoch)``)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    checks.check_int("epoch", epoch, min_value=0)
    return rng.derive_key(seed, epoch)


def epoch_uniforms(seed: int, epoch: int, start: int, stop: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(u_class, u_inst)`` (float32) of draws ``start .. stop - 1``: the numbers the op consumes."""
    key = epoch_key(seed, epoch)
    checks.check_int("start", start, min_value=0, max_value=MAX_DRAWS)
    checks.check_int("stop", stop, min_value=start, max_value=MAX_DRAWS)
    draws = torch.arange(start, stop, dtype=torch.int64, device=device)
    return rng.uniform(key, 2 * draws), rng.uniform(key, 2 * draws + 1)
