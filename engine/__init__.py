"""batchkin: a small PyTorch training engine whose methods are pluggy plugins."""

__version__ = "0.1.0"
