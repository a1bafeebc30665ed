"""batchkin: a small PyTorch training engine whose methods are pluggy plugins."""

__version__ = "0.1.0"

from .hookspecs import hookimpl  # noqa: E402  (``@batchkin.hookimpl`` for plugin authors)

__all__ = ["__version__", "hookimpl"]
