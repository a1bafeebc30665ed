"""The example plugin packages install, are discovered through their entry points, train,
and can be hidden with the autoload switch. Each is installed on its own into a private
folder put on PYTHONPATH for subprocesses, so the test environment itself is left
untouched and each example is checked independently of the other."""

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from _common import read_metrics

ROOT = Path(__file__).resolve().parents[1]
BALANCED_SOFTMAX = ROOT / "examples" / "batchkin-balanced-softmax"
NPZ_DATASET = ROOT / "examples" / "batchkin-npz-dataset"
NPZ_ORIGIN = "package batchkin-npz-dataset 0.1.0"


def _install(tmp_path_factory, example: Path) -> Path:
    """pip-install ``example`` into a fresh folder; returns the folder (a site for PYTHONPATH).

    The sources are copied first, so the build leaves nothing in the checkout and no
    stale build output of an earlier version can slip into the install.
    """
    src = tmp_path_factory.mktemp("src") / example.name
    shutil.copytree(example, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(src)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return _install(tmp_path_factory, BALANCED_SOFTMAX)


@pytest.fixture(scope="module")
def npz_site(tmp_path_factory):
    return _install(tmp_path_factory, NPZ_DATASET)


def _run(site, *args, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(site), **(env_extra or {})}
    env.pop("BATCHKIN_DISABLE_PLUGIN_AUTOLOAD", None) if not env_extra else None
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


# ------------------------------------------------------------------------------ balanced softmax (a method and a model)


def test_listed_with_origin_and_hooks(site):
    r = _run(site, "-m", "batchkin", "plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    entry = data["methods"]["balanced_softmax"]
    assert entry["origin"] == "package batchkin-balanced-softmax 0.1.0"
    assert sorted(entry["hooks"]) == ["loss_terms", "on_fit_start"]
    assert data["models"]["mlp"] == "package batchkin-balanced-softmax 0.1.0"
    r = _run(site, "-m", "batchkin", "plugins", "--hook", "loss_terms")
    assert "balanced_softmax" in r.stdout.split()


def test_disable_switch_hides_it(site, tmp_path):
    r = _run(site, "-m", "batchkin", "plugins", "--json", env_extra={"BATCHKIN_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "balanced_softmax" not in data["methods"] and "mlp" not in data["models"]
    assert "ce" in data["methods"]  # built-ins stay
    r = _run(site, "-m", "batchkin", "train", "--set", 'methods=["balanced_softmax"]', "--out", str(
        tmp_path / "unused"),
             env_extra={"BATCHKIN_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert r.returncode == 2 and "unknown method 'balanced_softmax'" in r.stderr


def test_trains_a_short_run_combined_with_batchformer(site, tmp_path):
    out = tmp_path / "run"
    r = _run(site, "-m", "batchkin", "train", "--quiet", "--out", str(out),
             "--set", 'methods=["balanced_softmax", "batchformer"]', "--set", "epochs=1", "--set",
             "data.name=synthetic",
             "--set", "model.name=mlp", "--set", "model.hidden=32", "--set", "data.imbalance_factor=4")
    assert r.returncode == 0, r.stderr
    lines = read_metrics(out)
    assert "train/balanced_softmax" in lines[0]
    assert json.loads((out / "run.json").read_text())["methods"] == ["balanced_softmax", "batchformer"]
    assert lines[-1]["kind"] == "final"
    info = json.loads((out / "run.json").read_text())
    assert info["plugins"] == {"balanced_softmax": "package batchkin-balanced-softmax 0.1.0", "batchformer": "builtin"}
    assert info["model"] == {"name": "mlp", "origin": "package batchkin-balanced-softmax 0.1.0"}
    assert info["dataset"] == {"name": "synthetic", "origin": "builtin"}


# ------------------------------------------------------------------------------ npz dataset (a dataset)


def _write_npz(path: Path, classes=("ash", "birch", "cedar", "elm", "fir")) -> Path:
    """A learnable 5-class set of 6x10 RGB images (channels-last, as the file format asks)
    with its own 10-image test split."""
    rng = np.random.default_rng(7)
    k = len(classes)
    proto = rng.integers(0, 256, size=(k, 6, 10, 3))
    y, y_test = np.arange(80) % k, np.arange(10) % k

    def images(labels):
        return np.clip(proto[labels] + rng.normal(0, 25, (len(labels), 6, 10, 3)), 0, 255).astype(np.uint8)

    np.savez(path, x=images(y), y=y, x_test=images(y_test), y_test=y_test, classes=np.array(classes))
    return path


def test_npz_listed_with_origin_and_hooks(npz_site):
    r = _run(npz_site, "-m", "batchkin", "plugins", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["datasets"]["npz"] == NPZ_ORIGIN
    assert data["plugins"]["npz"] == NPZ_ORIGIN
    # it registers a dataset only, and it does not bring the other example along
    assert [n for n, o in data["methods"].items() if o["origin"] != "builtin"] == []
    assert [n for n, o in data["models"].items() if o != "builtin"] == []
    assert "balanced_softmax" not in data["methods"] and "mlp" not in data["models"]
    hooks = {h: _run(npz_site, "-m", "batchkin", "plugins", "--hook", h).stdout.split()
             for h in ("register_datasets", "register_methods", "register_models")}
    assert "npz" in hooks["register_datasets"] and "datasets" in hooks["register_datasets"]
    assert "npz" not in hooks["register_methods"] and "npz" not in hooks["register_models"]
    r = _run(npz_site, "-m", "batchkin", "plugins")
    assert ["npz", *NPZ_ORIGIN.split()] in [line.split() for line in r.stdout.splitlines()]


def test_npz_trains_a_short_run_combined_with_batchformer(npz_site, tmp_path):
    path, out = _write_npz(tmp_path / "trees.npz"), tmp_path / "run"
    r = _run(npz_site, "-m", "batchkin", "train", "--quiet", "--out", str(out),
             "--set", 'methods=["ce", "batchformer"]', "--set", "epochs=1", "--set", "data.name=npz",
             "--set", f"data.path={path}", "--set", "data.batch_size=16", "--set", "model.name=tiny",
             "--set", "model.width=8")
    assert r.returncode == 0, r.stderr
    lines = read_metrics(out)
    assert lines[0]["kind"] == "epoch" and lines[0][
        "step"] == 4  # 70 training images (2 per class held out for val) // 16
    assert "train/ce" in lines[0] and len(lines[0]["val/per_class"]) == 5
    final = lines[-1]
    assert final["kind"] == "final" and len(final["test/per_class"]) == 5
    # the file's 10 test images, 2 per class: every per-class accuracy is a multiple of 1/2
    assert all(a in (0.0, 0.5, 1.0) for a in final["test/per_class"])
    info = json.loads((out / "run.json").read_text())
    assert info["methods"] == ["ce", "batchformer"]
    assert info["dataset"] == {"name": "npz", "origin": NPZ_ORIGIN}
    assert info["model"] == {"name": "tiny", "origin": "builtin"}
    # the dataset's own option is saved in [data], next to the engine's keys
    saved = tomllib.loads((out / "config.toml").read_text())["data"]
    assert saved["name"] == "npz" and saved["path"] == str(path) and saved["root"] == ""


def test_npz_options_are_checked_by_the_cli(npz_site, tmp_path):
    path = _write_npz(tmp_path / "trees.npz")
    r = _run(npz_site, "-m", "batchkin", "train", "--out", str(tmp_path / "unused"), "--set", "data.name=npz",
             "--set", f"data.pth={path}")
    assert r.returncode == 2
    assert ("unknown config key data.pth (did you mean 'path'?); valid [data] keys for data.name = 'npz': path"
            in r.stderr)
    r = _run(npz_site, "-m", "batchkin", "train", "--out", str(tmp_path / "unused"), "--set", "data.name=npz",
             "--set", "data.path=3")
    assert r.returncode == 2 and "data.path must be a string, got int 3" in r.stderr
    r = _run(npz_site, "-m", "batchkin", "train", "--out", str(tmp_path / "unused"), "--set", f"data.path={path}")
    assert r.returncode == 2
    assert "data.path is an option of dataset 'npz', not of the selected data.name = 'digits'" in r.stderr
    assert not (tmp_path / "unused").exists()


def test_npz_errors_stop_the_cli_before_training(npz_site, tmp_path):
    good = _write_npz(tmp_path / "good.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    r = _run(npz_site, "-m", "batchkin", "train", "--out", str(tmp_path / "unused"), "--set", "data.name=npz",
             "--set", f"data.path={tmp_path / 'cut.npz'}")
    assert r.returncode == 2 and "cut.npz is not a readable .npz archive (truncated or corrupt?)" in r.stderr
    assert not (tmp_path / "unused" / "metrics.jsonl").exists()


def test_disable_switch_hides_npz(npz_site, tmp_path):
    env = {"BATCHKIN_DISABLE_PLUGIN_AUTOLOAD": "1"}
    r = _run(npz_site, "-m", "batchkin", "plugins", "--json", env_extra=env)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert "npz" not in data["datasets"] and "npz" not in data["plugins"]
    assert "digits" in data["datasets"]  # built-ins stay
    path = _write_npz(tmp_path / "trees.npz")
    r = _run(npz_site, "-m", "batchkin", "train", "--out", str(tmp_path / "unused"), "--set", "data.name=npz",
             "--set", f"data.path={path}", env_extra=env)
    assert r.returncode == 2 and "unknown data.name 'npz'" in r.stderr


# ------------------------------------------------------------------------------ both


@pytest.mark.parametrize("example,site_fixture", [(BALANCED_SOFTMAX, "site"), (NPZ_DATASET, "npz_site")],
                         ids=["balanced-softmax", "npz-dataset"])
def test_the_example_packages_own_tests_pass(example, site_fixture, request):
    r = _run(request.getfixturevalue(site_fixture), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
             "-p", "no:benchmark", str(example / "tests"), cwd=example)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
