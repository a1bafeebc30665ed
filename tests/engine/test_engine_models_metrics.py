"""Built-in models (shapes, the classifier protocol, the ResNet split) and the classification metrics."""

from __future__ import annotations

import math

import pytest
import torch

from batchkin.errors import ConfigError
from batchkin.metrics import classification_metrics, confusion_counts, shot_groups
from batchkin.models import BasicBlock, CifarResNet, ResNetOptions, SmallViT, ViTOptions, count_parameters
from batchkin.plugin import Plugins


@pytest.fixture(scope="module")
def models():
    return Plugins().registry.models


def build(models, name, num_classes=10, in_channels=3, image_size=(32, 32), **options):
    entry = models[name]
    return entry.obj(entry.options(**options), num_classes=num_classes, in_channels=in_channels, image_size=image_size)


# ------------------------------------------------------------------------------ models


@pytest.mark.parametrize("name, blocks", [("resnet8", 3), ("resnet32", 15)])
def test_resnet_shapes(models, name, blocks):
    torch.manual_seed(0)
    model = build(models, name).eval()
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    feats = model.forward_features(x)
    assert set(feats) == {"features"}
    assert feats["features"].shape == (2, 64)
    assert model.feature_dim == 64 and model.num_classes == 10
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == blocks
    assert model(x, return_features=True).keys() == feats.keys()


def test_resnet_options_change_the_model(models):
    model = build(models, "resnet8", num_classes=4, in_channels=1, image_size=(8, 8), width=8, blocks=[2, 1, 1])
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 4)
    assert model.feature_dim == 32
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 4
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


def test_resnet_trunk_last_block_pool_make_the_forward():
    torch.manual_seed(0)
    model = CifarResNet([2, 2, 2], num_classes=5, in_channels=3, width=4)
    model.eval()
    x = torch.randn(4, 3, 12, 12)
    assert isinstance(model.last_block, BasicBlock)
    assert sum(isinstance(m, BasicBlock) for m in model.trunk.modules()) == 5
    assert model.last_block not in list(model.trunk.modules())
    manual = model.classifier(model.pool(model.last_block(model.trunk(x))).flatten(1))
    assert torch.equal(manual, model(x))
    # the three parts together hold every parameter but the classifier's
    parts = (model.trunk, model.last_block, model.pool, model.classifier)
    assert sum(count_parameters(p) for p in parts) == count_parameters(model)


def test_vit_non_square_grid(models):
    torch.manual_seed(0)
    model = build(models, "vit", num_classes=5, in_channels=1, image_size=(8, 12), dim=16, depth=1, heads=2,
                  stem_channels=4)
    x = torch.randn(3, 1, 8, 12)
    out = model.forward_features(x)
    assert out["grid"].shape == (3, 16, 8, 12)
    assert out["features"].shape == (3, 16)
    assert len(out["grids"]) == 1 and out["grids"][0] is out["grid"]
    assert model(x).shape == (3, 5)
    assert model.grid_size == (8, 12)


def test_vit_patch_and_cls_pooling():
    torch.manual_seed(0)
    model = SmallViT(ViTOptions(dim=16, depth=1, heads=4, patch=2, stem_channels=4, pool="cls"), 3, 2, (8, 12)).eval()
    out = model.forward_features(torch.randn(2, 2, 8, 12))
    assert out["grid"].shape == (2, 16, 4, 6)
    assert out["features"].shape == (2, 16)
    with pytest.raises(ConfigError, match="must divide the image size 8x12"):
        SmallViT(ViTOptions(dim=16, depth=1, heads=2, patch=3), 3, 1, (8, 12))


def test_vit_mean_pooling_is_the_mean_of_the_normed_tokens():
    torch.manual_seed(0)
    model = SmallViT(ViTOptions(dim=8, depth=1, heads=2, stem_channels=4), 3, 1, (4, 6)).eval()
    x = torch.randn(2, 1, 4, 6)
    out = model.forward_features(x)
    tokens = out["grid"].flatten(2).transpose(1, 2)  # [B, H*W, C]: the tokens before the final norm
    assert torch.allclose(out["features"], model.norm(tokens).mean(1), atol=1e-6)


def test_vit_options_are_checked():
    from batchkin.schema import parse

    with pytest.raises(ConfigError, match=r"model\.dim \(30\) must be divisible by heads \(4\)"):
        parse(ViTOptions, {"dim": 30, "heads": 4}, "model")
    with pytest.raises(ConfigError, match=r"model\.dim must be >= 8"):
        parse(ViTOptions, {"dim": 4}, "model")
    assert parse(ResNetOptions, {"blocks": [1, 2, 3]}, "model").blocks == [1, 2, 3]


# ------------------------------------------------------------------------------ metrics


def test_shot_groups_absolute():
    groups, how = shot_groups([150, 101, 100, 20, 19, 0], 100, 20, "absolute")
    assert how == "absolute"
    assert groups == ["many", "many", "medium", "medium", "few", "few"]


def test_shot_groups_relative():
    groups, how = shot_groups([5, 50, 10, 30, 1, 7], split="relative")
    assert how == "relative"
    assert groups == ["few", "many", "medium", "many", "few", "medium"]
    # ties are broken by class index; with 4 classes the thirds are 2 / 1 / 1
    assert shot_groups([10, 10, 10, 10], split="relative")[0] == ["many", "many", "medium", "few"]


def test_shot_groups_auto():
    assert shot_groups([150, 50, 10]) == (["many", "medium", "few"], "absolute")
    assert shot_groups([50, 40, 30]) == (["many", "medium", "few"], "relative")
    assert shot_groups([500, 300, 200], 100, 20) == (["many", "medium", "few"], "relative")
    assert shot_groups([30, 25, 10, 5], many_threshold=20, few_threshold=8) == ([
        "many", "many", "medium", "few"], "absolute")


def test_confusion_counts():
    pred = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    target = torch.tensor([0, 1, 1, 2, 2, 0, 1, 0])
    correct, total = confusion_counts(pred, target, 4)
    assert correct.tolist() == [2, 2, 2, 0]
    assert total.tolist() == [3, 3, 2, 0]


def test_classification_metrics_by_hand():
    # class 0: 3/4 right, class 1: 1/2, class 2: 2/6
    m = classification_metrics([3, 1, 2], [4, 2, 6], ["many", "medium", "few"])
    assert m["top1"] == pytest.approx(6 / 12)
    assert m["balanced_acc"] == pytest.approx((0.75 + 0.5 + 1 / 3) / 3)
    assert m["per_class"] == [0.75, 0.5, 0.333333]
    assert m["many_acc"] == pytest.approx(0.75)
    assert m["medium_acc"] == pytest.approx(0.5)
    assert m["few_acc"] == pytest.approx(1 / 3)


def test_classification_metrics_absent_classes_and_groups():
    m = classification_metrics([2, 0, 1, 0], [2, 0, 4, 3], ["many", "many", "medium", "medium"])
    assert m["top1"] == pytest.approx(3 / 9)
    assert m["per_class"] == [1.0, None, 0.25, 0.0]
    assert m["balanced_acc"] == pytest.approx((1.0 + 0.25 + 0.0) / 3)
    assert m["many_acc"] == pytest.approx(1.0)  # the absent class does not count
    assert m["medium_acc"] == pytest.approx(0.125)
    assert math.isnan(m["few_acc"])  # no class in the group
    assert "many_acc" not in classification_metrics([1], [1])
