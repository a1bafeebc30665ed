"""The reversed class sampler in plain PyTorch: what the fast paths are tested against."""

from __future__ import annotations

import torch

from .. import rng


def reversed_sampler_from_uniforms_reference(
    sorted_indices: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, cdf: torch.Tensor,
    u_class: torch.Tensor, u_inst: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Indices for the given uniforms: inverse-CDF class, then a uniform instance."""
    num_classes = cdf.numel()
    # first class whose cumulative probability exceeds u (number of cdf entries <= u)
    cls = torch.searchsorted(cdf, u_class.to(torch.float64), right=True)
    cls = cls.clamp(0, num_classes - 1)
    n_c = counts[cls]
    inst = torch.floor(u_inst.to(torch.float64) * n_c.to(torch.float64)).to(torch.int64)
    inst = torch.minimum(inst.clamp(min=0), n_c - 1)
    return sorted_indices[offsets[cls] + inst]


def reversed_sampler_reference(
    sorted_indices: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, cdf: torch.Tensor,
    key: int, start: int, stop: int,
) -> torch.Tensor:  # fmt: skip
    """Draws ``start .. stop - 1`` of the epoch with uniforms key ``key`` (offsets 2i, 2i+1)."""
    draws = torch.arange(start, stop, dtype=torch.int64, device=sorted_indices.device)
    u_class = rng.uniform(key, 2 * draws)
    u_inst = rng.uniform(key, 2 * draws + 1)
    return reversed_sampler_from_uniforms_reference(sorted_indices, offsets, counts, cdf, u_class, u_inst)
