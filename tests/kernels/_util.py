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
    torch.bfloat16: dict(rtol=1e-2, atol=2e-2),
}
#: Extra CUDA cases run where a GPU exists; nothing is skipped on a CPU-only machine.
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def gen(seed: int, *salt: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``, or with ``rng.derive_key(seed, *salt)`` given salts."""
    return torch.Generator().manual_seed(rng.derive_key(seed, *salt) if salt else seed)


def path_params(*paths: str) -> list:
    """``paths`` as pytest parameters, ``triton`` marked (it runs in the interpreter on CPU)."""
    return [pytest.param(p, marks=pytest.mark.triton) if p == "triton" else p for p in paths]


# Ahead-of-time compilation of Triton kernels for a GPU that is not there (the interpreter
# cannot tell whether a kernel compiles, nor what code it becomes).
AOT_PREAMBLE = '''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

target = GPUTarget("cuda", 90, 32)
i32, i64 = "i32", "i64"

def build(fn, sig, consts, **options):
    sig = dict(sig, **{name: "constexpr" for name in consts})
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=target, options=options).asm["ptx"]
'''


def nvidia_backend_present() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


def compile_for_cuda(script: str) -> None:
    """Run :data:`AOT_PREAMBLE` + ``script`` (which builds kernels with ``build`` and asserts on
    their PTX) in a child process with the interpreter off; it must end by printing "compiled"."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", AOT_PREAMBLE + script], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "compiled" in run.stdout


def aot(test):
    """Mark an ahead-of-time compile test: a Triton test, run where triton's NVIDIA backend is installed."""
    skip = pytest.mark.skipif(not nvidia_backend_present(), reason="triton's NVIDIA backend (ptxas) is not installed")
    return pytest.mark.triton(skip(test))
