"""Reversed class sampler (BBN): a whole epoch of class-balanced indices from ``(seed, epoch)``.

BBN's re-balancing branch draws a class ``c`` with probability ``P_c`` and then an
instance of that class uniformly, with replacement. ``P`` comes from a *mode*:

* ``reversed``: ``w_c = n_max / n_c``, ``P_c = w_c / sum_j w_j`` (the paper's sampler);
* ``balanced``: ``P_c = 1 / C``;
* ``instance``: ``P_c = n_c / N`` (plain uniform sampling over the dataset);

or from explicit per-class ``weights`` (which override the mode).

The epoch is a global sequence of draws ``0 .. num_draws - 1``. Draw ``i`` uses two
counter-based uniforms from :mod:`batchkin.kernels.rng` with ``key =
rng.derive_key(seed, epoch)``:

* ``u_class = uniform(key, 2 * i)``     picks the class,
* ``u_inst  = uniform(key, 2 * i + 1)`` picks the instance within the class.

Because the uniforms depend only on ``(key, i)``, any slice ``start .. stop - 1`` of the
epoch is computed on its own (a rank, or a resumed sampler, produces only its part)
and equals the same slice of the whole epoch.

From the uniforms to an index (the same arithmetic in all three paths):

* class: ``c = min(#{j : cdf[j] <= u_class}, C - 1)``, i.e. the first class whose
  cumulative probability exceeds ``u_class`` (inverse CDF, binary search; the C++
  path accelerates the search with a guide table, which gives the same answer);
* instance: ``k = min(max(floor(u_inst * n_c), 0), n_c - 1)``;
* index: ``sorted_indices[offset[c] + k]`` where ``sorted_indices`` lists the
  dataset indices grouped by class (see :func:`class_sorted_table`) and
  ``offset`` is the exclusive cumulative sum of ``counts``.

Float rounding: the cdf is **float64** in every path and is built once, on the
CPU, by :func:`class_cdf` and then copied to the index table's device, so all
devices and paths compare the same numbers. The uniforms are float32 with 24
random bits; widening them to float64 is exact, comparisons ``cdf[j] <= u`` are
exact, and ``u_inst * n_c`` is a single IEEE float64 multiplication (exact while
``n_c < 2**29``), so the reference, the C++ op and the Triton kernel return
bit-identical indices. :func:`class_cdf` makes the last entry exactly ``1.0`` (and
every entry after the last class with a positive probability), so a uniform in
``[0, 1)`` never selects a class of probability 0 and the clamp to ``C - 1`` is
only a guard.

Paths: Triton on CUDA tensors (binary search over the float64 cdf in-kernel), the
C++ op ``batchkin::_reversed_sampler_cpu`` on CPU tensors, the PyTorch reference
(``torch.searchsorted``) otherwise. The op is not differentiable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from batchkin.kernels import checks, dispatch, rng

INFO = dispatch.register_op(
    "reversed_sampler", cpp_library="reversed_sampler", cpp_sources=("reversed_sampler.cpp",), triton=True
)

MODES = ("reversed", "balanced", "instance")
#: The most draws in one epoch: the uniforms' offsets ``2 * i + 1`` stay below 2**32.
MAX_DRAWS = 2**31 - 1
#: Draws per Triton program.
TRITON_BLOCK = 1024

_INT_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LABEL_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


# --------------------------------------------------------------------------- #
# Argument handling (host side)
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# The PyTorch reference
# --------------------------------------------------------------------------- #


def reversed_sampler_from_uniforms_reference(
    sorted_indices: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    cdf: torch.Tensor,
    u_class: torch.Tensor,
    u_inst: torch.Tensor,
) -> torch.Tensor:
    """Indices for the given uniforms: inverse-CDF class, then a uniform instance."""
    num_classes = cdf.numel()
    # first class whose cumulative probability exceeds u (number of cdf entries <= u)
    cls = torch.searchsorted(cdf, u_class.to(torch.float64), right=True)
    cls = cls.clamp(0, num_classes - 1)
    n_c = counts[cls]
    inst = torch.floor(u_inst.to(torch.float64) * n_c.to(torch.float64)).to(torch.int64)
    inst = torch.minimum(inst.clamp(min=0), n_c - 1)
    return sorted_indices[offsets[cls] + inst]


def reversed_sampler_reference(
    sorted_indices: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    cdf: torch.Tensor,
    key: int,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Draws ``start .. stop - 1`` of the epoch with uniforms key ``key`` (offsets 2i, 2i+1)."""
    draws = torch.arange(start, stop, dtype=torch.int64, device=sorted_indices.device)
    u_class = rng.uniform(key, 2 * draws)
    u_inst = rng.uniform(key, 2 * draws + 1)
    return reversed_sampler_from_uniforms_reference(sorted_indices, offsets, counts, cdf, u_class, u_inst)


