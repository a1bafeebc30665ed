"""ImageNet-scale backbones (torchvision / timm layouts), weight files, the model protocol
with a third-party feature extractor, and the CIFAR ResNets' option-A shortcut.

Full-size models are only built on the meta device (no memory, no init cost); every
forward / backward runs a shrunk model on tiny images.
"""

from __future__ import annotations

import json
import math
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchkin.backbones.swin import PatchMerging, SwinBlock, attention_mask
from batchkin.backbones.vit import resample_grid
from batchkin.backbones.weights import load_state_dict_into, read_weights
from batchkin.cli import main
from batchkin.errors import ConfigError
from batchkin.models import BasicBlock, CifarResNet, PadShortcut, count_parameters
from batchkin.plugin import Plugins
from batchkin.schema import parse
from batchkin.testing import run_plugin, tiny_config

# shrunk options of every new backbone: a few thousand parameters, milliseconds per step
SMALL = {
    "resnet18": {"width": 8, "layers": [1, 1, 1, 1]},
    "resnet50": {"width": 8, "layers": [1, 2, 1, 1]},
    "resnext50_32x4d": {"width": 16, "layers": [1, 1, 1, 1], "groups": 4},
    "vit_s16": {"dim": 16, "depth": 2, "heads": 2, "patch": 4},
    "vit_b16": {"dim": 16, "depth": 2, "heads": 4, "patch": 4, "class_token": False, "pool": "mean"},
    "swin_t": {"dim": 8, "depths": [1, 2], "heads": [1, 2], "window": 2, "patch": 2, "drop_path": 0.1},
}
# torchvision's / timm's published parameter counts at 1000 classes (224 px, class token)
FULL_COUNTS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032, "resnet101": 44_549_160,
    "resnext50_32x4d": 25_028_904, "vit_s16": 22_050_664, "vit_b16": 86_567_656, "swin_t": 28_288_354,
}


@pytest.fixture(scope="module")
def models():
    return Plugins().registry.models


def build(models, name, num_classes=5, in_channels=3, image_size=(16, 16), **options):
    entry = models[name]
    return entry.obj(parse(entry.options, options, "model"), num_classes=num_classes, in_channels=in_channels,
                     image_size=image_size)


def build_full(models, name, **options):
    with torch.device("meta"):
        return build(models, name, num_classes=1000, image_size=(224, 224), **options)


def shapes(model) -> list[tuple[str, tuple]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def random_state(layout, seed=1) -> dict:
    """Random tensors for a ``[(key, shape)]`` layout (positive running variances, step counts)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in layout:
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        else:
            out[key] = torch.randn(shape, generator=gen)
    return out


def save(obj, tmp_path, name="w.pt"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


def assert_state_equal(model, sd):
    own = model.state_dict()
    assert own.keys() == sd.keys()
    for key in own:
        assert torch.equal(own[key], sd[key].to(own[key].dtype)), key


# ------------------------------------------------------------------------------ expected layouts, by hand


def torchvision_resnet_layout(block, layers, *, groups=1, width_per_group=64, width=64, in_channels=3,
                              num_classes=1000) -> list[tuple[str, tuple]]:
    """``[(key, shape)]`` of ``torchvision.models.ResNet(...).state_dict()``, written from
    torchvision's architecture: stem, four stages (the first block of a stage strides its
    3x3 convolution and has a ``downsample`` when the shape changes), ``fc``."""
    out = []

    def conv(name, cout, cin, k):
        out.append((f"{name}.weight", (cout, cin, k, k)))

    def bn(name, c):
        out.extend((f"{name}.{s}", (c,)) for s in ("weight", "bias", "running_mean", "running_var"))
        out.append((f"{name}.num_batches_tracked", ()))

    conv("conv1", width, in_channels, 7)
    bn("bn1", width)
    expansion = 4 if block == "bottleneck" else 1
    inplanes = width
    for i, n in enumerate(layers):
        planes = width * 2**i
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            if block == "basic":
                conv(f"{p}.conv1", planes, inplanes, 3), bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3), bn(f"{p}.bn2", planes)
            else:
                mid = int(planes * width_per_group / 64) * groups
                conv(f"{p}.conv1", mid, inplanes, 1), bn(f"{p}.bn1", mid)
                conv(f"{p}.conv2", mid, mid // groups, 3), bn(f"{p}.bn2", mid)
                conv(f"{p}.conv3", planes * 4, mid, 1), bn(f"{p}.bn3", planes * 4)
            if j == 0 and (i > 0 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    out += [("fc.weight", (num_classes, inplanes)), ("fc.bias", (num_classes,))]
    return out


def timm_vit_layout(dim, depth, *, patch=16, grid=14, mlp_ratio=4, in_channels=3, num_classes=1000):
    """``[(key, shape)]`` of timm's ``VisionTransformer`` (class token, no fc_norm)."""
    hidden = int(dim * mlp_ratio)
    out = [("cls_token", (1, 1, dim)), ("pos_embed", (1, 1 + grid * grid, dim)),
           ("patch_embed.proj.weight", (dim, in_channels, patch, patch)), ("patch_embed.proj.bias", (dim,))]
    for b in range(depth):
        p = f"blocks.{b}"
        out += [(f"{p}.norm1.weight", (dim,)), (f"{p}.norm1.bias", (dim,)),
                (f"{p}.attn.qkv.weight", (3 * dim, dim)), (f"{p}.attn.qkv.bias", (3 * dim,)),
                (f"{p}.attn.proj.weight", (dim, dim)), (f"{p}.attn.proj.bias", (dim,)),
                (f"{p}.norm2.weight", (dim,)), (f"{p}.norm2.bias", (dim,)),
                (f"{p}.mlp.fc1.weight", (hidden, dim)), (f"{p}.mlp.fc1.bias", (hidden,)),
                (f"{p}.mlp.fc2.weight", (dim, hidden)), (f"{p}.mlp.fc2.bias", (dim,))]
    return out + [("norm.weight", (dim,)), ("norm.bias", (dim,)),
                  ("head.weight", (num_classes, dim)), ("head.bias", (num_classes,))]


