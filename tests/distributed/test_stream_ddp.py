"""A streamed dataset under torchrun (gloo, 2 processes): each rank's DataLoader workers decode
its own shard of every step, with the same crops one process with the whole batch draws."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from batchkin.rundir import load_checkpoint

pytestmark = pytest.mark.dist


def _noise_folder(root, counts, size=(12, 10)):
    rng = np.random.default_rng(0)
    k = 0
    for c, n in enumerate(counts):
        (root / f"c{c}").mkdir(parents=True)
        for _ in range(n):
            Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(root / f"c{c}" / f"{k:03d}.png")
            k += 1
    return root


def test_two_ranks_stream_their_shards_like_one_rank_with_the_whole_batch(tmp_path, torchrun, single, metrics):
    root = _noise_folder(tmp_path / "images", [14, 10, 8])
    data = ["--set", "data.name=imagefolder", "--set", f"data.root={root}", "--set", "data.storage=stream",
            "--set", "data.image_size=[8, 8]", "--set", "data.num_workers=1"]
    two, one = tmp_path / "two", tmp_path / "one"
    r2 = torchrun(2, two, *data, "--set", "data.batch_size=4")
    assert r2.returncode == 0, r2.stderr[-3000:]
    r1 = single(one, *data, "--set", "data.batch_size=8")
    assert r1.returncode == 0, r1.stderr[-3000:]
    w2 = load_checkpoint(two / "checkpoints" / "last.pt")["model"]
    w1 = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)
    # the same weights, evaluated through each rank's interleaved shard and reduced
    for a, b in zip(metrics(one), metrics(two)):
        for key in ("val/top1", "test/top1"):
            if key in a:
                assert a[key] == pytest.approx(b[key], abs=1e-9), key
