"""batchkin's ops: one module per op, each a registered custom op with a Triton
kernel (CUDA), a C++ extension (CPU) and a pure-PyTorch reference.

See :mod:`batchkin.kernels.dispatch` for how a path is chosen.
"""

# The op modules, imported lazily (``batchkin doctor`` and ``batchkin build`` import all).
OP_MODULES = ("reversed_sampler", "batch_attention", "drloc_pairs", "batch_mix")
