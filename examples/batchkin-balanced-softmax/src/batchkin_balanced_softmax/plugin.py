"""Balanced Softmax: cross-entropy on ``logits + tau * log(prior)``, prior = training class frequencies.

Adding the log prior during training compensates the label shift between a
long-tailed training set and a balanced test set; evaluation uses the plain
logits. The method composes with BatchFormer (``state.targets()`` repeats the
labels for every feature stream). The package also registers a model, ``mlp``,
to show the second kind of registration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.hookspecs import hookimpl
from batchkin.models import Classifier
from batchkin.plugin import Method


def balanced_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: torch.Tensor, tau: float = 1.0):
    """Mean cross-entropy of ``logits + tau * log(n_c / N)`` (the functional twin)."""
    log_prior = torch.log(class_counts.to(logits.device, torch.float32) / class_counts.sum())
    return F.cross_entropy(logits.float() + tau * log_prior, targets)


class BalancedSoftmax(Method):
    @dataclass
    class Options:
        tau: float = field(default=1.0, metadata={"ge": 0.0, "help": "weight of the log prior"})

    @hookimpl
    def on_fit_start(self, state):
        self.counts = state.splits.train_counts().to(state.device)

    @hookimpl
    def loss_terms(self, state, outputs):
        return {"balanced_softmax": balanced_softmax_loss(outputs[
            "logits"], state.targets(), self.counts, self.options.tau)}


@dataclass
class MLPOptions:
    hidden: int = field(default=128, metadata={"ge": 1, "help": "hidden width"})


class MLP(Classifier):
    def __init__(self, o: MLPOptions, num_classes: int, in_features: int):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, o.hidden), nn.ReLU())
        self.feature_dim, self.num_classes = o.hidden, num_classes
        self.classifier = nn.Linear(o.hidden, num_classes)

    def forward_features(self, x):
        return {"features": self.body(x)}


@hookimpl
def register_methods(register):
    register("balanced_softmax", BalancedSoftmax)


@hookimpl
def register_models(register):
    def build(options, *, num_classes, in_channels, image_size):
        return MLP(options, num_classes, in_channels * image_size[0] * image_size[1])

    register("mlp", build, options=MLPOptions)
