"""batchkin: a small PyTorch training engine whose methods are pluggy plugins."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (``@batchkin.hookimpl`` for plugin authors)
from .plugin import Method  # noqa: E402  (``class MyMethod(batchkin.Method)``)

__all__ = ["__version__", "Method", "hookimpl"]
