"""Every shipped config trains for one epoch (`--set epochs=1`), and the schedule scales with the run.

The configs run as written but for ``epochs = 1``, the CPU, and small data: digits is
bundled; Fashion-MNIST configs read a small MNIST-format folder made here (130 training and
20 test images per class, 28x28, the real loader and class names), so each config takes
seconds; a ``data.train_size`` larger than that folder is lowered to 200.
"""

from __future__ import annotations

import gzip
import math
import struct
import tomllib
from pathlib import Path

import numpy as np
import pytest

from batchkin.config import apply_overrides, build_config
from batchkin.errors import ConfigError
from batchkin.plugin import Plugins
from batchkin.trainer import fit, lr_factor

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, 0x08, array.ndim, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=1))


@pytest.fixture(scope="module")
def small_fashion(tmp_path_factory) -> Path:
    """A Fashion-MNIST-format folder: 10 classes, 130 train / 20 test images each, 28x28; each
    class a brighter band at its own rows, plus noise from a seeded generator."""
    root = tmp_path_factory.mktemp("fashion")
    rng = np.random.default_rng(0)
    for prefix, per in (("train", 130), ("t10k", 20)):
        labels = np.repeat(np.arange(10), per)
        images = rng.integers(0, 96, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c + 4: 2 * c + 8, 4:24] += 150
        _write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        _write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _overrides(raw: dict, fashion: Path) -> list[str]:
    data = raw.get("data", {})
    out = ["epochs=1", 'device="cpu"', "train.log_every=1000"]
    if data.get("name") == "fashion_mnist":
        out.append(f'data.root="{fashion}"')
    if data.get("train_size", 0) > 200:
        out.append("data.train_size=200")
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_trains_one_epoch(name, small_fashion, tmp_path):
    raw = tomllib.loads((ROOT / "configs" / name).read_text())
    assert raw.get("epochs", 10) > 1  # the override is what makes the run short
    result = fit(apply_overrides(raw, _overrides(raw, small_fashion)), tmp_path / "run", progress=False)
    assert result.final["kind"] == "final" and result.final["epoch"] == 1
    assert 0.0 <= result.final["test/top1"] <= 1.0
    assert (tmp_path / "run" / "report.md").is_file()


def test_the_shipped_configs_are_all_tested():
    assert len(CONFIGS) >= 17 and "quickstart.toml" in CONFIGS


# ------------------------------------------------------------------------------ the schedule scales with the run


def _factor(epochs: int, spe: int, **schedule):
    return lr_factor(build_config({"epochs": epochs, "schedule": schedule}, Plugins().registry.methods), spe)


def test_fractional_milestones_fall_at_the_same_point_of_any_run():
    # 30 epochs of 10 steps: [0.666667, 0.833333] are epochs 20 and 25 (steps 200 and 250)
    f = _factor(30, 10, name="step", milestones=[0.666667, 0.833333], gamma=0.1)
    assert [f(t) for t in (0, 199, 200, 249, 250, 299)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    # the same config for 3 epochs: steps round(20.00001) = 20 and round(24.99999) = 25
    g = _factor(3, 10, name="step", milestones=[0.666667, 0.833333], gamma=0.1)
    assert [g(t) for t in (19, 20, 24, 25)] == pytest.approx([1, 0.1, 0.1, 0.01])
    # epoch milestones are unchanged: epoch 2 of 10 steps
    h = _factor(4, 10, name="step", milestones=[2], gamma=0.5)
    assert [h(t) for t in (19, 20)] == pytest.approx([1, 0.5])


def test_a_warm_up_longer_than_half_the_run_is_cut_to_half():
    # 1 epoch of 10 steps with warmup_epochs = 1: 5 warm-up steps, then the cosine over 5
    f = _factor(1, 10, name="cosine", warmup_epochs=1, warmup_start=0.0)
    assert [f(t) for t in (0, 1, 4)] == pytest.approx([0.0, 0.2, 0.8])
    assert f(5) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.0, abs=1e-12)
    assert f(7) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 5)))
    # a warm-up within half the run is as given (2 of 10 epochs: 20 steps)
    g = _factor(10, 10, name="cosine", warmup_epochs=2, warmup_start=0.0)
    assert g(10) == pytest.approx(0.5) and g(20) == pytest.approx(1.0)
    # a warm-up longer than the whole run is no error
    assert _factor(2, 10, name="constant", warmup_epochs=5, warmup_start=0.5)(10) == pytest.approx(1.0)


@pytest.mark.parametrize("schedule,message", [
    ({"milestones": [0.5, 3]}, r"schedule.milestones mixes fractions of the run \(< 1\) with epochs \(>= 1\)"),
    ({"milestones": [2, 5]}, r"schedule.milestones has epoch 5 beyond epochs = 3 \(milestones given as fractions"),
    ({"milestones": [0.0]}, r"schedule.milestones must be > 0; got 0.0"),
    ({"milestones": [-1]}, r"must be > 0"),
])
def test_bad_milestones_are_refused(schedule, message):
    with pytest.raises(ConfigError, match=message):
        build_config({"epochs": 3, "schedule": schedule}, Plugins().registry.methods)
