"""In-batch mixing for SDMP: mixup, cutmix and resizemix with the flip partner.

METHODS.md section 4 ("Mixing") is the specification. Sample ``i`` of a batch of ``B``
mixes with its *partner* ``B-1-i`` (the batch flipped; the middle sample of an odd batch
pairs with itself). Every sample has its own operator, its own ``lam`` (shared by all views)
and, per view, its own integer box ``(y0, x0, h, w)`` inside the image:

* ``MIXUP`` (0):     ``lam * x_i + (1 - lam) * x_partner`` over the whole image;
* ``CUTMIX`` (1):    the partner's pixels inside the box replace x_i's;
* ``RESIZEMIX`` (2): the *whole* partner image, bilinearly resized to the box size (the
  formula of ``F.interpolate(mode="bilinear", align_corners=False)``, no antialias), is
  pasted into the box.

Returns ``(mixed, lam_eff)``: ``mixed`` has ``x``'s shape and dtype; ``lam_eff [V, B]`` is
``lam`` for mixup and, for cutmix and resizemix, the fraction of x_i's pixels left
untouched by the box actually pasted, ``(H*W - h*w) / (H*W)`` (float64, rounded once to
float32; a zero-area box leaves x_i unchanged, ``lam_eff = 1``). Both views of a two-view
batch ``[V, B, C, H, W]`` are mixed in one pass, each within itself.

dtypes: float32, float16, bfloat16 and uint8 images. Values are upcast to float32, mixed with
one rounding per operation and rounded once when stored; uint8 results are rounded half up,
``floor(v + 0.5)``, and clamped to ``[0, 255]``. Every path computes the same float32 values,
so all paths agree bit for bit, uint8 included. Not differentiable (it mixes input images).

Randomness: :func:`sample_mix_params` draws the parameters on the host from an explicit CPU
``torch.Generator`` (``lam = 0.8 * U(0, 1) + 0.1``, box side ratio ``sqrt(1 - lam)``, corners
uniform); the op itself is deterministic.

Paths: ``triton`` (CUDA), ``cpp`` (CPU, ``csrc/batch_mix.cpp``), ``ref`` (the loop
:func:`batch_mix_reference`) and ``ref_vec`` (vectorised). The registered op is
``batchkin::batch_mix``. Design notes: docs/kernels/batch_mix.md.

Usage::

    g = torch.Generator().manual_seed(0)
    params = sample_mix_params(B, H, W, generator=g, num_views=2, device=x.device)
    mixed, lam_eff = batch_mix(views, *params)      # views: [2, B, C, H, W]
"""

from .op import (
    IMAGE_DTYPES, IMPL_PATHS, INDEX_DTYPES, INFO, LAM_DTYPES, batch_mix, batch_mix_impl, batch_mix_op, bytes_moved,
)  # fmt: skip
from .params import CUTMIX, MIXUP, OPERATOR_NAMES, OPERATORS, RESIZEMIX, MixParams, partner_index, sample_mix_params
from .reference import batch_mix_reference, batch_mix_reference_vectorized

__all__ = [
    "MIXUP", "CUTMIX", "RESIZEMIX", "OPERATORS", "MixParams", "sample_mix_params", "partner_index",
    "batch_mix", "batch_mix_impl", "batch_mix_reference", "batch_mix_reference_vectorized",
]  # fmt: skip
