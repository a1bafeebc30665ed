"""Test-suite set-up shared by every test folder.

Triton only runs in interpreter mode without a GPU, and the switch must be set
before triton is first imported, so it is set here, at collection time. The
fixtures ``torch_threads`` (a context manager) and ``one_torch_thread`` (a module's
worth of one intra-op thread) pin torch's thread count; the op tests' own helpers
are in tests/kernels/_util.py.
"""

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two xdist workers on a two-core machine: one intra-op thread each, or OpenMP
# threads oversubscribe the cores and every op slows down many times over.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def torch_threads():
    """A context manager: ``with torch_threads(n):`` runs a block with ``n`` intra-op threads."""
    return _torch_threads


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a whole module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with _torch_threads(1):
        yield
