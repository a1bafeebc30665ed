"""An exponential moving average of the model's weights (``[train.ema]``).

:class:`WeightEMA` keeps a shadow copy of the *trainable part* of the model and moves it
towards the live weights after every optimizer step:
``shadow <- decay * shadow + (1 - decay) * live`` (``torch.lerp``). The trainable part is

* every parameter that requires a gradient (what the optimizer trains), and
* the floating-point buffers (BatchNorm statistics) of the modules that hold such
  parameters; a module without parameters of its own (a BatchNorm without affine)
  counts as trainable when its parent does.

A frozen part is not averaged: the SSL bases' momentum encoder (itself an EMA of the
online encoder, with ``requires_grad = False``), its statistics, a frozen classifier.
Evaluation with the EMA (:meth:`WeightEMA.swapped`) copies the shadow into the model,
runs, and copies the live values back bit for bit; the frozen part is read live.

The decay of the update after optimizer step ``n`` (counted over the run, from 1) is
timm's ``ModelEmaV3``: with ``t = n - start_step - 1``, 0 while ``t <= 0`` (the shadow
copies the weights), then ``decay``, or with ``warmup``
``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``: the average forgets its
early, random weights quickly and settles at ``decay``. A skipped step (non-finite
loss or gradient) changes no weight and does not update the shadow.

The shadow is saved in checkpoints by tensor name and restored exactly, so a resumed
run's EMA equals an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from .errors import RunError


def ema_decay(step: int, decay: float, *, warmup: bool = True, gamma: float = 1.0, power: float = 2 / 3,
              start_step: int = 0) -> float:
    """The decay of the EMA update after optimizer step ``step`` (from 1); see the module docstring."""
    t = step - start_step - 1
    if t <= 0:
        return 0.0
    if not warmup:
        return decay
    return min(decay, 1.0 - (1.0 + t / gamma) ** -power)


def averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of ``model`` an EMA averages, by state-dict name (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str, parent_trainable: bool) -> None:
        params = list(module.parameters())
        trainable = any(p.requires_grad for p in params) if params else parent_trainable
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out[prefix + name] = p
        for name, b in module.named_buffers(recurse=False):
            if trainable and b is not None and b.is_floating_point() and id(b) not in seen \
                    and name not in module._non_persistent_buffers_set:
                seen.add(id(b))
                out[prefix + name] = b
        for name, child in module.named_children():
            walk(child, f"{prefix}{name}.", trainable)

    walk(model, "", False)
    return out


class WeightEMA:
    """The EMA of a model's trainable part (``[train.ema]``, :class:`batchkin.config.EMAConfig`)."""

    def __init__(self, model: nn.Module, options):
        self.options = options
        self.live = averaged_tensors(model)
        with torch.no_grad():
            self.shadow = {name: t.detach().clone() for name, t in self.live.items()}
        self.decay = 0.0  # the decay of the last update (logged as ema/decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the shadow towards the live weights after optimizer step ``step``."""
        o = self.options
        self.decay = ema_decay(step, o.decay, warmup=o.warmup, gamma=o.warmup_gamma, power=o.warmup_power,
                               start_step=o.start_step)
        shadow, live = list(self.shadow.values()), [t.detach() for t in self.live.values()]
        if shadow:
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)

    @contextlib.contextmanager
    def swapped(self):
        """The model holds the EMA weights inside the block; the live ones, bit for bit, after it."""
        with torch.no_grad():
            saved = {name: t.detach().clone() for name, t in self.live.items()}
            for name, t in self.live.items():
                t.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in self.live.items():
                    t.copy_(saved[name])

    def state_dict(self) -> dict:
        return {"shadow": dict(self.shadow), "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            missing, extra = sorted(set(self.shadow) - set(shadow)), sorted(set(shadow) - set(self.shadow))
            raise RunError(f"the checkpoint's EMA does not fit the model (missing {missing[:3]}, "
                           f"unexpected {extra[:3]})")
        with torch.no_grad():
            for name, t in self.shadow.items():
                if shadow[name].shape != t.shape:
                    raise RunError(f"the checkpoint's EMA of {name} has shape {tuple(shadow[name].shape)}, "
                                   f"the model's {tuple(t.shape)}")
                t.copy_(shadow[name])
        self.decay = float(state.get("decay", 0.0))