# --------------------------------------------------------------------------- #
# Triton kernels
# --------------------------------------------------------------------------- #

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some platforms
    triton = None

if triton is not None:

    @triton.jit
    def _pick(idx_ptr, off_ptr, cnt_ptr, cdf_ptr, C, n_iter, u_class, u_inst, mask, BLOCK: tl.constexpr):
        """Indices for a block of uniforms (float64 cdf, binary search, fixed ``n_iter`` steps)."""
        u = u_class.to(tl.float64)
        lo = tl.zeros([BLOCK], dtype=tl.int32)
        hi = lo + C
        for _ in range(n_iter):
            active = lo < hi
            mid = (lo + hi) // 2
            v = tl.load(cdf_ptr + mid, mask=mask & active, other=0.0)
            go_right = v <= u
            lo = tl.where(active & go_right, mid + 1, lo)
            hi = tl.where(active & (v > u), mid, hi)
        cls = tl.minimum(lo, C - 1)
        n_c = tl.load(cnt_ptr + cls, mask=mask, other=1)
        inst = (u_inst.to(tl.float64) * n_c.to(tl.float64)).to(tl.int64)  # truncation == floor once >= 0
        inst = tl.minimum(tl.maximum(inst, 0), n_c - 1)
        base = tl.load(off_ptr + cls, mask=mask, other=0)
        return tl.load(idx_ptr + base + inst, mask=mask, other=0)

    @triton.jit(do_not_specialize=["key"])  # the key is a runtime uint32 even when it equals 1
    def _reversed_sampler_kernel(
        out_ptr, idx_ptr, off_ptr, cnt_ptr, cdf_ptr, C, n_iter, key, start, n, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0)
        j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < n
        draw = start + j
        u_class = rng.tl_uniform(key, 2 * draw)
        u_inst = rng.tl_uniform(key, 2 * draw + 1)
        res = _pick(idx_ptr, off_ptr, cnt_ptr, cdf_ptr, C, n_iter, u_class, u_inst, mask, BLOCK)
        tl.store(out_ptr + j, res, mask=mask)

    @triton.jit
    def _from_uniforms_kernel(
        out_ptr, idx_ptr, off_ptr, cnt_ptr, cdf_ptr, uc_ptr, ui_ptr, C, n_iter, n, BLOCK: tl.constexpr
    ):
        pid = tl.program_id(0)
        j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = j < n
        u_class = tl.load(uc_ptr + j, mask=mask, other=0.0)
        u_inst = tl.load(ui_ptr + j, mask=mask, other=0.0)
        res = _pick(idx_ptr, off_ptr, cnt_ptr, cdf_ptr, C, n_iter, u_class, u_inst, mask, BLOCK)
        tl.store(out_ptr + j, res, mask=mask)


def _triton_ready(device: torch.device) -> None:
    ok, why = dispatch.triton_can_run(device)
    if not ok or triton is None:
        raise dispatch.KernelUnavailable(f"op 'reversed_sampler': the Triton path cannot run here ({why})")


def _launch(kernel, n: int, device: torch.device, *args) -> None:
    grid = (triton.cdiv(n, TRITON_BLOCK),)
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, BLOCK=TRITON_BLOCK, num_warps=4)
    else:
        kernel[grid](*args, BLOCK=TRITON_BLOCK)


def reversed_sampler_triton(sorted_indices, offsets, counts, cdf, key: int, start: int, stop: int) -> torch.Tensor:
    _triton_ready(sorted_indices.device)
    n = stop - start
    out = torch.empty(n, dtype=torch.int64, device=sorted_indices.device)
    if n > 0:
        C = cdf.numel()
        _launch(
            _reversed_sampler_kernel, n, sorted_indices.device,
            out, sorted_indices.contiguous(), offsets.contiguous(), counts.contiguous(), cdf.contiguous(),
            C, C.bit_length(), int(key) & rng.MASK32, start, n,
        )  # fmt: skip
    return out


