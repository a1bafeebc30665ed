"""Fixtures of the engine tests: tiny configs, plugin files, metric readers.

Every run here is tiny (a few hundred 6x6 images, ResNet-8 of width 4) so the folder
stays fast on two cores. Two notes on threads:

* torch runs these tests with one intra-op thread (the two xdist workers share two
  cores; more threads only spin against each other);
* in-process runs that augment use 3-channel images: with 1-channel images the
  engine's augmentation currently hands the model tensors with channels-last strides,
  which crash torch's CPU convolution backward with one thread (see
  test_engine_cli.py::test_training_one_channel_images_with_one_thread, which checks
  that case in a child process).
"""

from __future__ import annotations

import copy
import json
import textwrap
from pathlib import Path

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(one_torch_thread):
    """Every engine test runs with one intra-op thread (the root conftest's fixture)."""


TINY = {
    "seed": 0,
    "epochs": 2,
    "device": "cpu",
    "data": {
        "name": "synthetic",
        "synthetic_classes": 3,
        "synthetic_per_class": 16,
        "synthetic_shape": [3, 6, 6],
        "batch_size": 8,
        "eval_batch_size": 16,
        "val_fraction": 0.25,
        "test_fraction": 0.25,
    },
    "model": {"name": "resnet8", "width": 4},
    "optim": {"lr": 0.05},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def make_tiny(**over) -> dict:
    """The tiny raw config, with top-level keys or tables merged in (a ``model`` table with
    a ``name`` replaces the model table: another model has other options)."""
    out = _merge(TINY, over)
    if "name" in over.get("model", {}):
        out["model"] = copy.deepcopy(over["model"])
    return out


@pytest.fixture(scope="session")
def tiny():
    return make_tiny


def read_lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def comparable_lines(run: Path) -> list[str]:
    """metrics.jsonl lines without the timing field, as JSON text (so NaN compares equal)."""
    out = []
    for record in read_lines(run):
        record.pop("images_per_s", None)
        out.append(json.dumps(record, sort_keys=True))
    return out


@pytest.fixture(scope="session")
def metrics_lines():
    return read_lines


@pytest.fixture(scope="session")
def comparable():
    return comparable_lines


def write_plugin_file(folder: Path, stem: str, source: str) -> Path:
    path = Path(folder) / f"{stem}.py"
    path.write_text(textwrap.dedent(source))
    return path


@pytest.fixture
def plugin_file(tmp_path):
    def write(stem: str, source: str) -> Path:
        return write_plugin_file(tmp_path, stem, source)

    return write
