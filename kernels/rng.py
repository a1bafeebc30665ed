"""Counter-based random numbers, identical in PyTorch, C++ and Triton.

The random ops (reversed class sampling, DRLoc pair draws, dropout in batch
attention) draw their numbers from a stateless hash of ``(key, offset)``:

    h = lowbias32(lowbias32(offset ^ key) + key)        (all arithmetic mod 2**32)
    u = (h >> 8) * 2**-24                                 (a float32 in [0, 1))

``lowbias32`` is a 32-bit integer finalizer (xor-shift / multiply). Because the
uniform has 24 bits it is exactly representable in float32, so the reference,
the C++ extension (``csrc/rng.h``) and the Triton kernels (``tl_uniform`` in ``rng_triton.py``)
produce bit-identical numbers, and hence identical indices, masks and draws. A
64-bit seed and a stream id (epoch, step, ...) are folded into the 32-bit key
on the host by :func:`derive_key`, so no device ever syncs with the host.
"""

from __future__ import annotations

import functools

import torch

MASK32 = 0xFFFFFFFF
_M1 = 0x7FEB352D
_M2 = 0x846CA68B


def lowbias32_int(x: int) -> int:
    """The 32-bit finalizer on a Python int (host side)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def derive_key(seed: int, *stream: int) -> int:
    """Fold a seed of any size and stream ids (epoch, step, rank, ...) into a 32-bit key."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return _derive_key(int(seed), *(int(word) for word in stream))


@functools.lru_cache(maxsize=4096)  # a pure function of ints, called with the same words every epoch / step
def _derive_key(*words: int) -> int:
    key = 0x9E3779B9
    for word in words:
        # every 32-bit limb of the word, sign included, mixes into the key
        limbs = [(word >> s) & MASK32 for s in (0, 32, 64, 96)] + [1 if word < 0 else 0]
        for limb in limbs:
            key = lowbias32_int((key ^ limb) + 0x85EBCA6B)
    return key


def _lowbias32_tensor(x: torch.Tensor) -> torch.Tensor:
    # x holds values in [0, 2**32) as int64; products wrap mod 2**64 and are masked back.
    x = x ^ (x >> 16)
    x = (x * _M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & MASK32
    x = x ^ (x >> 16)
    return x


def hash_bits(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """The 32-bit hash of ``(key, offsets)`` as int64 values in ``[0, 2**32)``."""
    off = offsets.to(torch.int64) & MASK32
    h = _lowbias32_tensor(off ^ (key & MASK32))
    return _lowbias32_tensor((h + (key & MASK32)) & MASK32)


def uniform(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """float32 uniforms in ``[0, 1)`` for the given offsets, on the offsets' device."""
    return (hash_bits(key, offsets) >> 8).to(torch.float32) * (2.0**-24)


def uniform_like(key: int, n: int, device=None, start: int = 0) -> torch.Tensor:
    """``n`` uniforms for offsets ``start .. start + n - 1``."""
    return uniform(key, torch.arange(start, start + n, device=device, dtype=torch.int64))


def __getattr__(name):
    """``tl_uniform`` is defined in :mod:`batchkin.kernels.rng_triton`, imported on first use so
    that importing this module never imports triton (``TRITON_INTERPRET`` must be set before
    triton is imported, and the engine imports this module early)."""
    if name == "tl_uniform":
        from .rng_triton import tl_uniform

        return tl_uniform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
