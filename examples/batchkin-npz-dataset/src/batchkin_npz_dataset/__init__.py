"""A batchkin dataset read from a user's .npz file, as a batchkin plugin."""

from .plugin import ARRAYS, NpzOptions, load_npz

__all__ = ["ARRAYS", "NpzOptions", "load_npz"]
