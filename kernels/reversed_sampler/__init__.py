"""Reversed class sampler (BBN): a whole epoch of class-balanced indices from ``(seed, epoch)``.

Draw ``i`` of an epoch picks a class ``c`` with probability ``P_c``, then an instance of that
class uniformly, with replacement. ``P`` comes from a *mode* — ``reversed``
(``w_c = n_max / n_c``, the paper's sampler), ``balanced`` (``1 / C``), ``instance``
(``n_c / N``) — or from explicit per-class ``weights``.

Randomness: with ``key = rng.derive_key(seed, epoch)``, draw ``i`` uses ``u_class =
rng.uniform(key, 2 i)`` and ``u_inst = rng.uniform(key, 2 i + 1)``, so any slice of the epoch
(a rank's share, a resumed sampler) is computed on its own and equals that slice of the whole.
Then ``c = min(#{j : cdf[j] <= u_class}, C - 1)`` over the float64 cdf of :func:`class_cdf`
(last entry exactly 1.0), ``k = min(floor(u_inst * n_c), n_c - 1)`` and the index is
``sorted_indices[offset[c] + k]`` over the class-sorted table of :func:`class_sorted_table`.

Shapes and dtypes: ``sorted_indices`` int64 ``[N]``, ``counts`` ``[C]`` (all >= 1); the
result is int64 ``[stop - start]`` on ``sorted_indices``' device. Not differentiable.

Paths (bit-identical): ``triton`` (CUDA), ``cpp`` (CPU, ``csrc/reversed_sampler.cpp``),
``ref`` (``torch.searchsorted``). Design notes: docs/kernels/reversed_sampler.md.

Names: this package and the registered op ``batchkin::reversed_sampler`` (Python handle
:func:`reversed_sampler_op`; its twin for given uniforms ``batchkin::reversed_sampler_from_uniforms``,
:func:`reversed_sampler_from_uniforms_op`) are the op; :func:`sample_epoch` is its checked
entry point; ``batchkin.plugins.bbn.reversed_sampler`` is the BBN method's functional twin
(from labels). The old handles ``reversed_sampler`` and ``reversed_sampler_from_uniforms``
of this package still work, with a ``DeprecationWarning``.
"""

import warnings

from .op import (
    INFO,
    reversed_sampler_cpp,
    reversed_sampler_from_uniforms_cpp,
    reversed_sampler_from_uniforms_triton,
    reversed_sampler_triton,
    reversed_sampler_from_uniforms_impl,
    reversed_sampler_from_uniforms_op,
    reversed_sampler_impl,
    reversed_sampler_op,
    sample_epoch,
    sample_from_uniforms,
)
from .reference import reversed_sampler_from_uniforms_reference, reversed_sampler_reference
from .tables import (
    MAX_DRAWS,
    MODES,
    SamplerTables,
    class_cdf,
    class_probabilities,
    class_sorted_table,
    epoch_key,
    epoch_uniforms,
    prepare_tables,
)
from .triton import TRITON_BLOCK

__all__ = [
    "INFO", "MAX_DRAWS", "MODES", "SamplerTables", "TRITON_BLOCK", "class_cdf", "class_probabilities",
    "class_sorted_table", "epoch_key", "epoch_uniforms", "prepare_tables", "reversed_sampler_from_uniforms_impl",
    "reversed_sampler_from_uniforms_op", "reversed_sampler_from_uniforms_reference", "reversed_sampler_impl",
    "reversed_sampler_op", "reversed_sampler_reference", "sample_epoch", "sample_from_uniforms",
]  # fmt: skip

_OLD_NAMES = {
    "reversed_sampler": "reversed_sampler_op",
    "reversed_sampler_from_uniforms": "reversed_sampler_from_uniforms_op",
}


def __getattr__(name):
    if name in _OLD_NAMES:
        new = _OLD_NAMES[name]
        warnings.warn(f"batchkin.kernels.reversed_sampler.{name} is now {new}", DeprecationWarning, stacklevel=2)
        return globals()[new]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
