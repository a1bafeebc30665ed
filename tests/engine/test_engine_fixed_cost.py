"""fit's fixed cost: what it writes once is written once."""

from __future__ import annotations

import torch

from batchkin.testing import tiny_config
from batchkin.trainer import fit


def test_best_and_last_checkpoint_of_one_epoch_are_serialised_once(tmp_path, monkeypatch):
    """The first epoch always improves the validation score: best.pt and last.pt are the same
    bytes from one ``torch.save``; every later epoch serialises its checkpoint once too."""
    import batchkin.rundir

    saves = []
    real = batchkin.rundir.torch.save
    monkeypatch.setattr(batchkin.rundir.torch, "save", lambda obj, f: saves.append(obj["epoch"]) or real(obj, f))
    fit(tiny_config(epochs=1, data={"val_fraction": 0.25}), tmp_path / "one", progress=False)
    ckpt = tmp_path / "one" / "checkpoints"
    assert saves == [1]
    assert (ckpt / "best.pt").read_bytes() == (ckpt / "last.pt").read_bytes()
    saves.clear()
    result = fit(tiny_config(epochs=3, data={"val_fraction": 0.25}), tmp_path / "three", progress=False)
    assert saves == [1, 2, 3]
    ckpt = tmp_path / "three" / "checkpoints"
    assert torch.load(ckpt / "best.pt", weights_only=False)["epoch"] == result.final["best_val_epoch"]
    assert torch.load(ckpt / "last.pt", weights_only=False)["epoch"] == 3
