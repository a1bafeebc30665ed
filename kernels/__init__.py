"""batchkin's ops: one package per op, each a registered custom op with a Triton
kernel (CUDA), a CPU fast path (a C++ extension, or PyTorch's fused kernel) and a
pure-PyTorch reference.

The list of ops is :data:`batchkin.kernels.dispatch.OPS`; :mod:`~batchkin.kernels.dispatch`
picks the path. Shared modules: :mod:`~batchkin.kernels.rng` (counter-based uniforms, with
the Triton twin :mod:`~batchkin.kernels.rng_triton`), :mod:`~batchkin.kernels.rng_mask`
(dropout keep masks from them) and :mod:`~batchkin.kernels.checks` (argument checks).
"""


def __getattr__(name):
    """``OP_MODULES``: the op names (:data:`dispatch.OPS`), imported on first use so that
    importing a shared module such as ``rng`` does not import ``dispatch``."""
    if name == "OP_MODULES":
        from .dispatch import OPS

        return OPS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
