"""The one list of ops and the path selection: every op is a package, a registered custom op,
a benchmark module, a test module and a design page; ``batchkin doctor`` and ``batchkin build``
report each op from :mod:`batchkin.kernels.dispatch` alone."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

import batchkin.kernels
from batchkin.cli import main
from batchkin.kernels import dispatch

ROOT = Path(__file__).resolve().parents[2]


def test_one_list_of_ops():
    assert dispatch.OPS == ("reversed_sampler", "batch_attention", "drloc_pairs", "batch_mix")
    assert batchkin.kernels.OP_MODULES == dispatch.OPS
    assert dispatch.ensure_ops_imported()[: len(dispatch.OPS)] == list(dispatch.OPS)


@pytest.mark.parametrize("name", dispatch.OPS)
def test_every_op_is_a_documented_package_with_tests_and_a_benchmark(name):
    pkg = importlib.import_module(f"batchkin.kernels.{name}")
    assert Path(pkg.__file__).name == "__init__.py" and len(pkg.__doc__) > 200  # the op's contract
    assert pkg.INFO is dispatch.REGISTRY[name]
    assert hasattr(torch.ops.batchkin, name)  # the registered custom op
    assert (ROOT / "docs" / "kernels" / f"{name}.md").is_file()
    assert (ROOT / "bench" / f"test_bench_{name}.py").is_file()
    assert (ROOT / "tests" / "kernels" / f"test_{name}.py").is_file()
    info = dispatch.REGISTRY[name]
    if info.cpp_library:
        assert (ROOT / "csrc" / f"{info.cpp_library}.cpp").is_file()


def test_no_kernel_module_is_long():
    for path in (ROOT / "kernels").rglob("*.py"):
        assert len(path.read_text().splitlines()) <= 400, f"{path.relative_to(ROOT)} is over 400 lines"


@pytest.mark.parametrize("mode", ["auto", "ref", "cpp"])
def test_doctor_reports_every_op_as_dispatch_explains_it(monkeypatch, capsys, mode):
    monkeypatch.setenv(dispatch.ENV_MODE, mode)
    assert main(["doctor"]) == 0
    rows = [line.split(None, 4) for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    cpu = {name: (path, reason) for name, dev, _, path, reason in rows if dev == "cpu"}
    assert list(cpu) == list(dispatch.OPS)
    for name, (path, reason) in cpu.items():
        assert (path, reason) == dispatch.explain(name, "cpu")
    want = {"auto": "sdpa", "ref": "ref", "cpp": "sdpa"}[mode]
    assert cpu["batch_attention"][0] == want  # the op without C++: its CPU fast path is PyTorch's


def test_build_compiles_every_cpp_op(capsys):
    assert main(["build"]) == 0
    out = capsys.readouterr().out
    for name in dispatch.OPS:
        status = "no C++ extension" if dispatch.REGISTRY[name].cpp_library is None else "built"
        assert f"  {name:<18} {status}" in out


def test_explain_native_path_and_triton_limits(monkeypatch):
    """An op without C++ takes its native path on CPU, in auto and forced ``cpp`` modes; sizes
    over the Triton limit fall back to it, and a forced ``triton`` path refuses them."""
    monkeypatch.setenv(dispatch.ENV_MODE, "auto")
    assert dispatch.explain("batch_attention", "cpu")[0] == "sdpa"
    assert dispatch.explain("batch_attention", "meta")[0] == "sdpa"
    assert dispatch.explain("batch_mix", "meta") == ("ref", "no fast path for meta tensors")
    monkeypatch.setenv(dispatch.ENV_MODE, "cpp")
    assert dispatch.explain("batch_attention", "cpu")[0] == "sdpa"
    with pytest.raises(dispatch.KernelUnavailable, match="cpp but the tensors are on meta"):
        dispatch.explain("batch_attention", "meta")
    monkeypatch.setenv(dispatch.ENV_MODE, "triton")
    assert dispatch.explain("batch_attention", "cpu", head_dim=256)[0] == "triton"
    with pytest.raises(dispatch.KernelUnavailable, match="head dim 257 > 256"):
        dispatch.explain("batch_attention", "cpu", head_dim=257)
    monkeypatch.setenv(dispatch.ENV_MODE, "fast")
    with pytest.raises(ValueError, match="BATCHKIN_KERNELS='fast'"):
        dispatch.requested_mode()
