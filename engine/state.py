"""The one object that flows through the training loop and every run hook."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from batchkin.kernels.rng import derive_key


@dataclass
class State:
    """Everything a hook may read or change.

    ``batch`` holds the current on-device batch (``x``, ``y`` and other streams),
    ``outputs`` the forward pass's dict (``features``, ``streams``, ``logits``, ...),
    ``loss_terms`` the named terms of the step and ``epoch_metrics`` the values to
    log for the epoch. ``epoch`` counts from 1; ``step`` counts optimizer steps over
    the whole run. ``generator(name)`` gives a method its own seeded random stream,
    saved in checkpoints.
    """

    config: Any
    device: torch.device
    hooks: Any = None
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    splits: Any = None
    train_data: Any = None
    sampler: Any = None
    num_classes: int = 0
    epoch: int = 0
    step: int = 0
    steps_per_epoch: int = 0
    training: bool = True
    batch: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)
    loss_terms: dict = field(default_factory=dict)
    epoch_metrics: dict = field(default_factory=dict)
    step_skipped: bool = False
    rank: int = 0
    world_size: int = 1
    generators: dict = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None
    scaler: Any = None
    model_options: Any = None

    @property
    def epochs(self) -> int:
        return self.config.epochs

    def generator(self, name: str, device: torch.device | str | None = None) -> torch.Generator:
        """The run's random stream ``name`` (created on first use from the run's seed)."""
        device = torch.device(device) if device is not None else self.device
        key = f"{name}@{device.type}"
        if key not in self.generators:
            seed = derive_key(self.config.seed, *name.encode())
            self.generators[key] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[key]

    def targets(self, key: str = "y") -> torch.Tensor:
        """Labels ``batch[key]`` repeated to match the number of feature streams."""
        y = self.batch[key]
        n = len(self.outputs.get("streams", [None])) if self.training else 1
        return y if n == 1 else y.repeat(n)

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model without a DistributedDataParallel or torch.compile wrapper."""
        m = self.model
        m = getattr(m, "module", m)
        return getattr(m, "_orig_mod", m)
