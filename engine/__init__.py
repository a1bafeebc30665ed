"""batchkin: a small PyTorch training engine whose methods are pluggy plugins."""

__version__ = "0.1.0"  # first: modules imported below read it (``from . import __version__``)

from .hookspecs import hookimpl  # ``@batchkin.hookimpl`` for plugin authors
from .plugin import Method  # ``class MyMethod(batchkin.Method)``

__all__ = ["__version__", "Method", "hookimpl"]
