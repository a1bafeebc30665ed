"""The paper recipes (configs/recipes/): each states the paper's hyperparameters, loads through
the command line and trains one optimizer step on a tiny dataset written in the recipe's own
format, and is listed in docs/recipes.md.

The datasets are made here, in a temporary folder, in the format each recipe reads, so the
recipe runs with nothing but ``--set data.root=...`` and the overrides a CPU needs:

* CIFAR recipes: a CIFAR-10 / CIFAR-100 python-format folder (pickled ``data`` / ``labels``
  batches, the real class count), 32x32x3 noise images, 2 training images of class 0 and 1
  of every other class (so a long-tailed recipe's ``data.imbalance_factor`` is lowered to 2:
  LDAM/BBN's profile needs ``n_max >= IF``), 1 test image per class;
* iNaturalist 2018: ``train2018.json`` / ``val2018.json`` (COCO-style, category ids that are
  not 0..K-1) over JPEGs under ``train_val2018/``;
* ImageNet-LT: ``ImageNet_LT_{train,val,test}.txt`` list files over JPEGs;
* image folders (DRLoc's CIFAR-as-PNG, ImageNet for MoCo v3): ``train/`` and ``test/`` with
  one subfolder per class.

Every run has exactly one optimizer step: ``N`` training images and batch ``B`` with
``B <= N < 2B`` (the last incomplete batch is dropped). The ImageNet-scale models stay full
size at 224 px (a step of batch 2-3 takes seconds on one CPU core); the one exception is
drloc_cifar100_vit, whose 100 classes need a batch of 64, run with one transformer block
(``model.depth = 1``) instead of twelve.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from batchkin.cli import main
from batchkin.config import apply_overrides, load_raw

from _common import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "configs" / "recipes"
DOCS = ROOT / "docs" / "recipes.md"

# ------------------------------------------------------------------------------ what each recipe must say

_BBN_CIFAR = {
    "epochs": 200, "data.imbalance_factor": 100, "data.val_fraction": 0.0, "data.batch_size": 128,
    "data.crop_padding": 4, "model.name": "resnet32", "model.shortcut": "pad", "optim.name": "sgd",
    "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 2e-4, "schedule.name": "step",
    "schedule.warmup_epochs": 5, "schedule.warmup_start": 1 / 3, "schedule.milestones": [120, 160],
    "schedule.gamma": 0.01,
}
_BBN = {"bbn.sampler": "reversed", "bbn.alpha_schedule": "parabolic_decay", "bbn.fused": False}
_DRLOC_UPSTREAM = {  # VTs-Drloc (Swin's training code): lr 5e-4 x 1024 / 512, warm-up from 5e-7, floor 5e-6
    "epochs": 100, "optim.name": "adamw", "optim.lr": 1e-3, "optim.weight_decay": 0.05,
    "optim.no_decay_norm_bias": True, "schedule.name": "cosine", "schedule.warmup_epochs": 20,
    "schedule.warmup_start": 0.001, "schedule.min_lr": 0.01, "train.grad_clip": 5.0, "ce.label_smoothing": 0.1,
    "drloc.head": "l1", "drloc.mode": "abs", "drloc.normalize": False, "drloc.m": 64, "drloc.hidden": 512,
    "drloc.schedule": "warmup_decay", "drloc.warmup_epochs": 20, "data.val_fraction": 0.0,
}
_MOCO_V3 = {  # MoCo v3 ViT-S as SDMP's command: AdamW 1.5e-4 x 1024 / 256, wd 0.1, warm-up 40 from 0
    "methods": ["moco", "sdmp"], "optim.name": "adamw", "optim.lr": 6e-4, "optim.weight_decay": 0.1,
    "optim.no_decay_norm_bias": False, "schedule.name": "cosine", "schedule.warmup_epochs": 40,
    "schedule.warmup_start": 0.0, "schedule.min_lr": 0.0, "moco.temperature": 0.2, "moco.momentum": 0.99,
    "moco.proj_layers": 3, "moco.proj_hidden": 4096, "moco.proj_dim": 256, "moco.pred_hidden": 4096,
    "moco.views.crop_scale": [0.08, 1.0], "moco.views.jitter": [0.4, 0.4, 0.2, 0.1], "moco.views.jitter_prob": 0.8,
    "moco.views.grayscale_prob": 0.2, "moco.views.solarize_prob": [0.0, 0.2],
    "sdmp.ops": ["mixup", "cutmix", "resizemix"], "sdmp.weight_ms": 0.5, "sdmp.weight_mm": 0.5,
    "data.val_fraction": 0.0,
}
_IMAGENET_EVAL = {"data.storage": "stream", "data.image_size": [224, 224], "data.crop_scale": [0.08, 1.0],
                  "data.resize_size": 256}

PAPER = {
    "bbn_cifar10_lt.toml": {**_BBN_CIFAR, **_BBN, "methods": ["bbn"], "data.name": "cifar10", "bbn.alpha_epochs": 0},
    "ce_cifar10_lt.toml": {**_BBN_CIFAR, "methods": ["ce"], "data.name": "cifar10"},
    "bbn_cifar100_lt.toml": {**_BBN_CIFAR, **_BBN, "methods": ["bbn"], "data.name": "cifar100", "bbn.alpha_epochs": 0},
    "ce_cifar100_lt.toml": {**_BBN_CIFAR, "methods": ["ce"], "data.name": "cifar100"},
    "batchformer_cifar100_lt.toml": {
        **_BBN_CIFAR, "methods": ["ce", "batchformer"], "data.name": "cifar100", "batchformer.layers": 1,
        "batchformer.heads": 1, "batchformer.ffn_dim": 0, "batchformer.dropout": 0.5,
        "batchformer.shared_classifier": True, "batchformer.lr_scale": 1.0,
    },
    "drloc_cifar100_vit.toml": {
        **_DRLOC_UPSTREAM, "methods": ["ce", "drloc"], "data.name": "cifar100", "data.batch_size": 1024,
        "data.crop_padding": 4, "model.name": "vit_s16", "model.patch": 4, "model.drop_path": 0.1, "drloc.lambda0": 0.1,
    },
    "sdmp_cifar10_vits.toml": {
        **_MOCO_V3, "epochs": 300, "data.name": "cifar10", "data.batch_size": 1024, "model.name": "vit_s16",
        "model.patch": 4, "moco.views.blur_prob": [0.0, 0.0],
    },
    "bbn_inat2018_resnet50.toml": {
        **_BBN, **_IMAGENET_EVAL, "epochs": 180, "methods": ["bbn"], "data.name": "inaturalist",
        "data.train_json": "train2018.json", "data.test_json": "val2018.json", "data.val_fraction": 0.0,
        "data.batch_size": 128, "model.name": "resnet50", "optim.name": "sgd", "optim.lr": 0.05,
        "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "schedule.name": "step", "schedule.warmup_epochs": 0,
        "schedule.milestones": [120, 160], "schedule.gamma": 0.1, "bbn.alpha_epochs": 200,
    },
    "batchformer_imagenet_lt_resnet50.toml": {
        **_IMAGENET_EVAL, "epochs": 90, "methods": ["ce", "batchformer"], "data.name": "imagelist",
        "data.train_list": "ImageNet_LT_train.txt", "data.val_list": "ImageNet_LT_val.txt",
        "data.test_list": "ImageNet_LT_test.txt", "data.batch_size": 256, "model.name": "resnet50",
        "optim.name": "sgd", "optim.lr": 0.1, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
        "schedule.name": "cosine", "schedule.warmup_epochs": 0, "batchformer.layers": 1, "batchformer.heads": 4,
        "batchformer.ffn_dim": 0, "batchformer.dropout": 0.5, "batchformer.shared_classifier": True,
        "batchformer.lr_scale": 0.1,
    },
    "drloc_swin_t_224.toml": {
        **_DRLOC_UPSTREAM, **_IMAGENET_EVAL, "methods": ["ce", "drloc"], "data.name": "imagefolder",
        "data.batch_size": 128, "model.name": "swin_t", "model.dim": 96, "model.depths": [2, 2, 6, 2],
        "model.heads": [3, 6, 12, 24], "model.window": 7, "model.patch": 4, "model.drop_path": 0.2,
        "drloc.lambda0": 0.5,
    },
    "sdmp_mocov3_vits16_imagenet.toml": {
        **_MOCO_V3, "epochs": 100, "data.name": "imagefolder", "data.storage": "stream",
        "data.image_size": [224, 224], "data.batch_size": 128, "model.name": "vit_s16", "model.patch": 16,
        "moco.views.blur_prob": [1.0, 0.1], "moco.views.blur_sigma": [0.1, 2.0],
    },
}


def recipe_files() -> list[str]:
    return sorted(p.name for p in RECIPES.glob("*.toml"))


def flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def same(a, b) -> bool:
    """Config values equal: numbers by value (a TOML 5 and 5.0 are the same setting)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_every_recipe_has_its_paper_settings_and_a_one_step_run():
    assert recipe_files() == sorted(PAPER) == sorted({case[0] for case in CASES})


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_states_the_paper_hyperparameters(name):
    raw = flatten(load_raw(RECIPES / name))
    for key, value in PAPER[name].items():
        assert key in raw, f"{name} does not set {key}"
        assert same(raw[key], value), f"{name}: {key} = {raw[key]!r}, the paper's is {value!r}"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_starts_with_its_comment_block(name):
    """What it reproduces, the one command (with the data path), what the paper reports."""
    text = (RECIPES / name).read_text()
    head = text.split("\nseed = ")[0]
    assert all(line.startswith("#") for line in head.splitlines()), f"{name}: settings before the comment block ends"
    assert re.search(rf"batchkin train configs/recipes/{re.escape(name)}( --nproc \d+)? --set data\.root=", head), name
    assert "Reported" in head and "Data:" in head, name
    assert re.search(r"Deviation|Not in batchkin", head), f"{name} does not say where it departs from upstream"


