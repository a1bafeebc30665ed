"""Which implementation of an op runs, the list of ops, and building the C++ extensions.

Path selection lives here and only here. Every op of :data:`OPS` has up to four paths:

* ``triton`` — Triton kernels, used for CUDA tensors (and, in tests, for CPU
  tensors when ``TRITON_INTERPRET=1`` is set before triton is imported); an op may
  declare sizes its kernels do not take (:attr:`OpInfo.triton_limits`);
* ``cpp`` — a C++ extension from ``csrc/``, used for CPU tensors. It is compiled
  on first use with :func:`torch.utils.cpp_extension.load` and ninja into a cache
  folder (never at import); ``batchkin build`` compiles every op ahead of time;
* a ``native`` path — PyTorch code faster than the reference (batch attention's
  ``sdpa``): the CPU fast path of an op without C++, and the fallback elsewhere;
* ``ref`` — the pure-PyTorch reference, which runs everywhere and is what the
  fast paths are tested against.

``BATCHKIN_KERNELS=ref|cpp|triton`` forces one path for every op (``auto``, the
default, picks by device; ``cpp`` means "the CPU fast path"). A forced path that
cannot run raises :class:`KernelUnavailable` naming the op and the reason, rather
than silently running something else. In ``auto`` mode a C++ extension that fails
to build falls back to the reference with one warning per op. :func:`explain` says
which path runs and why (``batchkin doctor`` prints it for every op).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import shutil
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ENV_MODE = "BATCHKIN_KERNELS"
ENV_CACHE = "BATCHKIN_CACHE"
MODES = ("auto", "ref", "cpp", "triton")
PATHS = ("ref", "cpp", "triton")


class KernelUnavailable(RuntimeError):
    """A forced kernel path cannot run here (the message says why)."""


def requested_mode() -> str:
    """The path forced by ``BATCHKIN_KERNELS`` (``auto`` when unset)."""
    mode = os.environ.get(ENV_MODE, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_MODE}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def cache_dir() -> Path:
    """Folder for compiled extensions, one subfolder per torch version."""
    root = os.environ.get(ENV_CACHE) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "batchkin"
    )
    tag = torch.__version__.replace("+", "_")
    return Path(root) / f"torch-{tag}"


def csrc_path(filename: str) -> Path:
    """Absolute path of a source file shipped in ``batchkin.csrc``."""
    path = Path(str(importlib.resources.files("batchkin.csrc").joinpath(filename)))
    if not path.is_file():
        raise FileNotFoundError(f"batchkin C++ source {filename!r} is missing from {path.parent}")
    return path


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, bool, str]:
    """``(importable, interpreter, reason)`` for Triton on this machine."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return False, interpret, f"triton cannot be imported ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "?")
    mode = "interpreter mode" if interpret else "compiled mode"
    return True, interpret, f"triton {version} in {mode}"


def triton_can_run(device: torch.device) -> tuple[bool, str]:
    """Whether a Triton kernel can run on tensors of ``device``, and why (not)."""
    ok, interpret, reason = triton_status()
    if not ok:
        return False, reason
    if device.type == "cuda":
        return True, reason
    if device.type == "cpu" and interpret:
        return True, reason + " (CPU tensors run in the interpreter)"
    return False, f"Triton needs CUDA tensors or TRITON_INTERPRET=1 for {device.type} tensors"


@dataclass
class OpInfo:
    """What one op offers: its C++ library, whether it has Triton kernels, and its
    pure-PyTorch fast path (``native``), if any."""

    name: str
    cpp_library: str | None = None
    cpp_sources: tuple[str, ...] = ()
    triton: bool = False
    #: A path implemented in PyTorch that needs no build and runs on any device (e.g. batch
    #: attention's ``sdpa``): the CPU fast path of an op without C++ (``BATCHKIN_KERNELS=cpp``
    #: selects it), and what runs instead of the reference where no compiled path applies.
    native: str | None = None
    native_doc: str = ""
    #: Sizes the Triton kernels take at most (e.g. ``{"head_dim": 256}``); larger ones fall
    #: back to ``native`` (or the reference), and a forced ``triton`` path is refused.
    triton_limits: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cpp_loaded: bool | None = field(default=None, repr=False)
    _cpp_error: str = field(default="", repr=False)

    def triton_refuses(self, sizes: dict) -> str | None:
        """Why the Triton kernels cannot take ``sizes`` (``None`` when they can)."""
        for key, limit in self.triton_limits.items():
            value = sizes.get(key)
            if value is not None and value > limit:
                return f"{key.replace('_', ' ')} {value} > {limit}"
        return None


def _cpp_op(name: str) -> OpInfo:
    return OpInfo(name, cpp_library=name, cpp_sources=(f"{name}.cpp",), triton=True)


#: Every op of batchkin, in one list: ``batchkin doctor`` and ``batchkin build``, the
#: benchmarks and the tests all read it. Each name is a package ``batchkin.kernels.<name>``
#: and a registered custom op ``batchkin::<name>``.
REGISTRY: dict[str, OpInfo] = {
    info.name: info
    for info in (
        _cpp_op("reversed_sampler"),
        OpInfo(
            "batch_attention", triton=True, native="sdpa", triton_limits={"head_dim": 256},
            native_doc="PyTorch SDPA (explicit blockwise math with dropout)",
        ),
        _cpp_op("drloc_pairs"),
        _cpp_op("batch_mix"),
    )
}
OPS: tuple[str, ...] = tuple(REGISTRY)


