"""The Triton twin of :mod:`batchkin.kernels.rng` (imported only where triton is wanted)."""

import triton
import triton.language as tl


@triton.jit
def _tl_lowbias32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def tl_uniform(key, offsets):
    """Triton twin of ``rng.uniform``: ``key`` a uint32 scalar, ``offsets`` an integer block."""
    k = key.to(tl.uint32)
    off = offsets.to(tl.uint32)
    h = _tl_lowbias32(off ^ k)
    h = _tl_lowbias32(h + k)
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08
