"""The example plugin package installs, is discovered through its entry point, trains, and
can be hidden with the autoload switch. It is installed into a private folder put on
PYTHONPATH for subprocesses, so the test environment itself is left untouched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "batchkin-balanced-softmax"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, text=True,
    )
    return target


def _run(site, *args, env_extra=None, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(site), **(env_extra or {})}
    env.pop("BATCHKIN_DISABLE_PLUGIN_AUTOLOAD", None) if not env_extra else None
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


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
    r = _run(site, "-m", "batchkin", "train", "--set", 'methods=["balanced_softmax"]', "--out", str(tmp_path / "unused"),
             env_extra={"BATCHKIN_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert r.returncode == 2 and "unknown method 'balanced_softmax'" in r.stderr


def test_trains_a_short_run_combined_with_batchformer(site, tmp_path):
    out = tmp_path / "run"
    r = _run(site, "-m", "batchkin", "train", "--quiet", "--out", str(out),
             "--set", 'methods=["balanced_softmax", "batchformer"]', "--set", "epochs=1", "--set", "data.name=synthetic",
             "--set", "model.name=mlp", "--set", "model.hidden=32", "--set", "data.imbalance_factor=4")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "train/balanced_softmax" in lines[0]
    assert json.loads((out / "run.json").read_text())["methods"] == ["balanced_softmax", "batchformer"]
    assert lines[-1]["kind"] == "final"
    assert json.loads((out / "run.json").read_text())["plugins"]["balanced_softmax"].startswith("package ")


def test_the_example_packages_own_tests_pass(site):
    r = _run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(EXAMPLE / "tests"), cwd=EXAMPLE)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert " passed" in r.stdout