def timm_swin_layout(dim=96, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24), windows=(7, 7, 7, 7), patch=4,
                     in_channels=3, num_classes=1000):
    """``[(key, shape)]`` of timm's (>= 0.9) ``SwinTransformer`` state dict (its buffers are not saved)."""
    out = [("patch_embed.proj.weight", (dim, in_channels, patch, patch)), ("patch_embed.proj.bias", (dim,)),
           ("patch_embed.norm.weight", (dim,)), ("patch_embed.norm.bias", (dim,))]
    c = dim
    for s, depth in enumerate(depths):
        if s > 0:
            out += [(f"layers.{s}.downsample.norm.weight", (4 * c,)), (f"layers.{s}.downsample.norm.bias", (4 * c,)),
                    (f"layers.{s}.downsample.reduction.weight", (2 * c, 4 * c))]
            c *= 2
        for b in range(depth):
            p = f"layers.{s}.blocks.{b}"
            out += [(f"{p}.norm1.weight", (c,)), (f"{p}.norm1.bias", (c,)),
                    (f"{p}.attn.relative_position_bias_table", ((2 * windows[s] - 1) ** 2, heads[s])),
                    (f"{p}.attn.qkv.weight", (3 * c, c)), (f"{p}.attn.qkv.bias", (3 * c,)),
                    (f"{p}.attn.proj.weight", (c, c)), (f"{p}.attn.proj.bias", (c,)),
                    (f"{p}.norm2.weight", (c,)), (f"{p}.norm2.bias", (c,)),
                    (f"{p}.mlp.fc1.weight", (4 * c, c)), (f"{p}.mlp.fc1.bias", (4 * c,)),
                    (f"{p}.mlp.fc2.weight", (c, 4 * c)), (f"{p}.mlp.fc2.bias", (c,))]
    return out + [("norm.weight", (c,)), ("norm.bias", (c,)),
                  ("head.fc.weight", (num_classes, c)), ("head.fc.bias", (num_classes,))]


def vit_parameter_count(dim, depth, *, mlp_ratio=4, patch=16, tokens=196, class_token=True, in_channels=3,
                        num_classes=1000) -> int:
    """ViT parameters counted by hand: patch conv, class token, position embeddings, blocks
    (2 LayerNorms, qkv, proj, 2-layer MLP, all with biases), final norm, head."""
    hidden = int(dim * mlp_ratio)
    block = 4 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return (in_channels * patch * patch * dim + dim + class_token * dim + (tokens + class_token) * dim
            + depth * block + 2 * dim + dim * num_classes + num_classes)


# ------------------------------------------------------------------------------ sizes and layouts


@pytest.mark.parametrize("name", sorted(FULL_COUNTS))
def test_full_size_parameter_counts(models, name):
    assert count_parameters(build_full(models, name)) == FULL_COUNTS[name]


def test_vit_counts_by_hand():
    assert vit_parameter_count(384, 12) == FULL_COUNTS["vit_s16"]
    assert vit_parameter_count(768, 12) == FULL_COUNTS["vit_b16"]


@pytest.mark.parametrize("name, block, layers, extra, n_keys", [
    ("resnet18", "basic", [2, 2, 2, 2], {}, 122),
    ("resnet50", "bottleneck", [3, 4, 6, 3], {}, 320),
    ("resnext50_32x4d", "bottleneck", [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}, 320),
])
def test_resnet_state_dict_is_torchvisions(models, name, block, layers, extra, n_keys):
    expected = torchvision_resnet_layout(block, layers, **extra)
    assert len(expected) == n_keys
    assert shapes(build_full(models, name)) == expected


def test_vit_and_swin_state_dicts_are_timms(models):
    assert shapes(build_full(models, "vit_s16")) == timm_vit_layout(384, 12)
    assert shapes(build_full(models, "vit_b16")) == timm_vit_layout(768, 12)
    swin = shapes(build_full(models, "swin_t"))
    assert len(swin) == 173 and swin == timm_swin_layout()


