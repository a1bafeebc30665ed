"""The one object that flows through the training loop and every run hook."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from batchkin.kernels.rng import derive_key


class StepTimer:
    """Wall-clock seconds spent in each phase of the training step, summed over steps.

    Phases: ``data`` (indexing, augmentation, normalisation of the batch), ``hooks``
    (``transform_batch`` and ``after_step``), ``forward`` (the ``forward`` hook: model
    and methods), ``loss`` (the ``loss_terms`` hooks), ``backward`` (zeroing, backward,
    unscaling, the gradient-norm check) and ``optimizer`` (step, scaler, scheduler). Set
    ``state.timer = StepTimer(device)`` to measure; on CUDA every phase boundary
    synchronises the device, so time steps with and without the timer separately.
    """

    PHASES = ("data", "hooks", "forward", "loss", "backward", "optimizer")

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def fractions(self) -> dict:
        total = sum(self.seconds.values()) or 1.0
        return {k: v / total for k, v in self.seconds.items()}


_UNTIMED = contextlib.nullcontext()


@dataclass
class State:
    """Everything a hook may read or change.

    ``batch`` holds the current on-device batch (``x``, ``y`` and other streams),
    ``outputs`` the forward pass's dict (``features``, ``streams``, ``logits``, ...),
    ``loss_terms`` the named terms of the step (``loss_values``: their values as
    floats). ``epoch`` counts from 1; ``step`` counts optimizer steps over the whole
    run, ``micro_step`` the micro-batches trained (equal without accumulation);
    ``accumulation`` is ``(index, size)`` of the current micro-batch in its optimizer
    step's group (``(0, 1)`` without ``train.accumulate``). ``generator(name)`` gives a
    method its own seeded random stream, saved in checkpoints.

    The methods' scalars reach every logger through two dicts (docs/training.md):
    ``epoch_metrics`` (values of the epoch, set in ``on_epoch_start``/``on_epoch_end``,
    written once per epoch) and ``step_metrics`` (values of the optimizer step, emptied
    before its first micro-batch and logged every ``train.log_every`` steps; a tensor
    is read from the device only then). Keys are ``"<method>/<name>"``.
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
    step_metrics: dict = field(default_factory=dict)
    loss_values: dict = field(default_factory=dict)
    step_skipped: bool = False
    micro_step: int = 0
    accumulation: tuple = (0, 1)
    ema: Any = None  # batchkin.ema.WeightEMA when [train.ema] enabled
    eval_weights: str = "model"  # "ema" while evaluation runs on the EMA weights
    group_bad: bool = False  # a micro-batch of the current optimizer step had a non-finite loss term
    step_lrs: list = field(default_factory=list)  # the learning rate of each parameter group in the last step
    selection: Any = None  # batchkin.selection.Selection: best.pt and early stopping
    accumulation_kinds: dict = field(default_factory=dict)  # method -> its Method.accumulation
    rank: int = 0
    world_size: int = 1
    generators: dict = field(default_factory=dict)
    amp_dtype: torch.dtype | None = None
    scaler: Any = None
    model_options: Any = None
    timer: StepTimer | None = None

    def phase(self, name: str):
        """A context that adds its duration to ``timer``'s phase ``name`` (a no-op without a timer)."""
        return _UNTIMED if self.timer is None else self.timer.phase(name)

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
