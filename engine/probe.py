"""The linear probe: a linear classifier on a run's frozen features (``batchkin probe``).

:func:`linear_probe` loads a finished run's config and checkpoint, extracts the
features of the train, val and test splits (:func:`encode`: eval mode, no
augmentation), standardises them with the training features' mean and std (a
BatchNorm without affine, as MAE's probe), trains :func:`train_linear` on the training
split and reports the test split's accuracies. It applies to any run whose model
follows the classifier protocol; the model's ``eval_features`` are used when it has
them (the SSL bases: DINO evaluates its teacher), else its ``forward_features``. The
self-supervised methods are its main users: their val/test metrics during training
are kNN accuracies, and the probe is the other standard measure of their features.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, RunError


def features_of(model):
    """The function giving the features a model is evaluated with: ``model.eval_features``
    when it has one (an SSL network's choice of branch), else ``model.forward_features``."""
    return getattr(model, "eval_features", None) or model.forward_features


@torch.no_grad()
def encode(model, data, batch_size: int) -> torch.Tensor:
    """Features of every image of ``data`` (a DeviceData; no augmentation), in order."""
    feats, features = [], features_of(model)
    for x, _ in data.eval_batches(batch_size):
        feats.append(features(x)["features"].float())
    return torch.cat(feats) if feats else torch.empty(0, getattr(model, "feature_dim", 0))


def _standardize(train: torch.Tensor, *others: torch.Tensor):
    mean = train.mean(0, keepdim=True)
    std = train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def train_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 100,
                 lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0, momentum: float = 0.9,
                 seed: int = 0) -> nn.Linear:
    """A linear classifier trained on fixed features: zero init, SGD with momentum, cosine lr,
    mini-batches shuffled by a local generator seeded with ``seed`` (the global RNG is untouched)."""
    n, d = features.shape
    clf = nn.utils.skip_init(nn.Linear, d, num_classes, device=features.device)  # no draw from the global RNG
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(math.ceil(n / batch_size), 1)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / total, 1.0))))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(features.device)
        for start in range(0, n, batch_size):
            sel = perm[start : start + batch_size]
            loss = F.cross_entropy(clf(features[sel]), labels[sel])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def probe_state(state, *, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                seed: int = 0) -> dict:
    """The linear probe of a prepared run state (see :func:`linear_probe`)."""
    from .data import DeviceData
    from .metrics import classification_metrics, confusion_counts

    model = state.unwrapped_model
    model.eval()
    splits = state.splits
    bs = state.config.data.eval_batch_size
    with torch.no_grad():
        parts = {name: DeviceData(getattr(splits, name), splits, state.device) for name in ("train", "val", "test")}
        feats = {name: encode(model, d, bs) for name, d in parts.items()}
    names = [n for n in ("val", "test") if len(parts[n])]
    std = _standardize(feats["train"], *(feats[n] for n in names))
    train_f, others = std[0], dict(zip(names, std[1:]))
    k = state.num_classes
    with torch.enable_grad():
        clf = train_linear(train_f, parts["train"].y, k, epochs=epochs, lr=lr, batch_size=batch_size,
                           weight_decay=weight_decay, seed=seed)
    out = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "weight_decay": weight_decay, "seed": seed,
           "feature_dim": int(train_f.shape[1])}
    with torch.no_grad():
        pred = clf(train_f).argmax(1)
        out["train_top1"] = float((pred == parts["train"].y).float().mean())
        for name in names:
            c, t = confusion_counts(clf(others[name]).argmax(1), parts[name].y, k)
            metrics = classification_metrics(c.cpu(), t.cpu())
            if name == "test":
                out.update(metrics)
            else:
                out[f"{name}_top1"] = metrics["top1"]
                out[f"{name}_balanced_acc"] = metrics["balanced_acc"]
    return out


def linear_probe(run_dir, *, epochs: int = 100, lr: float = 0.1, batch_size: int = 256, weight_decay: float = 0.0,
                 seed: int = 0, checkpoint: str = "last.pt", plugins=None, device: str | None = None) -> dict:
    """Linear-probe accuracy of a run's encoder on frozen features.

    Loads ``run_dir/config.toml`` and ``run_dir/checkpoints/<checkpoint>`` (through
    :func:`batchkin.trainer.prepare` and ``restore``), extracts the encoder's features
    of the train, val and test splits (eval mode, no augmentation), standardises them
    with the training features' mean and std (a BatchNorm without affine, as MAE's
    probe), trains :func:`train_linear` on the training split and returns the test
    split's ``top1``, ``balanced_acc`` and ``per_class``, plus ``val_top1`` and
    ``train_top1``. ``plugins`` defaults to ``Plugins()`` (the built-ins, entry points and
    ``BATCHKIN_PLUGINS`` files).
    """
    from .config import load_raw
    from .plugin import Plugins
    from .rundir import load_checkpoint
    from .trainer import prepare, restore

    run = Path(run_dir)
    if not (run / "config.toml").is_file():
        raise RunError(f"{run} is not a batchkin run folder (no config.toml)")
    ckpt_path = run / "checkpoints" / checkpoint
    if not ckpt_path.is_file():
        raise RunError(f"{run} has no checkpoints/{checkpoint}")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"probe {name} must be an integer >= 1; got {value!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"probe lr must be > 0; got {lr!r}")
    if not (weight_decay >= 0 and math.isfinite(weight_decay)):
        raise ConfigError(f"probe weight_decay must be >= 0; got {weight_decay!r}")
    if plugins is None:
        plugins = Plugins()
    raw = load_raw(run / "config.toml")
    if device is not None:
        raw["device"] = device
    with torch.random.fork_rng(devices=[]):
        state = prepare(raw, plugins)
        restore(state, load_checkpoint(ckpt_path, map_location=state.device))
        out = probe_state(state, epochs=epochs, lr=lr, batch_size=batch_size, weight_decay=weight_decay, seed=seed)
    out.update({"run_dir": str(run), "checkpoint": checkpoint, "epoch": state.epoch})
    return out