def test_defaults_come_from_the_model_name(models):
    def defaults(name):
        return parse(models[name].options, {}, "model")

    assert (defaults("vit_s16").dim, defaults("vit_b16").dim, defaults("vit_b16").heads) == (384, 768, 12)
    assert defaults("resnet50").layers == [3, 4, 6, 3] and defaults("resnet50").block == "bottleneck"
    assert (defaults("resnext50_32x4d").groups, defaults("resnext50_32x4d").width_per_group) == (32, 4)
    a, b = defaults("resnet18"), defaults("resnet18")
    a.layers.append(9)
    assert b.layers == [2, 2, 2, 2]  # no shared default list
    assert defaults("swin_t").depths == [2, 2, 6, 2] and defaults("swin_t").weights == ""


# ------------------------------------------------------------------------------ every backbone trains


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_backward_on_tiny_images(models, name):
    torch.manual_seed(0)
    model = build(models, name, image_size=(12, 20), **SMALL[name])
    x = torch.randn(3, 3, 12, 20)
    out = model(x, return_features=True)
    assert out["features"].shape == (3, model.feature_dim)
    logits = model.classifier(out["features"])
    assert logits.shape == (3, 5)
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    torch.testing.assert_close(model(x), model.classifier(model.forward_features(x)["features"]))
    # another image size (DINO's local crops) works too
    assert model.forward_features(torch.randn(2, 3, 7, 9))["features"].shape == (2, model.feature_dim)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_one_training_step_through_the_engine(name):
    config = tiny_config(["ce"], data={"synthetic_shape": [3, 16, 16], "batch_size": 8},
                         model={"name": name, **SMALL[name]})
    state = run_plugin(["ce"], steps=1, config=config)
    assert state.step == 1 and "ce" in state.loss_terms


def test_cli_trains_an_imagenet_resnet_and_records_its_options(tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "--quiet", "--out", str(out), "--set", "epochs=1", "--set", "device=cpu",
               "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[3, 16, 16]",
               "--set", "data.synthetic_per_class=8", "--set", "data.batch_size=8",
               "--set", "model.name=resnet50", "--set", "model.width=8", "--set", "model.layers=[1, 1, 1, 1]"])
    assert rc == 0
    config = (out / "config.toml").read_text()
    assert 'name = "resnet50"' in config and "layers = [1, 1, 1, 1]" in config and 'block = "bottleneck"' in config
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["kind"] == "final" and 0.0 <= final["test/top1"] <= 1.0


# ------------------------------------------------------------------------------ weight files


def test_torchvision_state_dict_loads(models, tmp_path):
    layout = torchvision_resnet_layout("bottleneck", [1, 2, 1, 1], width=8, num_classes=5)
    sd = random_state(layout)
    model = build(models, "resnet50", weights=save(sd, tmp_path), **SMALL["resnet50"])
    assert_state_equal(model, sd)
    # the same through a training checkpoint's wrapper, with DistributedDataParallel's prefix
    wrapped = {"epoch": 90, "state_dict": {f"module.{k}": v for k, v in sd.items()}}
    assert_state_equal(build(models, "resnet50", weights=save(wrapped, tmp_path, "c.pth"), **SMALL["resnet50"]), sd)
    # files without num_batches_tracked (older torchvision) load too
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model = build(models, "resnet50", weights=save({"model": old}, tmp_path, "old.pt"), **SMALL["resnet50"])
    assert torch.equal(model.layer1[0].conv2.weight, sd["layer1.0.conv2.weight"])


@pytest.mark.parametrize("name, block, extra", [
    ("resnet18", "basic", {}), ("resnext50_32x4d", "bottleneck", {"groups": 4, "width_per_group": 4}),
])
def test_torchvision_state_dicts_of_other_resnets_load(models, tmp_path, name, block, extra):
    o = SMALL[name]
    sd = random_state(torchvision_resnet_layout(block, o["layers"], width=o["width"], num_classes=5, **extra))
    assert_state_equal(build(models, name, weights=save(sd, tmp_path), **o), sd)


def test_timm_vit_state_dict_loads(models, tmp_path):
    sd = random_state(timm_vit_layout(16, 2, patch=4, grid=4, num_classes=5))
    assert_state_equal(build(models, "vit_s16", weights=save(sd, tmp_path), **SMALL["vit_s16"]), sd)


