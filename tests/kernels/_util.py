"""Helpers shared by the op tests: generators, dtypes and their tolerances, path parameters.

Thread pinning is a fixture of the root ``tests/conftest.py`` (``torch_threads``,
``one_torch_thread``), as the plugin and engine tests use it too.
"""

from __future__ import annotations

import pytest
import torch

from batchkin.kernels import rng

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DT_ID = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.uint8: "u8"}
#: Parity tolerances per dtype: float32 ~1e-5 relative, half precisions ~1e-2.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=2e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
#: Extra CUDA cases run where a GPU exists; nothing is skipped on a CPU-only machine.
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def gen(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with ``rng.derive_key(seed, *salt)`` given salts."""
    return torch.Generator().manual_seed(rng.derive_key(seed, *salt) if salt else seed)


def path_params(*paths: str) -> list:
    """``paths`` as pytest parameters, ``triton`` marked (it runs in the interpreter on CPU)."""
    return [pytest.param(p, marks=pytest.mark.triton) if p == "triton" else p for p in paths]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, **kw) -> None:
    """``actual`` equals ``expected`` within the tolerance of ``dtype`` (default: ``expected``'s), compared in float32."""
    tol = dict(TOL[dtype or expected.dtype], **kw)
    torch.testing.assert_close(actual.float(), expected.float(), **tol)