@pytest.mark.parametrize("method_file,baseline_file", [
    ("bbn_cifar10_lt.toml", "ce_cifar10_lt.toml"),
    ("bbn_cifar100_lt.toml", "ce_cifar100_lt.toml"),
    ("batchformer_cifar100_lt.toml", "ce_cifar100_lt.toml"),
])
def test_method_recipe_differs_from_its_baseline_only_in_the_method(method_file, baseline_file):
    method, baseline = load_raw(RECIPES / method_file), load_raw(RECIPES / baseline_file)
    method_tables = {"bbn", "batchformer", "ce", "drloc", "moco", "sdmp", "dino"}
    strip = lambda raw: {k: v for k, v in raw.items() if k != "methods" and k not in method_tables}  # noqa: E731
    assert strip(method) == strip(baseline)
    assert method["methods"] != baseline["methods"]


# ------------------------------------------------------------------------------ tiny datasets in each format


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return (rng.random((h, w, 3)) * 255).astype(np.uint8)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def cifar_folder(root: Path, classes: int) -> Path:
    """A python-format CIFAR folder: 2 training images of class 0, 1 of every other, 1 test image per class."""
    rng = np.random.default_rng(classes)
    train_y = [0] + list(range(classes))
    test_y = list(range(classes))
    data = lambda n: (rng.random((n, 3072)) * 255).astype(np.uint8)  # noqa: E731
    root.mkdir(parents=True)
    if classes == 10:
        files = [f"data_batch_{i}" for i in range(1, 6)]
        for i, f in enumerate(files):  # the training images spread over the five batches
            labels = train_y[i::5]
            (root / f).write_bytes(pickle.dumps({b"data": data(len(labels)), b"labels": labels}, protocol=2))
        (root / "test_batch").write_bytes(pickle.dumps({b"data": data(classes), b"labels": test_y}, protocol=2))
    else:
        (root / "train").write_bytes(pickle.dumps({b"data": data(len(train_y)), b"fine_labels": train_y}, protocol=2))
        (root / "test").write_bytes(pickle.dumps({b"data": data(classes), b"fine_labels": test_y}, protocol=2))
    return root