def register_op(name: str, *, cpp_library: str | None = None, cpp_sources=(), triton: bool = False) -> OpInfo:
    """Declare an op outside batchkin (its name joins :data:`REGISTRY`, not :data:`OPS`)."""
    info = OpInfo(name, cpp_library, tuple(cpp_sources), triton)
    REGISTRY[name] = info
    return info


def _compiler_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None and shutil.which("g++") is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the pip package puts the binary next to python)
        except ImportError:
            return "ninja is not installed"
    return None


def load_cpp(info: OpInfo, *, verbose: bool = False) -> bool:
    """Compile (if needed) and load ``info``'s C++ library; True when its ops are registered.

    The library registers its ops with ``TORCH_LIBRARY_FRAGMENT(batchkin, m)``; it is
    loaded as a plain shared library (``is_python_module=False``). Failures are
    remembered so the compiler is not retried on every call.
    """
    if info.cpp_library is None:
        return False
    with info._lock:
        if info._cpp_loaded is not None:
            return info._cpp_loaded
        missing = _compiler_missing()
        if missing:
            info._cpp_loaded, info._cpp_error = False, missing
            return False
        try:
            from torch.utils.cpp_extension import load

            build = cache_dir() / info.cpp_library
            build.mkdir(parents=True, exist_ok=True)
            load(
                name=f"batchkin_{info.cpp_library}",
                sources=[str(csrc_path(s)) for s in info.cpp_sources],
                build_directory=str(build),
                # no fused multiply-adds: the C++ paths round every product and sum as the references do
                extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"],
                extra_ldflags=["-fopenmp"],
                is_python_module=False,
                verbose=verbose,
            )
            info._cpp_loaded = True
        except Exception as exc:  # compiler errors surface as RuntimeError/OSError
            first = str(exc).strip().splitlines()
            info._cpp_error = f"{type(exc).__name__}: {first[0] if first else ''}"
            info._cpp_loaded = False
        return info._cpp_loaded


def cpp_error(info: OpInfo) -> str:
    return info._cpp_error


_warned: set[str] = set()


def select(name: str, device: torch.device | str, **sizes: int) -> str:
    """The path op ``name`` takes for tensors on ``device`` (``sizes``: see :attr:`OpInfo.triton_limits`)."""
    return explain(name, device, build=True, **sizes)[0]


def explain(name: str, device: torch.device | str, *, build: bool = False, **sizes: int) -> tuple[str, str]:
    """``(path, reason)`` for op ``name`` on ``device``; ``path`` is ``ref``, ``cpp``,
    ``triton`` or the op's ``native`` path.

    With ``build=False`` the C++ library is not compiled: a library that has not
    been loaded yet is reported as "compiled on first use". Raises
    :class:`KernelUnavailable` when ``BATCHKIN_KERNELS`` forces a path that cannot run.
    """
    info = REGISTRY[name]
    device = torch.device(device)
    mode = requested_mode()
    fallback = info.native or "ref"
    if mode == "ref":
        return "ref", f"{ENV_MODE}=ref"
    if mode == "triton":
        if not info.triton:
            raise KernelUnavailable(f"op {name!r} has no Triton kernel ({ENV_MODE}=triton)")
        ok, why = triton_can_run(device)
        refused = info.triton_refuses(sizes)
        if not ok or refused:
            raise KernelUnavailable(f"op {name!r}: {ENV_MODE}=triton but {refused or why}")
        return "triton", f"{ENV_MODE}=triton; {why}"
    if mode == "cpp":
        if info.cpp_library is None and info.native is None:
            raise KernelUnavailable(f"op {name!r} has no C++ implementation ({ENV_MODE}=cpp)")
        if device.type != "cpu":
            raise KernelUnavailable(f"op {name!r}: {ENV_MODE}=cpp but the tensors are on {device.type}")
        if info.cpp_library is None:
            return info.native, f"{ENV_MODE}=cpp: this op's CPU fast path is {info.native_doc} (no C++ extension)"
        if not load_cpp(info):
            raise KernelUnavailable(f"op {name!r}: {ENV_MODE}=cpp but the C++ build failed: {info._cpp_error}")
        return "cpp", f"{ENV_MODE}=cpp"
    # auto
    if device.type == "cuda" and info.triton:
        ok, why = triton_can_run(device)
        refused = info.triton_refuses(sizes)
        if ok and not refused:
            return "triton", why
        if ok:
            return fallback, f"{refused} (Triton limit): {info.native_doc or 'the PyTorch reference'}"
        return fallback, why
    if device.type == "cpu" and info.cpp_library is not None:
        if not build and info._cpp_loaded is None:
            return "cpp", f"C++ extension '{info.cpp_library}' (compiled on first use into {cache_dir()})"
        if load_cpp(info):
            return "cpp", f"C++ extension '{info.cpp_library}' loaded"
        if name not in _warned:
            _warned.add(name)
            warnings.warn(
                f"batchkin: the C++ kernel for {name!r} is unavailable ({info._cpp_error}); "
                "using the PyTorch reference",
                RuntimeWarning,
                stacklevel=3,
            )
        return "ref", f"C++ build failed: {info._cpp_error}"
    if device.type == "cpu" and info.native is not None:
        return info.native, f"CPU fast path: {info.native_doc}"
    why = f"no fast path for {device.type} tensors"
    return fallback, f"{why}; {info.native_doc}" if info.native else why


def ensure_ops_imported() -> list[str]:
    """Import every op package of :data:`OPS`; returns the names of :data:`REGISTRY`."""
    for name in OPS:
        importlib.import_module(f"batchkin.kernels.{name}")
    return list(REGISTRY)