def test_timm_swin_state_dict_loads_and_the_old_layout_is_renamed(models, tmp_path):
    o = SMALL["swin_t"]
    sd = random_state(timm_swin_layout(8, [1, 2], [1, 2], windows=[2, 2], patch=2, num_classes=5))
    model = build(models, "swin_t", weights=save(sd, tmp_path), **o)
    assert_state_equal(model, sd)
    # timm < 0.9 / the original release: downsample at the end of the stage before, "head",
    # and the relative position index stored as a buffer
    old = {k.replace("layers.1.downsample", "layers.0.downsample").replace("head.fc.", "head."): v
           for k, v in sd.items()}
    old["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(4, 4, dtype=torch.long)
    assert_state_equal(build(models, "swin_t", weights=save({"model": old}, tmp_path, "old.pt"), **o), sd)


ALL_SMALL = {**SMALL, "resnet8": {"width": 4}, "vit": {"dim": 16, "depth": 1, "heads": 2, "stem_channels": 4},
             "tiny": {"width": 4}}


@pytest.mark.parametrize("name", sorted(ALL_SMALL))
def test_weights_round_trip_gives_identical_outputs(models, tmp_path, name):
    torch.manual_seed(0)
    trained = build(models, name, **ALL_SMALL[name])
    trained(torch.randn(4, 3, 16, 16))  # moves BatchNorm running statistics off their init
    path = save(trained.state_dict(), tmp_path)
    torch.manual_seed(1)
    fresh = build(models, name, weights=path, **ALL_SMALL[name])
    x = torch.randn(2, 3, 16, 16)
    trained.eval(), fresh.eval()
    assert torch.equal(trained(x), fresh(x))


def test_a_batchkin_checkpoint_and_its_encoder_load_with_a_prefix(models, tmp_path):
    torch.manual_seed(0)
    enc = build(models, "resnet18", **SMALL["resnet18"])
    head = nn.Linear(enc.feature_dim, 3)
    ckpt = {"format": 1, "epoch": 3, "model": {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
                                               **{f"head.{k}": v for k, v in head.state_dict().items()}}}
    path = save(ckpt, tmp_path)
    torch.manual_seed(1)
    model = build(models, "resnet18", weights=path, weights_prefix="encoder.", **SMALL["resnet18"])
    assert_state_equal(model, enc.state_dict())
    with pytest.raises(ConfigError) as err:
        build(models, "resnet18", weights=path, **SMALL["resnet18"])
    msg = str(err.value)
    n = len(enc.state_dict())
    assert "\n" not in msg and f"set model.weights_prefix = 'encoder.' ({n} keys match without it)" in msg
    with pytest.raises(ConfigError, match=r"no key of .* starts with model\.weights_prefix = 'student\.'"):
        build(models, "resnet18", weights=path, weights_prefix="student.", **SMALL["resnet18"])


def test_mismatched_file_is_one_line_naming_the_first_keys(models, tmp_path):
    sd = random_state(torchvision_resnet_layout("bottleneck", [1, 2, 1, 1], width=8, num_classes=5))
    for key in ("layer1.0.bn3.weight", "layer1.0.bn3.bias", "layer2.0.conv1.weight", "layer2.1.conv1.weight"):
        del sd[key]
    sd["conv1.weight"] = torch.zeros(8, 3, 3, 3)
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError) as err:
        build(models, "resnet50", weights=save(sd, tmp_path), **SMALL["resnet50"])
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"model.weights: {tmp_path / 'w.pt'} does not fit model 'resnet50': ")
    assert "4 missing keys (layer1.0.bn3.weight, layer1.0.bn3.bias, layer2.0.conv1.weight, ...)" in msg
    assert "1 unexpected keys (layer5.0.conv1.weight)" in msg
    assert "1 shape mismatches (conv1.weight: file [8, 3, 3, 3], model [8, 3, 7, 7])" in msg


def test_the_classifier_is_reinitialised_when_the_classes_differ(models, tmp_path):
    layout = torchvision_resnet_layout("basic", [1, 1, 1, 1], width=8, num_classes=1000)
    sd = random_state(layout)
    torch.manual_seed(3)
    fresh = build(models, "resnet18", **SMALL["resnet18"])
    torch.manual_seed(3)
    model = build(models, "resnet18", weights=save(sd, tmp_path), **SMALL["resnet18"])
    assert torch.equal(model.layer4[0].conv2.weight, sd["layer4.0.conv2.weight"])
    assert torch.equal(model.fc.weight, fresh.fc.weight) and torch.equal(model.fc.bias, fresh.fc.bias)
    # a headless file (a feature extractor's) leaves the classifier as initialised too
    headless = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    report = load_state_dict_into(fresh, headless, source="x", name="resnet18")
    assert report["reinitialised"] == ["fc.bias", "fc.weight"] and len(report["loaded"]) == len(headless)


def test_a_three_channel_input_conv_loads_into_a_one_channel_model(models, tmp_path):
    sd = random_state(torchvision_resnet_layout("basic", [1, 1, 1, 1], width=8, num_classes=5))
    model = build(models, "resnet18", in_channels=1, weights=save(sd, tmp_path), **SMALL["resnet18"])
    assert torch.allclose(model.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])


