"""Built-in models: CIFAR-style ResNets and a small vision transformer with a token grid.

Every classifier follows one protocol, which the methods rely on:

* ``forward_features(x) -> dict`` with ``"features"`` (pooled ``[B, D]``) and, for
  token models, ``"grid"`` (the last block's tokens before the final norm as
  ``[B, C, H, W]``, CLS token removed) and ``"grids"`` (one per stage);
* ``classifier`` — the ``nn.Module`` mapping features to logits;
* ``feature_dim`` and ``num_classes``; ``forward(x)`` is
  ``classifier(forward_features(x)["features"])``.

ResNets also expose ``trunk`` (stem and every residual block but the last),
``last_block`` and ``pool``, which BBN splits into its two branches. docs/models.md
states the protocol in full, method by method.

This module registers the CIFAR-style ResNets (``resnet8`` ... ``resnet32``, projection
or option-A shortcuts), the small ViT ``vit``, ``tiny``, and the ImageNet-scale backbones
of :mod:`batchkin.backbones` (``resnet18`` ... ``resnext50_32x4d``, ``vit_s16``,
``vit_b16``, ``swin_t``). Every one has the options ``weights`` / ``weights_prefix``
(:mod:`batchkin.backbones.weights`).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .backbones.weights import WeightsOptions, load_weights
from .errors import ConfigError
from .hookspecs import hookimpl


class Classifier(nn.Module):
    """Base of the protocol above."""

    feature_dim: int
    num_classes: int
    # forward(x, return_features=True) returns forward_features(x): the engine calls the
    # model through forward so that wrappers such as DistributedDataParallel see the call
    supports_return_features = True

    def forward_features(self, x: torch.Tensor) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.forward_features(x)
        return feats if return_features else self.classifier(feats["features"])


def check_protocol(model: nn.Module, name: str) -> None:
    """The engine's own needs (every method's default forward): ``forward_features`` and
    ``classifier``; a model without them is a ConfigError naming what is missing."""
    missing = [a for a in ("forward_features", "classifier") if not callable(getattr(model, a, None))]
    if missing:
        raise ConfigError(f"model {name!r} does not follow batchkin's model protocol: it has no "
                          f"{' and no '.join(missing)} (see docs/models.md)")


def options_with_defaults(base: type, model_name: str, **defaults) -> type:
    """A subclass of the options dataclass ``base`` whose fields in ``defaults`` default to
    the given values (one options class per registered name: ``vit_s16`` and ``vit_b16``
    share :class:`~batchkin.backbones.vit.ViTOptions` with other widths), so that a run's
    resolved config shows the real values."""
    hints = typing.get_type_hints(base)
    known = {f.name: f for f in dataclasses.fields(base)}
    spec = []
    for key, value in defaults.items():
        meta = known[key].metadata
        fld = field(default_factory=lambda v=value: list(v), metadata=meta) if isinstance(value, list) \
            else field(default=value, metadata=meta)
        spec.append((key, hints[key], fld))
    cls = dataclasses.make_dataclass(f"{base.__name__}_{model_name}", spec, bases=(base,))
    cls.__module__, cls.__qualname__ = base.__module__, f"{base.__qualname__}[{model_name}]"
    return cls


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch for a fraction ``p`` of the samples and scale
    the others by ``1 / (1 - p)``; the identity in evaluation or at ``p = 0``."""
    if not training or p == 0:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p
    return x * keep / (1 - p)

PROTOCOL = ("forward_features", "classifier", "feature_dim")


def check_classifier_protocol(model, who: str, model_name: str) -> None:
    """Refuse, naming the model and the method that needs it, a model that lacks part of the
    classifier protocol (``feature_dim`` must be a positive integer)."""
    missing = [a for a in PROTOCOL if not hasattr(model, a)]
    dim = getattr(model, "feature_dim", None)
    if not missing and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        missing = [f"an integer feature_dim (it has {dim!r})"]
    if missing:
        raise ConfigError(f"{who} needs a model following the classifier protocol of batchkin.models; "
                          f"model.name = {model_name!r} lacks {', '.join(missing)}")


