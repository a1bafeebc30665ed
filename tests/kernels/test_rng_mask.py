"""The fast keep-mask hashes (numpy on CPU, int32 torch ops elsewhere) equal their
definition on :func:`batchkin.kernels.rng.uniform`, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from batchkin.kernels import rng, rng_mask
from batchkin.kernels.batch_attention import cpu, dropout_keep_mask
from batchkin.kernels.rng_mask import float32


@pytest.mark.parametrize("key", [0, 1, 2**31 - 1, 2**31, 2**32 - 1, rng.derive_key(123)])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.3, 0.999])
def test_fast_masks_bit_identical_to_rng(key, p):
    """The kernels' numpy / int32 hashes equal rng.uniform, including offsets past 2**32."""
    h, B = 3, 45
    ref = dropout_keep_mask(key, h, B, p)
    assert torch.equal(cpu.keep_rows(key, h, B, 0, B, p, "cpu"), ref)
    assert torch.equal(cpu.keep_rows(key, h, B, 5, 17, p, "cpu", torch.float32), ref[:, 5:17].float())
    torch_path = rng_mask.keep_ranges_torch(key, 5 * B, B * B, h, 12 * B, p, "cpu", torch.bool).view(h, 12, B)
    assert torch.equal(torch_path, ref[:, 5:17])
    start, stride = 2**32 - 77, 2**33 + 5  # offsets wrap mod 2**32
    want = torch.stack([rng.uniform(key, torch.arange(start + r * stride, start + r * stride + 300)) for r in range(3)])
    want = want >= float32(p)
    assert torch.equal(rng_mask.keep_ranges(key, start, stride, 3, 300, p, "cpu"), want)
    assert torch.equal(rng_mask.keep_ranges_torch(key, start, stride, 3, 300, p, "cpu", torch.bool), want)


@pytest.mark.parametrize("chunk", [1 << 16, 50])
def test_one_pass_masks_of_several_keys_bit_identical_to_rng(monkeypatch, chunk):
    """Segments of different keys and starts hashed in shared numpy passes (pieces that
    straddle passes with a small chunk) equal rng.uniform segment by segment."""
    monkeypatch.setattr(rng_mask, "NP_CHUNK", chunk)
    segments = [(rng.derive_key(5), 0, 77), (2**32 - 1, 2**32 - 30, 61), (0, 0, 3), (rng.derive_key(6), 1000, 240)]
    for p in (0.5, 0.3):
        keep = np.empty(sum(n for _, _, n in segments), dtype=np.bool_)
        rng_mask.hash_segments_cpu(keep, segments, p)
        want = torch.cat([rng.uniform(key, torch.arange(s, s + n)) >= float32(p) for key, s, n in segments])
        assert torch.equal(torch.from_numpy(keep), want)
    # float32(p) == 1: nothing is kept (as rng.uniform < 1 says)
    assert not rng_mask.keep_ranges(3, 0, 0, 1, 100, 1.0 - 1e-9, "cpu").any()


@pytest.mark.parametrize("hash_path", ["numpy", "torch"])
def test_scaled_keep_masks_equal_their_definition(hash_path):
    """Several scaled masks (one numpy call on CPU, int32 torch ops elsewhere) are each
    keep_mask(key, shape, p) / (1 - p)."""
    keys, shapes, p = [rng.derive_key(1234, s) for s in (1, 2, 3)], [(9, 16), (9, 24), (9, 16)], 0.25
    if hash_path == "numpy":
        masks = rng_mask.scaled_keep_masks(keys, shapes, p, torch.device("cpu"), torch.float32)
    else:  # the non-CPU branch, run on CPU tensors through the torch hash
        masks = [
            rng_mask.keep_ranges_torch(key, 0, 0, 1, math.prod(sh), p, "cpu", torch.float32, 1 / (1 - p)).view(sh)
            for key, sh in zip(keys, shapes)
        ]
    for mask, key, shape in zip(masks, keys, shapes):
        want = rng_mask.keep_mask(key, list(shape), p, torch.device("cpu")).float() / (1.0 - p)
        assert mask.shape == shape and torch.equal(mask, want)
