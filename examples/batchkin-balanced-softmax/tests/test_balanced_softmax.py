"""The example plugin's own tests, written with batchkin.testing."""

import math

import torch
import torch.nn.functional as F
from batchkin_balanced_softmax import plugin

from batchkin.testing import run_plugin, tiny_config


def test_loss_on_a_hand_worked_example():
    logits = torch.tensor([[0.0, 0.0]])
    counts = torch.tensor([3, 1])
    # logits + log prior = [log 0.75, log 0.25]; CE for class 1 = -log(0.25 / (0.75 + 0.25))
    loss = plugin.balanced_softmax_loss(logits, torch.tensor([1]), counts)
    assert math.isclose(float(loss), -math.log(0.25), rel_tol=1e-6)
    # tau = 0 is the plain cross-entropy
    assert torch.allclose(plugin.balanced_softmax_loss(logits, torch.tensor([1]), counts, tau=0.0),
                          F.cross_entropy(logits, torch.tensor([1])))


def test_trains_two_steps_through_the_engine():
    state = run_plugin(["balanced_softmax"], plugin_modules=[plugin])
    assert set(state.loss_terms) == {"balanced_softmax"}
    assert state.step == 2


def test_mlp_model_is_registered_and_trains():
    cfg = tiny_config(model={"name": "mlp", "hidden": 16})
    state = run_plugin(["ce"], config=cfg, plugin_modules=[plugin])
    assert isinstance(state.unwrapped_model, plugin.MLP)
    assert state.unwrapped_model.feature_dim == 16