class _WritesAFile:
    """Pickled, this creates a file when loaded by an unrestricted unpickler."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unreadable_weight_files(models, tmp_path):
    def error(path, **extra):
        with pytest.raises(ConfigError) as err:
            build(models, "tiny", weights=str(path), **extra)
        assert "\n" not in str(err.value)
        return str(err.value)

    assert error(tmp_path / "nope.pt") == f"model.weights: no such file: {tmp_path / 'nope.pt'}"
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": _WritesAFile(str(marker))}, evil)
    assert "cannot be read with torch.load(weights_only=True)" in error(evil)
    assert not marker.exists()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert "cannot be read with torch.load(weights_only=True)" in error(tmp_path / "junk.pt")
    assert error(save({"epoch": 3, "optimizer": {}}, tmp_path, "opt.pt")).endswith(
        "holds no state dict (a table of tensors, or one under state_dict / model / model_state_dict / module); "
        "it holds a table with the keys epoch, optimizer")
    assert error(save([torch.zeros(1)], tmp_path, "list.pt")).endswith("it holds list")


def write_safetensors(path, tensors: dict) -> None:
    """The .safetensors format, written by hand: u64 header length, JSON header, raw bytes."""
    names = {torch.float32: "F32", torch.int64: "I64", torch.float16: "F16"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, t in tensors.items():
        blob = t.contiguous().numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_safetensors_files_load(models, tmp_path):
    sd = random_state(timm_vit_layout(16, 2, patch=4, grid=4, num_classes=5))
    sd["head.bias"] = sd["head.bias"].half()
    path = tmp_path / "model.safetensors"
    write_safetensors(path, sd)
    assert {k: v.dtype for k, v in read_weights(path).items()} == {k: v.dtype for k, v in sd.items()}
    assert_state_equal(build(models, "vit_s16", weights=str(path), **SMALL["vit_s16"]), sd)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=r"model\.safetensors is not a valid \.safetensors file \(tensor "
                                          r"'[\w.]+' \(\w+ \[[\d, ]+\]\) does not fit its data offsets\)"):
        read_weights(path)


def test_weights_errors_through_the_cli_leave_the_run_folder_alone(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("epochs = 3\n")
    (run / "run.json").write_text('{"batchkin": "0.1.0"}\n')  # a batchkin run: --overwrite may replace it
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    sd = random_state(torchvision_resnet_layout("basic", [1, 1, 1, 1], width=4, num_classes=3))
    rc = main(["train", "--quiet", "--overwrite", "--out", str(run), "--set", "device=cpu",
               "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[3, 16, 16]",
               "--set", "model.name=resnet18", "--set", "model.layers=[1, 1, 1, 1]",
               "--set", f"model.weights={json.dumps(save(sd, tmp_path))}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("batchkin: error: model.weights: ") and "does not fit model 'resnet18'" in err[0]
    assert "shape mismatches (conv1.weight: file [4, 3, 7, 7], model [64, 3, 7, 7]" in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ------------------------------------------------------------------------------ ResNet


def test_resnet_protocol_parts_are_views_of_torchvisions_modules(models):
    torch.manual_seed(0)
    model = build(models, "resnet50", **SMALL["resnet50"]).eval()
    x = torch.randn(2, 3, 16, 16)
    assert model.classifier is model.fc and model.pool is model.avgpool and model.last_block is model.layer4[-1]
    assert torch.equal(model.classifier(model.pool(model.last_block(model.trunk(x))).flatten(1)), model(x))
    parts = (model.trunk, model.last_block, model.classifier)
    assert sum(count_parameters(p) for p in parts) == count_parameters(model)
    assert not any(k.startswith(("trunk.", "last_block.", "classifier.", "pool.")) for k in model.state_dict())


def test_bbn_wraps_an_imagenet_resnet_without_duplicating_it(models):
    from batchkin.plugins.bbn import BilateralNet

    backbone = build(models, "resnet18", **SMALL["resnet18"])
    net = BilateralNet(backbone)
    assert {n for n, _ in net.named_children()} == {"trunk", "cb_block", "rb_block", "pool", "classifier"}
    last = count_parameters(backbone.last_block)
    trunk = count_parameters(backbone) - last - count_parameters(backbone.fc)
    assert count_parameters(net) == trunk + 2 * last + (2 * 64 + 1) * 5
    config = tiny_config(["bbn"], data={"synthetic_shape": [3, 16, 16], "batch_size": 8},
                         model={"name": "resnet18", **SMALL["resnet18"]})
    state = run_plugin(["bbn"], steps=1, config=config)
    assert isinstance(state.model, BilateralNet) and "bbn" in state.loss_terms


def test_resnet_stems_and_zero_init_residual(models):
    torch.manual_seed(0)
    small = build(models, "resnet18", image_size=(32, 32), stem="small", **SMALL["resnet18"]).eval()
    big = build(models, "resnet18", image_size=(32, 32), **SMALL["resnet18"]).eval()
    assert small.conv1.weight.shape == (8, 3, 3, 3) and isinstance(small.maxpool, nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    assert small.last_block(small.trunk(x)).shape[-2:] == (4, 4) and big.last_block(big.trunk(x)).shape[-2:] == (1, 1)
    model = build(models, "resnet50", zero_init_residual=True, **SMALL["resnet50"]).eval()
    for block in (model.layer1[0], model.layer2[1]):
        assert torch.count_nonzero(block.bn3.weight) == 0
        h = torch.randn(2, block.conv1.in_channels, 4, 4)
        shortcut = h if block.downsample is None else block.downsample(h)
        assert torch.equal(block(h), F.relu(shortcut))


@pytest.mark.parametrize("options, message", [
    ({"layers": [1, 1, 1]}, "model.layers must list the blocks of 4 stages; got [1, 1, 1]"),
    ({"groups": 4}, "model.groups and width_per_group apply to the bottleneck block"),
])
def test_resnet_options_are_checked(models, options, message):
    with pytest.raises(ConfigError) as err:
        parse(models["resnet18"].options, options, "model")
    assert str(err.value).startswith(message)


def test_a_bottleneck_without_channels_is_refused(models):
    with pytest.raises(ConfigError, match="a bottleneck of 8 planes with width_per_group = 4 has no channels"):
        build(models, "resnext50_32x4d", width=8, layers=[1, 1, 1, 1])


# ------------------------------------------------------------------------------ ViT


def test_vit_grid_and_features(models):
    torch.manual_seed(0)
    model = build(models, "vit_s16", image_size=(8, 12), **SMALL["vit_s16"]).eval()
    x = torch.randn(2, 3, 8, 12)
    out = model.forward_features(x)
    assert out["grid"].shape == (2, 16, 2, 3) and out["grids"] == [out["grid"]]
    # the grid is the last block's patch tokens (class token removed), before the final norm
    t = model.patch_embed(x).reshape(2, 6, 16)
    t = torch.cat([model.cls_token.expand(2, -1, -1), t], 1) + model.pos_embed
    t = model.blocks(t)
    torch.testing.assert_close(out["grid"].flatten(2).transpose(1, 2), t[:, 1:])
    torch.testing.assert_close(out["features"], model.norm(t)[:, 0])
    mean = build(models, "vit_b16", image_size=(8, 12), **SMALL["vit_b16"]).eval()
    out = mean.forward_features(x)
    assert mean.cls_token is None and mean.pos_embed.shape == (1, 6, 16)
    torch.testing.assert_close(out["features"], mean.norm(out["grid"].flatten(2).transpose(1, 2)).mean(1))


def test_vit_pads_images_that_are_not_multiples_of_the_patch(models):
    torch.manual_seed(0)
    model = build(models, "vit_s16", image_size=(12, 16), **SMALL["vit_s16"]).eval()
    x = torch.randn(2, 3, 10, 14)
    padded = F.pad(x, (0, 2, 0, 2))
    assert model.forward_features(x)["grid"].shape == (2, 16, 3, 4)
    assert torch.equal(model(x), model(padded))


def test_vit_interpolates_position_embeddings_at_other_sizes(models):
    torch.manual_seed(0)
    model = build(models, "vit_s16", image_size=(16, 16), **SMALL["vit_s16"])
    assert torch.equal(model.position_embeddings((4, 4)), model.pos_embed)
    grid = model.pos_embed[:, 1:].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(model.position_embeddings((2, 3)), torch.cat([model.pos_embed[:, :1], expected], 1))


def test_vit_weights_of_another_grid_are_resampled(models, tmp_path):
    torch.manual_seed(0)
    big = build(models, "vit_s16", image_size=(32, 32), **SMALL["vit_s16"])  # an 8x8 grid
    path = save(big.state_dict(), tmp_path)
    model = build(models, "vit_s16", image_size=(16, 16), weights=path, **SMALL["vit_s16"])
    expected = torch.cat([big.pos_embed[:, :1], resample_grid(big.pos_embed[:, 1:], (8, 8), (4, 4))], 1)
    assert torch.equal(model.pos_embed, expected)
    assert torch.equal(model.blocks[1].mlp.fc2.weight, big.blocks[1].mlp.fc2.weight)
    # a model without a class token takes the file's patch embeddings and drops its class token
    no_cls = build(models, "vit_s16", image_size=(16, 16), weights=path, class_token=False, pool="mean",
                   **SMALL["vit_s16"])
    assert torch.equal(no_cls.pos_embed, expected[:, 1:])


def test_vit_options_are_checked(models):
    with pytest.raises(ConfigError, match=r"model\.pool = 'cls' needs class_token = true"):
        parse(models["vit_s16"].options, {"class_token": False}, "model")
    with pytest.raises(ConfigError, match=r"model\.dim \(20\) must be divisible by heads \(6\)"):
        parse(models["vit_s16"].options, {"dim": 20}, "model")


# ------------------------------------------------------------------------------ Swin


def swin_block_reference(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """A Swin block computed densely, one image ``[H, W, C]`` at a time: token (i, j) attends
    to the tokens of its window in the grid shifted by ``-shift`` (windows tiled from the
    top-left, the grid padded to whole windows), except those that wrapped around the
    cyclic shift when it did not (and vice versa); bias from the relative offset."""
    h, w, c = x.shape
    (wh, ww), heads = block.window, block.attn.heads
    sh, sw = (block.shift[0] if h > wh else 0), (block.shift[1] if w > ww else 0)
    hp, wp = h + (-h % wh), w + (-w % ww)
    i, j = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    same = [((i - sh) % hp) // wh, ((j - sw) % wp) // ww, i < sh, j < sw]
    allowed = torch.stack([s[:, None] == s[None, :] for s in same]).all(0)
    idx = (i[:, None] - i[None, :] + wh - 1) * (2 * ww - 1) + (j[:, None] - j[None, :] + ww - 1)
    table = block.attn.relative_position_bias_table
    bias = table[idx.clamp(0, table.shape[0] - 1)].permute(2, 0, 1)
    tokens = x.reshape(h * w, c)
    q, k, v = block.attn.qkv(block.norm1(tokens)).reshape(h * w, 3, heads, c // heads).permute(1, 2, 0, 3)
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(c // heads) + bias
    out = (logits.masked_fill(~allowed, float("-inf")).softmax(-1) @ v).permute(1, 0, 2).reshape(h * w, c)
    y = tokens + block.attn.proj(out)
    return (y + block.mlp(block.norm2(y))).reshape(h, w, c)


@pytest.mark.parametrize("h, w, window, shift", [
    (5, 7, (3, 3), (1, 1)),  # padded and shifted
    (3, 8, (3, 4), (1, 2)),  # rows fit one window: shifted along the columns only
    (5, 5, (2, 2), (0, 0)),  # padded, not shifted
    (6, 6, (3, 3), (1, 1)),  # neither padded nor
    (4, 4, (4, 4), (2, 2)),  # one window: no mask at all
])
def test_swin_block_matches_dense_masked_attention(h, w, window, shift):
    torch.manual_seed(0)
    block = SwinBlock(8, 2, window, shift).eval()
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, h, w, 8)
    got = block(x)
    for b in range(2):
        torch.testing.assert_close(got[b], swin_block_reference(block, x[b]), rtol=1e-5, atol=1e-5)
    assert (attention_mask(h, w, window, (0, 0)) is None) == (h % window[0] == 0 and w % window[1] == 0)


def test_patch_merging_order_and_odd_grids():
    merge = PatchMerging(1, 4)
    merge.norm = nn.Identity()
    with torch.no_grad():
        merge.reduction.weight.copy_(torch.eye(4))
    x = torch.arange(1.0, 16.0).reshape(1, 3, 5, 1)  # a 3x5 grid: padded to 4x6
    out = merge(x)
    assert out.shape == (1, 2, 3, 4)
    # (0,0), (1,0), (0,1), (1,1) of each 2x2 neighbourhood; padding is zero
    assert out[0, 0, 0].tolist() == [1.0, 6.0, 2.0, 7.0]
    assert out[0, 1, 2].tolist() == [15.0, 0.0, 0.0, 0.0]


def test_swin_stage_grids_for_a_non_square_image(models):
    torch.manual_seed(0)
    model = build(models, "swin_t", image_size=(12, 20), dim=8, depths=[1, 2, 1], heads=[1, 2, 2], window=3,
                  patch=2, drop_path=0.0).eval()
    x = torch.randn(2, 3, 12, 20)
    out = model.forward_features(x)
    assert [tuple(g.shape) for g in out["grids"]] == [(2, 8, 6, 10), (2, 16, 3, 5), (2, 32, 2, 3)]
    assert model.grid_sizes == [(6, 10), (3, 5), (2, 3)] and out["grid"] is out["grids"][-1]
    last = model.layers[2].blocks[0]
    assert last.window == (2, 3) and last.attn.relative_position_bias_table.shape == (3 * 5, 2)
    # a side no longer than the window is not shifted
    assert model.layers[0].blocks[0].shift == (0, 0) and model.layers[1].blocks[1].shift == (0, 1)
    torch.testing.assert_close(out["features"], model.norm(out["grid"].permute(0, 2, 3, 1)).mean((1, 2)))


def test_swin_options_are_checked(models):
    with pytest.raises(ConfigError, match=r"model\.heads \(\[1\]\) must give one count per stage"):
        parse(models["swin_t"].options, {"depths": [1, 1], "heads": [1]}, "model")
    with pytest.raises(ConfigError, match=r"model\.heads\[1\] = 3 must divide stage 1's width 16"):
        parse(models["swin_t"].options, {"dim": 8, "depths": [1, 1], "heads": [1, 3]}, "model")


@pytest.mark.parametrize("name, options", [
    ("swin_t", {**SMALL["swin_t"], "depths": [1, 1, 1], "heads": [1, 2, 2]}), ("vit_s16", SMALL["vit_s16"]),
])
def test_drloc_trains_on_the_token_grids(name, options):
    config = tiny_config(["ce", "drloc"], data={"synthetic_shape": [3, 16, 16], "batch_size": 8},
                         model={"name": name, **options}, drloc={"multiscale": True, "m": 4, "hidden": 8})
    state = run_plugin(["ce", "drloc"], steps=1, config=config)
    assert len(state.unwrapped_model.drloc) == (3 if name == "swin_t" else 1)
    assert "drloc" in state.loss_terms


# ------------------------------------------------------------------------------ CIFAR ResNets: option A


def test_pad_shortcut_is_parameter_free_subsampling_and_zero_channels():
    shortcut = PadShortcut(4, 8, 2)
    assert list(shortcut.parameters()) == []
    x = torch.randn(2, 4, 6, 6)
    out = shortcut(x)
    assert out.shape == (2, 8, 3, 3)
    assert torch.equal(out[:, 2:6], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :2]) == 0 and torch.count_nonzero(out[:, 6:]) == 0
    block = BasicBlock(4, 8, 2, shortcut="pad")
    assert isinstance(block.shortcut, PadShortcut) and block(x).shape == (2, 8, 3, 3)
    assert count_parameters(block) == 4 * 8 * 9 + 8 * 8 * 9 + 4 * 8  # two convs, two BatchNorms


def test_resnet32_with_option_a_has_the_ldam_parameter_count(models):
    # stem 3*16*9 + 32; stage 1: 5 * (2 * 16*16*9 + 64); stage 2: 16*32*9 + 32*32*9 + 128 + 4 * (2 * 32*32*9 + 128);
    # stage 3: 32*64*9 + 64*64*9 + 256 + 4 * (2 * 64*64*9 + 256); fc 64*10 + 10
    ldam = 464 + 23_360 + 88_192 + 351_488 + 650
    assert ldam == 464_154
    pad = build(models, "resnet32", num_classes=10, image_size=(32, 32), shortcut="pad")
    assert count_parameters(pad) == ldam
    assert all(isinstance(m.shortcut, (PadShortcut, nn.Identity)) for m in pad.modules() if isinstance(m, BasicBlock))
    default = build(models, "resnet32", num_classes=10, image_size=(32, 32))
    assert count_parameters(default) == ldam + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two projections
    assert pad(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_option_a_resnet_trains_and_keeps_bbns_split():
    model = CifarResNet([1, 1, 1], 4, 3, width=4, shortcut="pad").eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.classifier(model.pool(model.last_block(model.trunk(x))).flatten(1)), model(x))
    config = tiny_config(["bbn"], data={"synthetic_shape": [3, 8, 8]},
                         model={"name": "resnet8", "width": 4, "shortcut": "pad"})
    assert "bbn" in run_plugin(["bbn"], steps=1, config=config).loss_terms


# ------------------------------------------------------------------------------ the model protocol, third party


PROTOCOL_PLUGIN = """
    from torch import nn

    from batchkin.hookspecs import hookimpl


    class Wrapped(nn.Module):
        # a foreign feature extractor (timm's num_classes=0 model, torchvision's with fc = Identity)
        def __init__(self, net, feature_dim, num_classes, head=True):
            super().__init__()
            self.net, self.num_classes = net, num_classes
            if feature_dim:
                self.feature_dim = feature_dim
            if head:
                self.classifier = nn.Linear(feature_dim or 8, num_classes)

        def forward_features(self, x):
            return {"features": self.net(x)}


    def extractor(in_channels):
        return nn.Sequential(nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten())


    @hookimpl
    def register_models(register):
        register("plain", lambda o, *, num_classes, in_channels, image_size: Wrapped(extractor(in_channels), 8, num_classes))
        register("no_dim", lambda o, *, num_classes, in_channels, image_size: Wrapped(extractor(in_channels), 0, num_classes))
        register("headless", lambda o, *, num_classes, in_channels, image_size: Wrapped(extractor(in_channels), 8, num_classes, False))
