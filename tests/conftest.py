"""Test-suite set-up shared by every test folder.

Triton only runs in interpreter mode without a GPU, and the switch must be set
before triton is first imported, so it is set here, at collection time.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Keep the compiled C++ extensions of a test session out of the user's cache
# only when asked; by default they are shared with normal use (compiling once).
