"""Dropout keep masks from the counter-based uniforms of :mod:`batchkin.kernels.rng`.

A keep mask of key ``key`` and probability ``p`` keeps element ``i`` (its counter
offset) iff ``rng.uniform(key, i) >= float32(p)``. The functions here compute exactly
that, bit for bit, but fast: numpy ``uint32`` arithmetic in cache-sized passes on the
CPU (several masks of different keys share one pass), ``int32`` torch ops on other
devices. Batch attention draws its probability mask here and the BatchFormer layer
its feature masks (see docs/kernels/batch_attention.md).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from torch import Tensor

from . import rng

_M1, _M2 = 0x7FEB352D, 0x846CA68B
#: uint32 elements per numpy pass: the working set stays in L2.
NP_CHUNK = 1 << 16
_NP_ARANGE = np.arange(NP_CHUNK, dtype=np.uint32)


def float32(p: float) -> float:
    """``p`` rounded to float32 (the value a Triton kernel argument holds)."""
    return struct.unpack("f", struct.pack("f", float(p)))[0]


def _wrap_int32(x: int) -> int:
    """An integer mod 2**32 as the signed int32 with the same bits."""
    x &= rng.MASK32
    return x - (1 << 32) if x >= (1 << 31) else x


def _threshold24(p: float) -> int:
    """``u = m * 2**-24 >= float32(p)``  <=>  ``m >= ceil(float32(p) * 2**24)`` (exact)."""
    return math.ceil(float32(p) * (1 << 24))


def _np_lowbias32_(x: np.ndarray, t: np.ndarray) -> None:
    """``rng``'s lowbias32 on a uint32 array, in place (``t``: scratch of the same size)."""
    np.right_shift(x, 16, out=t)
    x ^= t
    np.multiply(x, np.uint32(_M1), out=x)
    np.right_shift(x, 15, out=t)
    x ^= t
    np.multiply(x, np.uint32(_M2), out=x)
    np.right_shift(x, 16, out=t)
    x ^= t


def _hash_passes(segments, ch: int):
    """Split ``segments`` (``(key, start, n)``, laid end to end) into passes of at most ``ch`` elements.

    Each pass is a list of pieces ``(key, offset, m)``: ``m`` consecutive counter
    offsets from ``offset`` under ``key``. Short segments share one pass, so a few
    small masks (different keys) cost one round of numpy calls, not one each.
    """
    passes, cur, size = [], [], 0
    for key, start, n in segments:
        s = 0
        while s < n:
            m = min(n - s, ch - size)
            cur.append((key, start + s, m))
            size, s = size + m, s + m
            if size == ch:
                passes.append((cur, size))
                cur, size = [], 0
    if cur:
        passes.append((cur, size))
    return passes


def hash_segments_cpu(keep: np.ndarray, segments, p: float, value=None) -> None:
    """``keep[pos:pos+n] = rng.uniform(key, start + arange(n)) >= float32(p)`` for each
    segment ``(key, start, n)``, the segments laid end to end in the 1-D ``keep``.

    ``keep``: bool, or float32 (kept entries = ``value``, else 1).
    """
    threshold = _threshold24(p)
    if threshold >= 1 << 24:  # float32(p) == 1: nothing is kept
        keep[:] = 0
        return
    thr = np.uint32(threshold << 8)  # (h >> 8) >= t  <=>  h >= t << 8 (t < 2**24)
    ch = max(1, min(NP_CHUNK, keep.shape[0]))
    x = np.empty(ch, dtype=np.uint32)
    t = np.empty(ch, dtype=np.uint32)
    pos = 0
    for pieces, size in _hash_passes(segments, ch):
        a = 0
        for key, offset, m in pieces:
            xs = x[a : a + m]
            offset &= rng.MASK32
            if offset:
                np.add(_NP_ARANGE[:m], np.uint32(offset), out=xs)  # offsets mod 2**32
                xs ^= np.uint32(key & rng.MASK32)
            else:
                np.bitwise_xor(_NP_ARANGE[:m], np.uint32(key & rng.MASK32), out=xs)
            a += m
        xs, ts = x[:size], t[:size]
        _np_lowbias32_(xs, ts)
        a = 0
        for key, _, m in pieces:
            x[a : a + m] += np.uint32(key & rng.MASK32)
            a += m
        _np_lowbias32_(xs, ts)
        out = keep[pos : pos + size]
        np.greater_equal(xs, thr, out=out)
        if value is not None:
            out *= value
        pos += size


def _keep_ranges_cpu(key: int, start: int, stride: int, count: int, n: int, p: float, dtype, value=None) -> Tensor:
    """CPU: the ranges as segments of one :func:`hash_segments_cpu` call."""
    if count > 1 and stride == n:  # back-to-back ranges: one long range
        segments = [(key, start, n * count)]
    else:
        segments = [(key, start + row * stride, n) for row in range(count)]
    keep = np.empty(count * n, dtype=np.bool_ if dtype == torch.bool else np.float32)
    hash_segments_cpu(keep, segments, p, value)
    return torch.from_numpy(keep).view(count, n)


