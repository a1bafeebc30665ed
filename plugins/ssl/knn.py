"""kNN evaluation of the SSL bases: cosine similarity to a bank of training features.

During evaluation the SSL bases return :func:`knn_scores` as ``outputs["logits"]``, so
the engine's top-1 / balanced / per-class metrics of an SSL run ARE kNN metrics. The
bank holds the evaluated encoder's features of the whole training split (no
augmentation), computed at the first evaluation batch of every evaluation (a new
training step). Training labels are used there and only there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from batchkin.probe import encode, features_of

from .net import fp32


def knn_scores(features: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, *, normalized_bank: bool = False) -> torch.Tensor:
    """Weighted kNN class scores ``[N, K]``: cosine similarity of each feature to the bank,
    the ``k`` most similar bank entries, each voting ``exp(sim / temperature)`` for its
    label. ``argmax`` of the scores is the kNN prediction."""
    with fp32(features.device.type):
        f = F.normalize(features.float(), dim=1)
        b = bank.float() if normalized_bank else F.normalize(bank.float(), dim=1)
        sim = f @ b.T
        k = min(k, b.shape[0])
        top, where = sim.topk(k, dim=1)
        weights = (top / temperature).exp()
        scores = torch.zeros(f.shape[0], num_classes, device=f.device)
        return scores.scatter_add_(1, bank_labels[where], weights)


class KNNEvaluator:
    """The eval-mode forward of the SSL bases: kNN scores as ``logits``.

    The features are the model's ``eval_features`` (:func:`batchkin.probe.features_of`:
    the online encoder's, or DINO's teacher's). The bank (the training split's features,
    L2-normalised) is rebuilt at the first evaluation batch after any training step
    (keyed by run and step), so the val and test evaluations of the same weights share it.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07):
        self.k, self.temperature = k, temperature
        self.key = None
        self.bank = self.labels = None

    def forward(self, state) -> dict:
        model = state.unwrapped_model
        key = (id(state), state.step, state.epoch)
        if self.key != key:
            was = model.training
            model.eval()
            bank = encode(model, state.train_data, state.config.data.eval_batch_size)
            model.train(was)
            self.bank, self.labels, self.key = F.normalize(bank, dim=1), state.train_data.y, key
        f = features_of(model)(state.batch["x"])["features"]
        logits = knn_scores(f, self.bank, self.labels, state.num_classes, self.k, self.temperature,
                            normalized_bank=True)
        return {"features": f, "logits": logits}