def state_dict_mismatch(module: nn.Module, state_dict, limit: int = 4) -> str:
    """Where ``state_dict`` does not fit ``module``, in one line: missing and unexpected keys
    and shape differences (the first ``limit`` of each, with their count); empty if it fits."""
    if not isinstance(state_dict, dict):
        return f"the checkpoint holds {type(state_dict).__name__} instead of a state dict"
    own = module.state_dict()

    def some(items: list[str]) -> str:
        more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
        return ", ".join(items[:limit]) + more

    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} is {list(v.shape)} in the checkpoint but {list(own[k].shape)} in the model"
              for k, v in state_dict.items() if k in own and hasattr(v, "shape") and tuple(v.shape) != tuple(own[k].shape)]
    parts = [f"{what} {some(items)}" for what, items in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shapes differ:", shapes)) if items]
    return "; ".join(parts)


# ------------------------------------------------------------------------------ ResNet


class PadShortcut(nn.Module):
    """The option-A shortcut of He et al. (2016) for CIFAR, used by the LDAM / BBN ResNet-32:
    keep every ``stride``-th pixel and zero-pad the new channels, ``(cout - cin) // 2``
    before and the rest after the input's. No parameters."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        if cout < cin:
            raise ValueError(f"a padding shortcut cannot reduce {cin} channels to {cout}")
        self.stride, self.before, self.after = stride, (cout - cin) // 2, cout - cin - (cout - cin) // 2

    def forward(self, x):
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.before, self.after))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad=({self.before}, {self.after})"


class BasicBlock(nn.Module):
    """Two 3x3 convolutions; where the shape changes the shortcut is a 1x1 convolution +
    BatchNorm (``shortcut = "projection"``, option B) or :class:`PadShortcut` (``"pad"``)."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: str = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if (stride != 1 or cin != cout) and shortcut == "pad":
            self.shortcut = PadShortcut(cin, cout, stride)
        elif stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@dataclass
class ResNetOptions(WeightsOptions):
    width: int = field(default=16, metadata={"ge": 1, "help": "channels of the first stage (doubled per stage)"})
    blocks: list[int] = field(default_factory=list, metadata={"ge": 1, "help": "blocks per stage (default from the model name)"})
    shortcut: Literal["projection", "pad"] = field(
        default="projection", metadata={"help": "shortcut where the shape changes: projection (1x1 conv + BN) or pad "
                                                "(option A: subsample + zero channels, no parameters; LDAM/BBN)"})


class CifarResNet(Classifier):
    """ResNet for small images (He et al. 2016, CIFAR variant): 3x3 stem, three stages
    of basic blocks at widths w, 2w, 4w (strides 1, 2, 2), global average pooling.
    ResNet-(6n+2) has n blocks per stage; the shortcut is a 1x1 projection where the
    shape changes, or with ``shortcut="pad"`` option A (:class:`PadShortcut`), as the
    ResNet-32 of LDAM and BBN."""

    def __init__(self, blocks, num_classes: int, in_channels: int = 3, width: int = 16,
                 shortcut: str = "projection"):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        cin = width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            for i in range(n):
                layers.append(BasicBlock(cin, cout, 2 if (stage > 0 and i == 0) else 1, shortcut))
                cin = cout
        self.trunk = nn.Sequential(*layers[:-1])
        self.last_block = layers[-1]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim, self.num_classes = cin, num_classes
        self.classifier = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x):
        return {"features": self.pool(self.last_block(self.trunk(x))).flatten(1)}


RESNET_DEPTHS = {"resnet8": [1, 1, 1], "resnet14": [2, 2, 2], "resnet20": [3, 3, 3], "resnet32": [5, 5, 5]}


def _resnet_builder(name):
    def build(options: ResNetOptions, *, num_classes, in_channels, image_size):
        blocks = options.blocks or RESNET_DEPTHS[name]
        return load_weights(CifarResNet(blocks, num_classes, in_channels, options.width, options.shortcut), options, name)

    return build


# ------------------------------------------------------------------------------ ViT


