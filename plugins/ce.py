"""``ce``: the plain cross-entropy baseline, registered exactly like a third party's method.

It adds one loss term, ``ce`` = mean cross-entropy of ``outputs["logits"]``
against the labels (repeated to match the feature streams, so it composes with
BatchFormer's two streams), with optional label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F

from batchkin.hookspecs import hookimpl
from batchkin.plugin import Method


class CrossEntropy(Method):
    """Cross-entropy on the classifier's logits."""

    accumulation = "exact"  # a mean over samples

    @dataclass
    class Options:
        label_smoothing: float = field(default=0.0, metadata={
            "ge": 0.0, "lt": 1.0, "help": "label smoothing eps: the target is (1 - eps) one-hot + eps / K "
                                          "(torch's cross_entropy label_smoothing)"})
        weight: float = field(default=1.0, metadata={"ge": 0.0, "help": "weight of the term"})

    @hookimpl
    def loss_terms(self, state, outputs):
        loss = F.cross_entropy(outputs["logits"].float(), state.targets(), label_smoothing=self.options.label_smoothing)
        return {"ce": self.options.weight * loss}


@hookimpl
def register_methods(register):
    register("ce", CrossEntropy)
