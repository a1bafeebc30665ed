"""Test-suite set-up shared by every test folder.

Triton only runs in interpreter mode without a GPU, and the switch must be set
before triton is first imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two xdist workers on a two-core machine: one intra-op thread each, or OpenMP
# threads oversubscribe the cores and every op slows down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