def reversed_sampler_from_uniforms_triton(sorted_indices, offsets, counts, cdf, u_class, u_inst) -> torch.Tensor:
    _triton_ready(sorted_indices.device)
    n = u_class.numel()
    out = torch.empty(u_class.shape, dtype=torch.int64, device=sorted_indices.device)
    if n > 0:
        C = cdf.numel()
        # widening to float64 is exact; the kernel compares in float64 like the other paths
        uc = u_class.to(torch.float64).contiguous()
        ui = u_inst.to(torch.float64).contiguous()
        _launch(
            _from_uniforms_kernel, n, sorted_indices.device,
            out, sorted_indices.contiguous(), offsets.contiguous(), counts.contiguous(), cdf.contiguous(),
            uc, ui, C, C.bit_length(), n,
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------- #
# C++ path
# --------------------------------------------------------------------------- #


def _cpp_ready() -> None:
    if not dispatch.load_cpp(INFO):
        raise dispatch.KernelUnavailable(
            f"op 'reversed_sampler': the C++ extension is unavailable ({dispatch.cpp_error(INFO)})"
        )


def reversed_sampler_cpp(sorted_indices, offsets, counts, cdf, key: int, start: int, stop: int) -> torch.Tensor:
    _cpp_ready()
    return torch.ops.batchkin._reversed_sampler_cpu(sorted_indices, offsets, counts, cdf, int(key), start, stop)


def reversed_sampler_from_uniforms_cpp(sorted_indices, offsets, counts, cdf, u_class, u_inst) -> torch.Tensor:
    _cpp_ready()
    return torch.ops.batchkin._reversed_sampler_from_uniforms_cpu(
        sorted_indices, offsets, counts, cdf, u_class.to(torch.float64), u_inst.to(torch.float64)
    )


_EPOCH_PATHS = {"ref": reversed_sampler_reference, "cpp": reversed_sampler_cpp, "triton": reversed_sampler_triton}
_UNIFORM_PATHS = {
    "ref": reversed_sampler_from_uniforms_reference,
    "cpp": reversed_sampler_from_uniforms_cpp,
    "triton": reversed_sampler_from_uniforms_triton,
}


def reversed_sampler_impl(
    sorted_indices, offsets, counts, cdf, key: int, start: int, stop: int, path: str = "ref"
) -> torch.Tensor:
    """Run one path (``ref``/``cpp``/``triton``) directly on prepared tables (no validation)."""
    if path not in _EPOCH_PATHS:
        raise ValueError(f"path must be one of {', '.join(_EPOCH_PATHS)}; got {path!r}")
    return _EPOCH_PATHS[path](sorted_indices, offsets, counts, cdf, key, start, stop)


def reversed_sampler_from_uniforms_impl(
    sorted_indices, offsets, counts, cdf, u_class, u_inst, path: str = "ref"
) -> torch.Tensor:
    """Uniforms-driven twin of :func:`reversed_sampler_impl`."""
    if path not in _UNIFORM_PATHS:
        raise ValueError(f"path must be one of {', '.join(_UNIFORM_PATHS)}; got {path!r}")
    return _UNIFORM_PATHS[path](sorted_indices, offsets, counts, cdf, u_class, u_inst)


# --------------------------------------------------------------------------- #
# The registered ops
# --------------------------------------------------------------------------- #


@torch.library.custom_op("batchkin::reversed_sampler", mutates_args=())
def reversed_sampler(
    sorted_indices: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    cdf: torch.Tensor,
    key: int,
    start: int,
    stop: int,
) -> torch.Tensor:
    """Draws ``start .. stop - 1`` of the epoch whose uniforms have key ``key`` (int64 indices)."""
    path = dispatch.select("reversed_sampler", sorted_indices.device)
    return _EPOCH_PATHS[path](sorted_indices, offsets, counts, cdf, key, start, stop)


@reversed_sampler.register_fake
def _reversed_sampler_fake(sorted_indices, offsets, counts, cdf, key, start, stop):
    torch._check(stop >= start)
    return sorted_indices.new_empty((stop - start,), dtype=torch.int64)


@torch.library.custom_op("batchkin::reversed_sampler_from_uniforms", mutates_args=())
def reversed_sampler_from_uniforms(
    sorted_indices: torch.Tensor,
    offsets: torch.Tensor,
    counts: torch.Tensor,
    cdf: torch.Tensor,
    u_class: torch.Tensor,
    u_inst: torch.Tensor,
) -> torch.Tensor:
    """Indices for given uniforms ``u_class``/``u_inst`` in ``[0, 1)`` (same shape as ``u_class``)."""
    path = dispatch.select("reversed_sampler", sorted_indices.device)
    return _UNIFORM_PATHS[path](sorted_indices, offsets, counts, cdf, u_class, u_inst)


@reversed_sampler_from_uniforms.register_fake
def _reversed_sampler_from_uniforms_fake(sorted_indices, offsets, counts, cdf, u_class, u_inst):
    return sorted_indices.new_empty(u_class.shape, dtype=torch.int64)


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def sample_epoch(
    sorted_indices: torch.Tensor,
    counts,
    num_draws: int,
    *,
    seed: int,
    epoch: int,
    mode: str = "reversed",
    weights=None,
    start: int = 0,
    stop: int | None = None,
) -> torch.Tensor:
    """Draws ``start .. stop - 1`` (default: all ``num_draws``) of one epoch's sample indices.

    ``sorted_indices`` (int64 [N]) and ``counts`` ([C], all >= 1, summing to N) are a
    class-sorted table (:func:`class_sorted_table`). Each draw picks a class with
    probability ``P_c`` (:func:`class_probabilities` of ``mode``/``weights``) and an
    instance of it uniformly, from the counter-based uniforms of ``(seed, epoch)``;
    the result (int64 [stop - start]) is on ``sorted_indices``' device and does not
    depend on the device or the path that computed it.
    """
    _check_sorted_indices(sorted_indices)
    checks.check_int("num_draws", num_draws, min_value=0, max_value=MAX_DRAWS)
    key = epoch_key(seed, epoch)
    checks.check_int("start", start, min_value=0, max_value=num_draws)
    stop = num_draws if stop is None else checks.check_int("stop", stop, min_value=start, max_value=num_draws)
    tables = prepare_tables(sorted_indices, counts, mode, weights)
    return reversed_sampler(sorted_indices.contiguous(), *tables, key, start, stop)


def sample_from_uniforms(
    sorted_indices: torch.Tensor, counts, cdf: torch.Tensor, u_class: torch.Tensor, u_inst: torch.Tensor
) -> torch.Tensor:
    """Indices for explicit uniforms (the op's arithmetic with the random numbers supplied).

    ``cdf`` (float [C]) must be non-decreasing, within [0, 1] and end at exactly 1.0
    (build it with :func:`class_cdf`); ``u_class``/``u_inst`` are 1-D float tensors
    of equal length with values in [0, 1), on ``sorted_indices``' device.
    """
    _check_sorted_indices(sorted_indices)
    n = _counts_matching(sorted_indices, counts)
    C = n.numel()
    device = sorted_indices.device
    checks.check_tensor("cdf", cdf, shape=(C,), dtypes=_FLOAT_DTYPES)
    cdf64 = cdf.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(cdf64).all()) or bool((cdf64 < 0).any()) or bool((cdf64 > 1).any()):
        raise ValueError("cdf must hold finite values in [0, 1]")
    if C > 1 and bool((cdf64[1:] < cdf64[:-1]).any()):
        raise ValueError("cdf must be non-decreasing")
    if float(cdf64[-1]) != 1.0:
        raise ValueError(f"cdf must end at exactly 1.0 (build it with class_cdf); got {float(cdf64[-1])!r}")
    checks.check_tensor("u_class", u_class, ndim=1, dtypes=_FLOAT_DTYPES, device=device)
    checks.check_tensor("u_inst", u_inst, shape=(u_class.numel(),), dtypes=_FLOAT_DTYPES, device=device)
    for name, u in (("u_class", u_class), ("u_inst", u_inst)):
        if u.numel() and not bool(((u >= 0) & (u < 1)).all()):
            raise ValueError(f"{name} must hold values in [0, 1)")
    offsets = torch.cumsum(n, 0) - n
    return reversed_sampler_from_uniforms(
        sorted_indices.contiguous(),
        offsets.to(device),
        n.to(device),
        cdf64.to(device),
        u_class.detach().to(torch.float64).contiguous(),
        u_inst.detach().to(torch.float64).contiguous(),
    )


__all__ = [
    "INFO",
    "MODES",
    "SamplerTables",
    "class_cdf",
    "class_probabilities",
    "class_sorted_table",
    "epoch_key",
    "epoch_uniforms",
    "prepare_tables",
    "reversed_sampler",
    "reversed_sampler_from_uniforms",
    "reversed_sampler_impl",
    "reversed_sampler_from_uniforms_impl",
    "reversed_sampler_reference",
    "reversed_sampler_from_uniforms_reference",
    "sample_epoch",
    "sample_from_uniforms",
]
