"""Balanced Softmax (Ren et al., NeurIPS 2020) and an MLP model, as a batchkin plugin."""
