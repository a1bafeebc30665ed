"""Argument checks shared by the public op functions.

Every public op validates its tensors before dispatch, so a wrong shape, dtype
or device is reported as a ``ValueError``/``TypeError`` naming the argument,
never as an error from inside a kernel.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch


def check_tensor(
    name: str,
    value,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    shape: Sequence[int | None] | None = None,
    device: torch.device | None = None,
    min_numel: int = 0,
) -> torch.Tensor:
    """Validate one tensor argument and return it.

    ``shape`` entries that are ``None`` match any size. Raises ``TypeError`` for a
    non-tensor or a wrong dtype, ``ValueError`` for a wrong rank, shape, device or
    an empty tensor.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype {allowed}; got {str(value.dtype).replace('torch.', '')}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions; got shape {tuple(value.shape)}")
    if shape is not None:
        if value.dim() != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise ValueError(f"{name} must have shape {want}; got {list(value.shape)}")
    if device is not None and value.device != torch.device(device):
        raise ValueError(f"{name} is on {value.device} but the other inputs are on {device}")
    if value.numel() < min_numel:
        raise ValueError(f"{name} must have at least {min_numel} elements; got shape {tuple(value.shape)}")
    return value


def check_int(name: str, value, *, min_value: int | None = None, max_value: int | None = None) -> int:
    """Validate an integer argument (bools are refused) and return it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{name} must be >= {min_value}; got {value}")
    if max_value is not None and value > max_value:
        raise ValueError(f"{name} must be <= {max_value}; got {value}")
    return value


ENV_CHECKS = "BATCHKIN_CHECKS"


def debug_checks() -> bool:
    """Whether ``BATCHKIN_CHECKS=1`` asks the ops for every check, those that read tensor values
    (a host sync on CUDA) included; by default an op checks values only where that is free."""
    return os.environ.get(ENV_CHECKS, "0") not in ("", "0")