@dataclass
class ViTOptions(WeightsOptions):
    dim: int = field(default=64, metadata={"ge": 8, "help": "token width"})
    depth: int = field(default=4, metadata={"ge": 1, "help": "transformer blocks"})
    heads: int = field(default=4, metadata={"ge": 1, "help": "attention heads"})
    mlp_ratio: float = field(default=2.0, metadata={"gt": 0, "help": "MLP width / token width"})
    patch: int = field(default=1, metadata={"ge": 1, "help": "stride of the convolutional stem (token grid = image / patch)"})
    stem_channels: int = field(default=32, metadata={"ge": 1, "help": "channels of the stem's first convolution"})
    drop_path: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0, "help": "stochastic depth rate of the last block"})
    pool: str = field(default="mean", metadata={"help": "mean (tokens) or cls"})

    def validate(self):
        if self.dim % self.heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.pool not in ("mean", "cls"):
            raise ConfigError(f"pool must be 'mean' or 'cls'; got {self.pool!r}")


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim, heads, mlp_ratio, drop_path=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = drop_path

    def _drop(self, x):
        return drop_path(x, self.drop_path, self.training)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self._drop(self.attn(h, h, h, need_weights=False)[0])
        return x + self._drop(self.mlp(self.norm2(x)))


class SmallViT(Classifier):
    """A small vision transformer for small images, after the convolutional-stem ViTs
    DRLoc is used with: a two-convolution stem (stride ``patch``) makes an H'xW' token
    grid, learned position embeddings, an optional CLS token, pre-norm blocks, a final
    LayerNorm and mean (or CLS) pooling. Non-square images give non-square grids."""

    def __init__(self, o: ViTOptions, num_classes: int, in_channels: int, image_size):
        super().__init__()
        h, w = image_size
        if h % o.patch or w % o.patch:
            raise ConfigError(f"model.patch ({o.patch}) must divide the image size {h}x{w}")
        self.grid_size = (h // o.patch, w // o.patch)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, o.stem_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(o.stem_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(o.stem_channels, o.dim, o.patch, o.patch) if o.patch > 1 else nn.Conv2d(o.stem_channels, o.dim, 1),
        )
        n = self.grid_size[0] * self.grid_size[1]
        self.use_cls = o.pool == "cls"
        self.cls_token = nn.Parameter(torch.zeros(1, 1, o.dim)) if self.use_cls else None
        self.pos = nn.Parameter(torch.zeros(1, n, o.dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        rates = [o.drop_path * i / max(o.depth - 1, 1) for i in range(o.depth)]
        self.blocks = nn.ModuleList(Block(o.dim, o.heads, o.mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(o.dim)
        self.feature_dim, self.num_classes = o.dim, num_classes
        self.classifier = nn.Linear(o.dim, num_classes)

    def forward_features(self, x):
        t = self.stem(x)  # [B, C, H, W]
        b, c, h, w = t.shape
        t = t.flatten(2).transpose(1, 2) + self.pos
        if self.use_cls:
            t = torch.cat([self.cls_token.expand(b, -1, -1), t], dim=1)
        for blk in self.blocks:
            t = blk(t)
        tokens = t[:, 1:] if self.use_cls else t
        grid = tokens.transpose(1, 2).reshape(b, c, h, w)  # a view: no copy of the map
        normed = self.norm(t)
        feats = normed[:, 0] if self.use_cls else normed.mean(1)
        return {"features": feats, "grid": grid, "grids": [grid]}


def _vit_builder(options: ViTOptions, *, num_classes, in_channels, image_size):
    return load_weights(SmallViT(options, num_classes, in_channels, image_size), options, "vit")


def _tiny_builder(options: TinyOptions, *, num_classes, in_channels, image_size):
    return load_weights(TinyNet(options, num_classes, in_channels), options, "tiny")


# ------------------------------------------------------------------------------ tiny


@dataclass
class TinyOptions(WeightsOptions):
    width: int = field(default=8, metadata={"ge": 1, "help": "channels of the single convolution"})


class TinyNet(Classifier):
    """One 3x3 convolution, ReLU, global average pooling: a BatchNorm-free model for
    tests and plugin authors (its gradients do not depend on how a batch is split)."""

    def __init__(self, o: TinyOptions, num_classes: int, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, o.width, 3, 1, 1)
        self.feature_dim, self.num_classes = o.width, num_classes
        self.classifier = nn.Linear(o.width, num_classes)

    def forward_features(self, x):
        return {"features": F.relu(self.conv(x)).mean(dim=(2, 3))}


@hookimpl
def register_models(register):
    for name in RESNET_DEPTHS:
        register(name, _resnet_builder(name), options=ResNetOptions)
    register("vit", _vit_builder, options=ViTOptions)
    register("tiny", _tiny_builder, options=TinyOptions)
    from .backbones import resnet, swin, vit  # they import this module's Classifier

    for module in (resnet, vit, swin):
        module.register(register)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

