"""The reversed class sampler: paths, the registered custom ops and the public functions."""

from __future__ import annotations

import torch

from .. import checks, dispatch
from .reference import reversed_sampler_from_uniforms_reference, reversed_sampler_reference
from .tables import _FLOAT_DTYPES, MAX_DRAWS, _check_sorted_indices, _counts_matching, epoch_key, prepare_tables
from .triton import reversed_sampler_triton_launch

INFO = dispatch.REGISTRY["reversed_sampler"]


def _cpp():
    if not dispatch.load_cpp(INFO):
        raise dispatch.KernelUnavailable(
            f"op 'reversed_sampler': the C++ extension is unavailable ({dispatch.cpp_error(INFO)})"
        )
    return torch.ops.batchkin


def reversed_sampler_cpp(sorted_indices, offsets, counts, cdf, key: int, start: int, stop: int) -> torch.Tensor:
    return _cpp()._reversed_sampler_cpu(sorted_indices, offsets, counts, cdf, int(key), start, stop)


def reversed_sampler_from_uniforms_cpp(sorted_indices, offsets, counts, cdf, u_class, u_inst) -> torch.Tensor:
    uniforms = (u.to(torch.float64) for u in (u_class, u_inst))
    return _cpp()._reversed_sampler_from_uniforms_cpu(sorted_indices, offsets, counts, cdf, *uniforms)


def reversed_sampler_triton(sorted_indices, offsets, counts, cdf, key: int, start: int, stop: int) -> torch.Tensor:
    return reversed_sampler_triton_launch(sorted_indices, offsets, counts, cdf, stop - start, key=key, start=start)


def reversed_sampler_from_uniforms_triton(sorted_indices, offsets, counts, cdf, u_class, u_inst) -> torch.Tensor:
    n = u_class.numel()
    return reversed_sampler_triton_launch(sorted_indices, offsets, counts, cdf, n, uniforms=(u_class, u_inst)).view(
        u_class.shape
    )


# The paths of an epoch's draws take (sorted_indices, offsets, counts, cdf, key, start, stop),
# those of explicit uniforms (sorted_indices, offsets, counts, cdf, u_class, u_inst).
_EPOCH_PATHS = {"ref": reversed_sampler_reference, "cpp": reversed_sampler_cpp, "triton": reversed_sampler_triton}
_UNIFORM_PATHS = {
    "ref": reversed_sampler_from_uniforms_reference,
    "cpp": reversed_sampler_from_uniforms_cpp,
    "triton": reversed_sampler_from_uniforms_triton,
}


def _run(paths: dict, path: str | None, sorted_indices: torch.Tensor, *args) -> torch.Tensor:
    """Run ``path`` of ``paths`` (the dispatched one when None)."""
    if path is None:
        path = dispatch.select("reversed_sampler", sorted_indices.device)
    elif path not in paths:
        raise ValueError(f"path must be one of {', '.join(paths)}; got {path!r}")
    return paths[path](sorted_indices, *args)


def reversed_sampler_impl(
    sorted_indices, offsets, counts, cdf, key: int, start: int, stop: int, path: str = "ref"
) -> torch.Tensor:
    """Run one path (``ref``/``cpp``/``triton``) directly on prepared tables (no validation)."""
    return _run(_EPOCH_PATHS, path, sorted_indices, offsets, counts, cdf, key, start, stop)


def reversed_sampler_from_uniforms_impl(
    sorted_indices, offsets, counts, cdf, u_class, u_inst, path: str = "ref"
) -> torch.Tensor:
    """Uniforms-driven twin of :func:`reversed_sampler_impl`."""
    return _run(_UNIFORM_PATHS, path, sorted_indices, offsets, counts, cdf, u_class, u_inst)


@torch.library.custom_op("batchkin::reversed_sampler", mutates_args=())
def reversed_sampler_op(
    sorted_indices: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, cdf: torch.Tensor,
    key: int, start: int, stop: int,
) -> torch.Tensor:  # fmt: skip
    """Draws ``start .. stop - 1`` of the epoch whose uniforms have key ``key`` (int64 indices)."""
    return _run(_EPOCH_PATHS, None, sorted_indices, offsets, counts, cdf, key, start, stop)


@reversed_sampler_op.register_fake
def _(sorted_indices, offsets, counts, cdf, key, start, stop):
    torch._check(stop >= start)
    return sorted_indices.new_empty((stop - start,), dtype=torch.int64)


@torch.library.custom_op("batchkin::reversed_sampler_from_uniforms", mutates_args=())
def reversed_sampler_from_uniforms_op(
    sorted_indices: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, cdf: torch.Tensor,
    u_class: torch.Tensor, u_inst: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Indices for given uniforms ``u_class``/``u_inst`` in ``[0, 1)`` (same shape as ``u_class``)."""
    return _run(_UNIFORM_PATHS, None, sorted_indices, offsets, counts, cdf, u_class, u_inst)


@reversed_sampler_from_uniforms_op.register_fake
def _(sorted_indices, offsets, counts, cdf, u_class, u_inst):
    return sorted_indices.new_empty(u_class.shape, dtype=torch.int64)


def sample_epoch(
    sorted_indices: torch.Tensor, counts, num_draws: int, *, seed: int, epoch: int, mode: str = "reversed",
    weights=None, start: int = 0, stop: int | None = None,
) -> torch.Tensor:  # fmt: skip
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
    return reversed_sampler_op(sorted_indices.contiguous(), *tables, key, start, stop)


def _check_cdf(cdf, C: int) -> torch.Tensor:
    """A cdf as :func:`class_cdf` builds it (float64 on the CPU), or ValueError."""
    checks.check_tensor("cdf", cdf, shape=(C,), dtypes=_FLOAT_DTYPES)
    cdf64 = cdf.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(cdf64).all()) or bool((cdf64 < 0).any()) or bool((cdf64 > 1).any()):
        raise ValueError("cdf must hold finite values in [0, 1]")
    if C > 1 and bool((cdf64[1:] < cdf64[:-1]).any()):
        raise ValueError("cdf must be non-decreasing")
    if float(cdf64[-1]) != 1.0:
        raise ValueError(f"cdf must end at exactly 1.0 (build it with class_cdf); got {float(cdf64[-1])!r}")
    return cdf64


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
    device = sorted_indices.device
    cdf64 = _check_cdf(cdf, n.numel())
    checks.check_tensor("u_class", u_class, ndim=1, dtypes=_FLOAT_DTYPES, device=device)
    checks.check_tensor("u_inst", u_inst, shape=(u_class.numel(),), dtypes=_FLOAT_DTYPES, device=device)
    for name, u in (("u_class", u_class), ("u_inst", u_inst)):
        if u.numel() and not bool(((u >= 0) & (u < 1)).all()):
            raise ValueError(f"{name} must hold values in [0, 1)")
    offsets = torch.cumsum(n, 0) - n
    uniforms = (u.detach().to(torch.float64).contiguous() for u in (u_class, u_inst))
    return reversed_sampler_from_uniforms_op(
        sorted_indices.contiguous(), offsets.to(device), n.to(device), cdf64.to(device), *uniforms
    )
