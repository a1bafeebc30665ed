"""Helpers and pytest fixtures for plugin authors.

Use them in a plugin package's own tests::

    from batchkin.testing import run_plugin, tiny_config

    def test_my_method_trains():
        state = run_plugin(["my_method"], steps=2)
        assert "my_term" in state.loss_terms

The fixtures ``batchkin_config`` (a tiny raw config dict) and ``batchkin_run_dir``
(a fresh run folder path) are available to any test once batchkin is installed
(batchkin registers this module as a pytest plugin).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable

import pytest
import torch

from .config import apply_overrides
from .plugin import Plugins
from .state import State

TINY = {
    "seed": 0,
    "epochs": 2,
    "methods": ["ce"],
    "device": "cpu",
    "data": {"name": "synthetic", "synthetic_classes": 4, "synthetic_per_class": 24, "synthetic_shape": [1, 8, 8],
             "batch_size": 16, "eval_batch_size": 64, "crop_padding": 1},
    "model": {"name": "tiny", "width": 8},
    "optim": {"name": "sgd", "lr": 0.05},
    "train": {"log_every": 1000},
}


def tiny_config(methods: Iterable[str] | None = None, overrides: Iterable[str] = (), **tables) -> dict:
    """A raw config for a run of a few seconds: synthetic 1x8x8 images, 4 classes, a tiny CNN.

    ``methods`` replaces the method list; keyword arguments extend tables
    (``data={"batch_size": 8}``), except that a ``model`` table naming another model
    replaces the tiny model's options; ``overrides`` are ``key=value`` strings.
    """
    raw = copy.deepcopy(TINY)
    if methods is not None:
        raw["methods"] = list(methods)
    for key, value in tables.items():
        replaces_model = key == "model" and value.get("name", raw["model"]["name"]) != raw["model"]["name"]
        if isinstance(value, dict) and isinstance(raw.get(key), dict) and not replaces_model:
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return apply_overrides(raw, list(overrides))


def run_plugin(
    methods: Iterable[str],
    *,
    steps: int = 2,
    config: dict | None = None,
    plugin_files: Iterable[str | os.PathLike] = (),
    plugin_modules: Iterable = (),
) -> State:
    """Build a run with ``methods`` enabled and train ``steps`` steps; returns the State.

    Fires the same hooks as a real run (configure, wrap_model, build_sampler,
    param_groups, on_fit_start, on_epoch_start, transform_batch, forward,
    transform_features, loss_terms, after_step) and checks the loss is finite.
    """
    from .trainer import prepare, train_step

    raw = copy.deepcopy(config) if config is not None else tiny_config()
    raw["methods"] = list(methods)
    plugins = Plugins(extra_files=plugin_files, extra_modules=plugin_modules)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = prepare(raw, plugins)
        state.hooks.on_fit_start(state=state)
        state.epoch = 1
        state.sampler.set_epoch(1)
        state.hooks.on_epoch_start(state=state)
        state.model.train()
        done = 0
        while done < steps:
            for indices in state.train_data.steps(state):
                loss = train_step(state, indices)
                if not torch.isfinite(torch.tensor(loss)):
                    raise AssertionError(f"step {done + 1}: non-finite loss {loss}")
                done += 1
                if done == steps:
                    break
            else:
                state.epoch += 1
                state.sampler.set_epoch(state.epoch)
    return state


@pytest.fixture
def batchkin_config() -> dict:
    """A tiny raw config dict (see :func:`tiny_config`)."""
    return tiny_config()


@pytest.fixture
def batchkin_run_dir(tmp_path):
    """A path for a run folder that does not exist yet."""
    return tmp_path / "run"
