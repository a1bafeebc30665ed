"""ImageNet-scale backbones with the parameter names of torchvision and timm.

* :mod:`batchkin.backbones.resnet` — ResNet-18/34/50/101 and ResNeXt-50 32x4d laid out as
  torchvision's ``ResNet`` (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``);
* :mod:`batchkin.backbones.vit` — ViT-S/16 and ViT-B/16 laid out as timm's
  ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed``, ``blocks.N``,
  ``norm``, ``head``);
* :mod:`batchkin.backbones.swin` — a Swin-T-like hierarchical ViT (shifted windows,
  relative position bias, patch merging) laid out as timm's ``SwinTransformer``;
* :mod:`batchkin.backbones.weights` — ``model.weights = "file.pt"``: reading a local
  state-dict file and loading it with one-line errors.

They are registered by :mod:`batchkin.models` and follow its model protocol
(``docs/models.md``). This package imports nothing at load time so that
:mod:`batchkin.models` and the backbones can import each other's pieces.
"""
