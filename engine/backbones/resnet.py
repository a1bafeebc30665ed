"""ImageNet-style ResNets laid out exactly as torchvision's ``ResNet``.

Parameter and buffer names and shapes are torchvision's (``conv1``, ``bn1``,
``layer1`` ... ``layer4`` of ``BasicBlock`` / ``Bottleneck`` with ``conv1``/``bn1`` ...
``conv3``/``bn3`` and ``downsample.0``/``downsample.1``, ``fc``), so a state dict saved
from ``torchvision.models.resnet50()`` (or timm's ``resnet50``, which uses the same
names) loads with ``model.weights``. The bottleneck strides its 3x3 convolution
(torchvision's "ResNet v1.5"); ResNeXt is the bottleneck with grouped 3x3 convolutions
of ``int(planes * width_per_group / 64) * groups`` channels.

The model protocol's parts are views of those modules, not modules of their own (a
second name would duplicate every key of the state dict): ``classifier`` is ``fc``,
``pool`` is ``avgpool``, ``last_block`` is ``layer4[-1]`` and ``trunk`` a
``Sequential`` of the stem, ``layer1`` ... ``layer3`` and the other blocks of
``layer4`` (what BBN shares between its branches).

Options beyond torchvision's: ``stem = "small"`` (a 3x3 stride-1 convolution and no
max-pool, for 32-pixel images; its ``conv1`` is 3x3 so ImageNet weights do not load
into it) and ``width`` (the first stage's planes, 64 in torchvision) to shrink a model
for tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from ..errors import ConfigError
from ..models import Classifier, options_with_defaults
from .weights import WeightsOptions, load_weights


def conv3x3(cin: int, cout: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (torchvision's ``BasicBlock``)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, grouped), 1x1 expand by 4 (torchvision's ``Bottleneck``)."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 groups: int = 1, width_per_group: int = 64):
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        if width < 1:
            raise ConfigError(f"a bottleneck of {planes} planes with width_per_group = {width_per_group} has no "
                              f"channels; raise model.width or model.width_per_group")
        self.conv1 = conv1x1(cin, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@dataclass
class ResNetOptions(WeightsOptions):
    """Options of ``resnet18`` ... ``resnext50_32x4d`` (defaults from the model name)."""

    layers: list[int] = field(default_factory=lambda: [2, 2, 2, 2],
                              metadata={"ge": 1, "help": "residual blocks in each of the 4 stages"})
    block: Literal["basic", "bottleneck"] = field(default="basic", metadata={"help": "residual block type"})
    width: int = field(default=64, metadata={"ge": 1, "help": "planes of the first stage (doubled per stage; "
                                                             "torchvision: 64)"})
    groups: int = field(default=1, metadata={"ge": 1, "help": "groups of the bottleneck's 3x3 convolution (ResNeXt)"})
    width_per_group: int = field(default=64, metadata={"ge": 1, "help": "bottleneck width per group at 64 planes "
                                                                       "(ResNeXt 32x4d: 4)"})
    stem: Literal["imagenet", "small"] = field(
        default="imagenet", metadata={"help": "imagenet: 7x7 stride-2 conv + max-pool; small: 3x3 stride-1 conv, "
                                              "no max-pool (small images; ImageNet weights then do not load)"})
    zero_init_residual: bool = field(default=False, metadata={"help": "start each block's last BatchNorm at gamma = 0 "
                                                                      "(each block an identity at init)"})

    def validate(self):
        if len(self.layers) != 4:
            raise ConfigError(f"layers must list the blocks of 4 stages; got {self.layers}")
        if self.block == "basic" and (self.groups != 1 or self.width_per_group != 64):
            raise ConfigError("groups and width_per_group apply to the bottleneck block (block = 'bottleneck')")


class ResNet(Classifier):
    """torchvision's ``ResNet`` (see the module docstring) with the model protocol."""

    input_conv = "conv1.weight"

    def __init__(self, o: ResNetOptions, num_classes: int, in_channels: int = 3):
        super().__init__()
        block = Bottleneck if o.block == "bottleneck" else BasicBlock
        self.inplanes = o.width
        if o.stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, o.width, 7, 2, 3, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, o.width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(o.width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if o.stem == "imagenet" else nn.Identity()
        for i, n in enumerate(o.layers):
            layer = self._make_layer(block, o.width * 2**i, n, 1 if i == 0 else 2, o.groups, o.width_per_group)
            self.add_module(f"layer{i + 1}", layer)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim, self.num_classes = self.inplanes, num_classes
        self.fc = nn.Linear(self.inplanes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if o.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn().weight)

    def _make_layer(self, block, planes: int, n: int, stride: int, groups: int, width_per_group: int):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self.inplanes, planes, stride, downsample, groups, width_per_group)]
        self.inplanes = planes * block.expansion
        blocks += [block(self.inplanes, planes, 1, None, groups, width_per_group) for _ in range(1, n)]
        return nn.Sequential(*blocks)

    # the protocol's parts: views of torchvision's modules (see the module docstring)
    @property
    def classifier(self) -> nn.Module:
        return self.fc

    @property
    def pool(self) -> nn.Module:
        return self.avgpool

    @property
    def last_block(self) -> nn.Module:
        return self.layer4[-1]

    @property
    def trunk(self) -> nn.Sequential:
        return nn.Sequential(self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3,
                             *self.layer4[:-1])

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return {"features": self.avgpool(x).flatten(1)}


_BASIC, _BOTTLENECK = {"block": "basic"}, {"block": "bottleneck"}
RESNETS = {
    "resnet18": {**_BASIC, "layers": [2, 2, 2, 2]},
    "resnet34": {**_BASIC, "layers": [3, 4, 6, 3]},
    "resnet50": {**_BOTTLENECK, "layers": [3, 4, 6, 3]},
    "resnet101": {**_BOTTLENECK, "layers": [3, 4, 23, 3]},
    "resnext50_32x4d": {**_BOTTLENECK, "layers": [3, 4, 6, 3], "groups": 32, "width_per_group": 4},
}


def register(register):
    """Register every ResNet of :data:`RESNETS` (called by batchkin.models' ``register_models``)."""
    for name, defaults in RESNETS.items():
        def build(o, *, num_classes, in_channels, image_size, _name=name):
            return load_weights(ResNet(o, num_classes, in_channels), o, _name)

        register(name, build, options=options_with_defaults(ResNetOptions, name, **defaults))