def _torch_lowbias32_int32_(x: Tensor) -> Tensor:
    """``rng``'s lowbias32 on int32 tensors, in place (wrapping products, masked shifts)."""
    x ^= (x >> 16) & 0xFFFF
    x *= _wrap_int32(_M1)
    x ^= (x >> 15) & 0x1FFFF
    x *= _wrap_int32(_M2)
    x ^= (x >> 16) & 0xFFFF
    return x


def keep_ranges_torch(key: int, start: int, stride: int, count: int, n: int, p: float, device, dtype,
                      value=None) -> Tensor:  # fmt: skip
    """:func:`keep_ranges` in int32 torch ops, all ranges in one pass, no host copy (non-CPU devices)."""
    offsets = torch.arange(count, dtype=torch.int64, device=device).view(-1, 1) * stride + start
    offsets = offsets + torch.arange(n, dtype=torch.int64, device=device).view(1, -1)
    offsets = offsets & rng.MASK32
    x = (offsets - ((offsets >> 31) << 32)).to(torch.int32)  # same bits, signed
    k = _wrap_int32(key)
    x ^= k
    _torch_lowbias32_int32_(x)
    x += k  # wraps mod 2**32
    _torch_lowbias32_int32_(x)
    keep = ((x >> 8) & 0xFFFFFF) >= _threshold24(p)
    if dtype == torch.bool:
        return keep
    return keep.to(dtype) if value is None else keep.to(dtype) * value


def keep_ranges(key: int, start: int, stride: int, count: int, n: int, p: float, device, dtype=torch.bool,
                value=None) -> Tensor:  # fmt: skip
    """``rng.uniform(key, start + r * stride + arange(n)) >= float32(p)`` for ``r < count``: ``[count, n]``.

    Bit-identical to :func:`rng.uniform` and several times faster than its int64 torch
    version on CPU. ``dtype``: bool, or float32 for a 0/1 mask that multiplies without
    a conversion (kept entries equal to ``value`` instead of 1 when given).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    if dtype == torch.bool:
        value = None
    if device.type == "cpu":
        return _keep_ranges_cpu(key, start, stride, count, n, p, dtype, value)
    return keep_ranges_torch(key, start, stride, count, n, p, device, dtype, value)


@torch.library.custom_op("batchkin::batch_attention_keep_mask", mutates_args=())
def keep_mask_op(key: int, shape: list[int], p: float, device: torch.device) -> Tensor:
    """Bool keep mask of ``shape``: ``keep.view(-1)[i] = rng.uniform(key, i) >= float32(p)``.

    Batch attention's probability mask and the BatchFormer layer's feature masks; a
    registered op so that it traces under ``torch.compile``.
    """
    return keep_ranges(key, 0, 0, 1, math.prod(shape), p, device).view(shape)


@keep_mask_op.register_fake
def _(key, shape, p, device):
    return torch.empty(shape, dtype=torch.bool, device=device)


def keep_mask(key: int, shape: list[int], p: float, device: torch.device) -> Tensor:
    """:func:`keep_mask_op`; eager calls skip the custom-op dispatch overhead (same result)."""
    if torch.compiler.is_compiling():
        return keep_mask_op(key, shape, p, device)
    return keep_ranges(key, 0, 0, 1, math.prod(shape), p, device).view(shape)


def scaled_keep_masks(keys, shapes, p: float, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    """Keep masks scaled by ``1 / (1 - p)`` (values 0 or ``1 / (1 - p)``, ``dtype``), one per
    ``(key, shape)``: ``keep_mask(key, shape, p) / (1 - p)``.

    On CPU (eager) all of them are hashed by one numpy call, their counter ranges laid
    end to end, so several small masks cost about what one does.
    """
    inv_keep = 1.0 / (1.0 - p)
    sizes = [math.prod(shape) for shape in shapes]
    if torch.compiler.is_compiling():
        masks = [keep_mask_op(key, list(shape), float(p), device) for key, shape in zip(keys, shapes)]
        return [m.to(dtype) * inv_keep for m in masks]
    if device.type == "cpu":
        keep = np.empty(sum(sizes), dtype=np.bool_)
        hash_segments_cpu(keep, [(key, 0, n) for key, n in zip(keys, sizes)], p)
        masks = torch.from_numpy(np.multiply(keep, np.float32(inv_keep), dtype=np.float32)).to(dtype).split(sizes)
    else:
        masks = [keep_ranges(key, 0, 0, 1, n, p, device, torch.float32, inv_keep).to(dtype)
                 for key, n in zip(keys, sizes)]  # fmt: skip
    return [m.view(shape) for m, shape in zip(masks, shapes)]