"""


@pytest.mark.parametrize("methods, term, wrapper", [
    (["ce"], "ce", "Wrapped"), (["ce", "batchformer"], "ce", "Wrapped"), (["moco"], "moco", "SSLNet"),
])
def test_a_plain_module_trains_with_each_kind_of_method(plugin_file, methods, term, wrapper):
    path = plugin_file("protocol_models", PROTOCOL_PLUGIN)
    config = tiny_config(methods, data={"synthetic_shape": [3, 8, 8], "augment": methods != ["moco"]},
                         model={"name": "plain"})
    state = run_plugin(methods, steps=1, config=config, plugin_files=[path])
    assert state.step == 1 and term in state.loss_terms
    assert type(state.unwrapped_model).__name__ == wrapper
    if "batchformer" in methods:  # the batch-attention stream doubles the classified rows
        assert hasattr(state.unwrapped_model, "batchformer")


@pytest.mark.parametrize("model, methods, fragment", [
    ("headless", "ce", "model 'headless' does not follow batchkin's model protocol: it has no classifier"),
    ("plain", "bbn", "bbn needs a model that exposes trunk and last_block"),
    ("plain", "ce,drloc", "drloc needs a model whose forward_features returns a token grid"),
    ("no_dim", "ce,batchformer", "batchformer needs a model with an integer feature_dim"),
])
def test_a_model_lacking_what_a_method_needs_is_one_line(plugin_file, tmp_path, capsys, model, methods, fragment):
    path = plugin_file("protocol_models", PROTOCOL_PLUGIN)
    out = tmp_path / "run"
    listed = json.dumps(methods.split(","))
    rc = main(["train", "--quiet", "--plugin", str(path), "--out", str(out), "--set", "device=cpu",
               "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[3, 8, 8]",
               "--set", f"methods={listed}", "--set", f"model.name={model}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("batchkin: error: ")
    assert fragment in err[0]
    assert not out.exists() or not os.listdir(out)


# ------------------------------------------------------------------------------ the documentation


def test_docs_list_every_builtin_model_option_and_count(models):
    import dataclasses
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme, page = (root / "README.md").read_text(), (root / "docs" / "models.md").read_text()
    builtin = [n for n, e in models.items() if e.origin == "builtin" and n != "vit_hier"]
    for name in builtin:
        assert f"`{name}`" in page, name
        doc = page if name in FULL_COUNTS else readme
        for f in dataclasses.fields(models[name].options):
            assert f"`model.{f.name}`" in doc, f"{name}: model.{f.name}"
    for name, count in FULL_COUNTS.items():
        assert f"{count:,}" in page, name
    assert "[models.md](models.md)" in (root / "docs" / "plugins.md").read_text()
