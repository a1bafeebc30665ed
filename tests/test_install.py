"""What an install without the extras runs: batchkin imports and trains on a CPU without Triton
or pytest-benchmark (both are extras: `triton`, `bench`, `test`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from _common import read_metrics

ROOT = Path(__file__).resolve().parents[1]

BLOCKER = """
import sys

BLOCKED = ("triton", "pytest_benchmark")


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


sys.meta_path.insert(0, Blocker())
"""

SCRIPT = BLOCKER + """
import json
import batchkin
from batchkin.cli import main
from batchkin.kernels import dispatch

ops = dispatch.ensure_ops_imported()  # every op package, Triton kernels included, imports
status = dispatch.triton_status()
code = main(["train", "--quiet", "--out", sys.argv[1], "--set", "device=cpu", "--set", "epochs=1",
             "--set", 'methods=["bbn"]', "--set", "data.name=synthetic", "--set", "data.synthetic_shape=[3, 8, 8]",
             "--set", "data.batch_size=16", "--set", "model.width=4", "--set", "train.log_every=1000"])
doctor = main(["doctor"])
print(json.dumps({"code": code, "doctor": doctor, "ops": ops, "triton": status[0], "why": status[2],
                  "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)}))
"""


def test_batchkin_imports_and_trains_without_triton_or_pytest_benchmark(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    env["BATCHKIN_KERNELS"] = "auto"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "run")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["code"] == 0 and out["doctor"] == 0, r.stderr[-3000:]
    assert out["loaded"] == [] and out["triton"] is False and "triton cannot be imported" in out["why"]
    assert {"reversed_sampler", "batch_attention", "drloc_pairs", "batch_mix"} <= set(out["ops"])
    final = read_metrics(tmp_path / "run")[-1]
    assert final["kind"] == "final" and 0.0 <= final["test/top1"] <= 1.0
    assert "triton: triton cannot be imported" in r.stdout


def test_triton_and_pytest_benchmark_are_extras_the_test_extra_pulls():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [d.split(";")[0].split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "triton" not in names and "pytest-benchmark" not in names and "torch" in names
    extras = project["optional-dependencies"]
    assert [d.split(">")[0] for d in extras["triton"]] == ["triton"]
    assert any(d.startswith("pytest-benchmark") for d in extras["bench"])
    for needed in ("triton", "pytest-benchmark", "pytest", "pytest-xdist"):
        assert any(d.split(">")[0] == needed for d in extras["test"]), needed
    # the Triton requirement of the test extra is the triton extra's own
    assert [d for d in extras["test"] if d.startswith("triton")] == extras["triton"]