#: training images per class of the ImageNet-scale sets (4 images: one step of batch 3)
TRAIN_COUNTS = (2, 1, 1)
SOURCE_SIZE = (72, 54)  # (H, W) of the written JPEGs: not square, smaller than the 224-px crops


def inaturalist_folder(root: Path) -> Path:
    """train2018.json / val2018.json over JPEGs under train_val2018/, category ids 3, 17, 40."""
    rng = np.random.default_rng(1)
    ids = [3, 17, 40]
    for part, counts in (("train2018", TRAIN_COUNTS), ("val2018", (1, 1, 1))):
        images, annotations = [], []
        for cid, n in zip(ids, counts):
            for _ in range(n):
                k = 1000 * (part == "val2018") + len(images)
                name = f"train_val2018/Plantae/{cid}/{k:05d}.jpg"
                _save(root / name, _noise(rng, *SOURCE_SIZE))
                images.append({"id": k, "file_name": name, "width": SOURCE_SIZE[1], "height": SOURCE_SIZE[0]})
                annotations.append({"id": k, "image_id": k, "category_id": cid})
        categories = [{"id": cid, "name": f"species {cid}"} for cid in ids]
        (root / f"{part}.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                       "categories": categories}))
    return root


def imagenet_lt_folder(root: Path) -> Path:
    """ImageNet_LT_{train,val,test}.txt (`train/nXXXX/nXXXX_k.JPEG label` lines) over JPEGs."""
    rng = np.random.default_rng(2)
    wnids = ["n01440764", "n01443537", "n01484850"]
    for part, folder, counts in (("train", "train", TRAIN_COUNTS), ("val", "train", (1, 1, 1)), ("test", "val", (
        1, 1, 1))):
        lines = []
        for label, (wnid, n) in enumerate(zip(wnids, counts)):
            for k in range(n):
                name = f"{folder}/{wnid}/{wnid}_{part}{k}.JPEG"
                _save(root / name, _noise(rng, *SOURCE_SIZE))
                lines.append(f"{name} {label}")
        (root / f"ImageNet_LT_{part}.txt").write_text("\n".join(lines) + "\n")
    return root


def image_folder(root: Path, size: tuple[int, int], suffix: str) -> Path:
    """train/ and test/ with one subfolder per class."""
    rng = np.random.default_rng(3)
    for part, counts in (("train", TRAIN_COUNTS), ("test", (1, 1, 1))):
        for c, n in enumerate(counts):
            for k in range(n):
                _save(root / part / f"class{c}" / f"{k}{suffix}", _noise(rng, *size))
    return root


CIFAR10, CIFAR100 = (lambda r: cifar_folder(r, 10)), (lambda r: cifar_folder(r, 100))
CIFAR_PNG = lambda r: image_folder(r, (32, 32), ".png")  # noqa: E731
IMAGENET = lambda r: image_folder(r, SOURCE_SIZE, ".JPEG")  # noqa: E731

# ------------------------------------------------------------------------------ one step of every recipe

#: what the test changes: one step on a CPU (the recipe's own warm-up and milestones lie beyond it)
_ONE_EPOCH = ["device=cpu", "epochs=1"]
_NO_WARMUP = ["schedule.warmup_epochs=0"]
_NO_MILESTONES = ["schedule.warmup_epochs=0", "schedule.milestones=[]"]
_LT = ["data.imbalance_factor=2"]  # the tiny sets have n_max = 2
_STREAM = ["data.num_workers=0", "data.batch_size=3"]

#: (recipe, dataset writer, overrides, loss terms the step must log, extra per-epoch metrics)
CASES = [
    ("bbn_cifar10_lt.toml", CIFAR10, _NO_MILESTONES + _LT + ["data.batch_size=6"], ["bbn"], ["bbn/alpha"]),
    ("ce_cifar10_lt.toml", CIFAR10, _NO_MILESTONES + _LT + ["data.batch_size=6"], ["ce"], []),
    ("bbn_cifar100_lt.toml", CIFAR100, _NO_MILESTONES + _LT + ["data.batch_size=64"], ["bbn"], ["bbn/alpha"]),
    ("ce_cifar100_lt.toml", CIFAR100, _NO_MILESTONES + _LT + ["data.batch_size=64"], ["ce"], []),
    ("batchformer_cifar100_lt.toml", CIFAR100, _NO_MILESTONES + _LT + ["data.batch_size=64"], ["ce"], []),
    ("batchformer_cifar100_lt.toml", CIFAR100,
     _NO_MILESTONES + _LT + ["data.batch_size=64", 'methods=["bbn", "batchformer"]'], ["bbn"], ["bbn/alpha"]),
    ("drloc_cifar100_vit.toml", CIFAR100, _NO_WARMUP + ["data.batch_size=64", "model.depth=1"],
     ["ce", "drloc"], ["drloc/lambda", "drloc/loss"]),
    ("sdmp_cifar10_vits.toml", CIFAR10, _NO_WARMUP + ["data.batch_size=6"], ["moco", "sdmp_ms", "sdmp_mm"],
     ["moco/momentum", "sdmp/lam_eff_mean"]),
    ("bbn_inat2018_resnet50.toml", inaturalist_folder, _NO_MILESTONES + _STREAM, ["bbn"], ["bbn/alpha"]),
    ("batchformer_imagenet_lt_resnet50.toml", imagenet_lt_folder, _STREAM, ["ce"], []),
    ("batchformer_imagenet_lt_resnet50.toml", imagenet_lt_folder, _STREAM + ["model.name=resnext50_32x4d"], ["ce"], []),
    ("drloc_swin_t_224.toml", CIFAR_PNG, _NO_WARMUP + _STREAM, ["ce", "drloc"], ["drloc/lambda", "drloc/loss"]),
    ("sdmp_mocov3_vits16_imagenet.toml", IMAGENET, _NO_WARMUP + _STREAM, ["moco", "sdmp_ms", "sdmp_mm"],
     ["moco/momentum", "sdmp/lam_eff_mean"]),
]


def _case_id(case) -> str:
    name, overrides = case[0].removesuffix(".toml"), case[2]
    variant = [o.split("=", 1)[1] for o in overrides if o.startswith(("methods=", "model.name="))]
    return name + ("-" + "-".join(re.sub(r"\W+", "", v) for v in variant) if variant else "")


def _tables(cfg: dict) -> set[str]:
    """The tables the resolved config.toml writes: the engine's and the enabled methods'."""
    return {"data", "model", "optim", "schedule", "train", "metrics", *cfg["methods"]}


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_recipe_trains_one_step(case, tmp_path, capsys):
    name, write, overrides, terms, metrics = case
    data = write(tmp_path / "data")
    sets = [*_ONE_EPOCH, *overrides, f"data.root={data}"]
    out = tmp_path / "run"
    argv = ["train", str(RECIPES / name), "--out", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    with torch.random.fork_rng(devices=[]):
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 0, err

    lines = read_metrics(out)
    epoch, final = lines[0], lines[-1]
    assert [line["kind"] for line in lines] == ["epoch", "final"]
    assert epoch["epoch"] == 1 and epoch["step"] == 1, "the tiny set is one batch: exactly one optimizer step"
    assert math.isfinite(epoch["loss"]) and epoch["loss"] > 0
    for term in terms:
        assert math.isfinite(epoch[f"train/{term}"]), term
    for key in metrics:
        assert math.isfinite(epoch[key]), key
    assert 0.0 <= final["test/top1"] <= 1.0

    # the resolved config keeps every value of the recipe but the test's overrides
    resolved = tomllib.loads((out / "config.toml").read_text())
    expected = apply_overrides(load_raw(RECIPES / name), sets)
    got = flatten(resolved)
    for key, value in flatten(expected).items():
        if key.split(".")[0] in _tables(expected) or "." not in key:
            assert key in got and same(got[key], value), f"{key}: resolved {got.get(key)!r}, expected {value!r}"
    overridden = {s.split("=", 1)[0] for s in sets}
    for key, value in PAPER[name].items():
        if key not in overridden and key.split(".")[0] in _tables(expected) | {"epochs", "methods"}:
            assert same(got[key], value), key


# ------------------------------------------------------------------------------ the documentation lists them


def test_docs_list_every_recipe_with_its_command():
    docs = DOCS.read_text()
    for name in recipe_files():
        assert f"configs/recipes/{name}" in docs, f"{name} is missing from docs/recipes.md"
        assert re.search(rf"batchkin train configs/recipes/{re.escape(name)}\b[^`\n]*--set data\.root=", docs), \
            f"docs/recipes.md gives no command for {name}"
    listed = set(re.findall(r"configs/recipes/(\w+\.toml)", docs))
    assert listed <= set(
        recipe_files()), f"docs/recipes.md names recipes that do not exist: {listed - set(recipe_files())}"


def test_readme_links_the_recipes_page():
    assert "(docs/recipes.md)" in (ROOT / "README.md").read_text()
