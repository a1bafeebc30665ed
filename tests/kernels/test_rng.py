"""The counter-based uniforms: definition, Triton twin, distribution."""

import pytest
import torch
import triton
import triton.language as tl
from scipy import stats

from batchkin.kernels import rng
from batchkin.kernels.rng_triton import tl_uniform


@triton.jit
def _fill(out, key, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out + offs, tl_uniform(key, offs), mask=offs < n)


def _uniform_python(key: int, offset: int) -> float:
    """The documented definition, on Python ints."""
    h = rng.lowbias32_int((offset & rng.MASK32) ^ key)
    h = rng.lowbias32_int((h + key) & rng.MASK32)
    return (h >> 8) * 2.0**-24


def test_lowbias32_known_values():
    # x ^= x >> 16; x *= 0x7feb352d; x ^= x >> 15; x *= 0x846ca68b; x ^= x >> 16 (mod 2**32)
    assert rng.lowbias32_int(0) == 0
    x = 1
    x ^= x >> 16
    x = (x * 0x7FEB352D) % 2**32
    x ^= x >> 15
    x = (x * 0x846CA68B) % 2**32
    x ^= x >> 16
    assert rng.lowbias32_int(1) == x


@pytest.mark.parametrize("seed", [0, 1, 2**31 - 1, 2**40 + 3, -5])
def test_tensor_uniform_matches_definition(seed):
    key = rng.derive_key(seed, 7)
    offsets = torch.tensor([0, 1, 2, 1000, 2**31 - 1, 2**32 - 1], dtype=torch.int64)
    got = rng.uniform(key, offsets)
    want = torch.tensor([_uniform_python(key, int(o)) for o in offsets], dtype=torch.float32)
    assert torch.equal(got, want)
    assert got.dtype == torch.float32 and (got >= 0).all() and (got < 1).all()


def test_derive_key_separates_streams():
    keys = {rng.derive_key(s, e) for s in range(20) for e in range(20)}
    assert len(keys) == 400
    assert rng.derive_key(3, 1) == rng.derive_key(3, 1)
    assert rng.derive_key(-1) != rng.derive_key(2**32 - 1)
    with pytest.raises(TypeError, match="seed"):
        rng.derive_key(1.5)


def test_uniform_distribution():
    u = rng.uniform_like(rng.derive_key(123), 200_000).double().numpy()
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    counts = torch.histc(torch.from_numpy(u), bins=64, min=0, max=1).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.triton
@pytest.mark.parametrize("n", [1, 127, 1000])
def test_triton_twin_is_bit_identical(n):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in (0, 99, 2**33):
        key = rng.derive_key(seed)
        out = torch.empty(n, device=device)
        _fill[(triton.cdiv(n, 128),)](out, key, n, BLOCK=128)
        assert torch.equal(out.cpu(), rng.uniform_like(key, n))
