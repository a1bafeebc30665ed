"""The peers benchmarks and the GPU check: their harness, their tables, and the GPU check's dry run
(the same stages on the CPU with Triton's interpreter), so the script works the first time a GPU
is lent."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchkin.cli import bench_harness

ROOT = Path(__file__).resolve().parents[2]
bench = bench_harness()  # bench/harness.py, as `batchkin bench` loads it


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_interleave_repeats_each_call_and_takes_the_timer_it_is_given(monkeypatch):
    """``repeat`` calls run back to back and are timed as one unit, divided; ``timer`` replaces
    perf_counter (which, if it were read, would break the ratios here); every time is returned."""
    cpu = [0.0]
    calls = {"a": 0, "b": 0}

    def fn(name, cost):
        def run():
            calls[name] += 1
            cpu[0] += cost
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: 1 / 0)
    res = bench.interleave({"a": fn("a", 2.0), "b": fn("b", 0.5)}, 4, "a", timer=lambda: cpu[0], repeat=3)
    assert calls == {"a": 12, "b": 12}
    assert res["times"] == {"a": [2.0] * 4, "b": [0.5] * 4}
    assert res["median_ratio"]["b"] == 4.0 and res["ratios"]["b"] == [4.0] * 4
    with pytest.raises(ValueError, match="repeat must be >= 1"):
        bench.interleave({"a": fn("a", 1.0)}, 1, "a", repeat=0)


def test_summarize_gives_each_peer_over_batchkin_per_round():
    pk = _module("peers_kernels")
    res = {"times": {"batchkin": [1.0, 2.0, 4.0], "peer": [3.0, 2.0, 2.0]}}
    s = pk.summarize(res, "batchkin")
    assert s["peer"] == {"ms": 2000.0, "ratio": 1.0, "range": [0.5, 3.0]}  # per-round ratios 3, 1, 0.5
    assert s["batchkin"]["ratio"] == 1.0


def test_timm_mixup_is_loaded_from_its_file_or_reported_missing(monkeypatch):
    pk = _module("peers_kernels")
    monkeypatch.setattr(pk.importlib.util, "find_spec", lambda name: None)
    assert pk.load_timm_mixup() is None


def test_overhead_section_times_public_calls_against_their_kernels():
    pk = _module("peers_kernels")
    rows = pk.overhead(quick=True, rounds=2)
    assert [r["call"] for r in rows[:2]] == [
        "batch_mix 256x3x32x32 float32 mixup", "batch_mix 2x256x3x32x32 uint8 cutmix"]
    for r in rows[:2]:
        assert r["kernel_us"] > 0 and r["public_us"] > 0 and len(r["overhead_range_us"]) == 2
    assert rows[-1]["call"].startswith("sample_mix_params") and rows[-1]["public_us"] > 0


def test_engine_step_overhead_runs_both_loops_on_the_same_steps():
    pe = _module("peers_engine")
    r = pe.step_overhead(rounds=3)
    assert r["rounds"] == 3 and r["plain_ms"] > 0 and r["engine_ms"] > 0
    assert r["overhead_pct"] == pytest.approx(100 * (1 / r["plain_over_engine"] - 1))


def test_run_peers_runs_both_scripts_on_one_thread_and_leaves_the_readme(monkeypatch, tmp_path):
    calls = []
    kernels = {"timm": "1.0", "sections": {"sampler": {"rows": [{
        "labels": 1800, "classes": 10, "draws": 1728, "steps": 27, "batch": 64,
        "vs_bbn": {"bbn": {"ms": 0.1, "ratio": 1.0, "range": [1.0, 1.0]},
                   "wrs_dual_stream": {"ms": 0.4, "ratio": 4.0, "range": [3.5, 4.5]}},
        "vs_reversed_epoch": {"bbn_reversed_epoch": {"ms": 0.04, "ratio": 1.0, "range": [1.0, 1.0]},
                              "wrs_list": {"ms": 0.11, "ratio": 2.84, "range": [2.5, 3.1]},
                              "multinomial": {"ms": 0.06, "ratio": 1.6, "range": [1.4, 1.8]}}}]}}}
    engine = {"step": {"case": "ce resnet8 digits", "rounds": 3, "timer": "process CPU time", "plain_ms": 6.0,
                       "engine_ms": 6.12, "plain_over_engine": 0.98, "overhead_pct": 2.04, "quartiles": [
                           0.97, 0.98, 0.99],
                       "range": [0.9, 1.1]},
              "fixed": {"case": "ce resnet8 digits, one epoch", "rounds": 3, "plugins_s": 0.04, "plain_epoch_s": 0.13,
                        "batchkin_fixed_s": 0.05, "batchkin_fixed_range_s": [0.04, 0.06], "batchkin_fsyncs": 12,
                        "batchkin_fixed_without_fsync_s": 0.02,
                        "batchkin_fsync_s": 0.03, "lightning": None,
                        "batchkin_apart_s": {"dataset": 0.008, "evaluation": 0.02, "report": 0.2}}}

    def fake(cmd, root, env):
        calls.append((cmd[1], env.get("OMP_NUM_THREADS")))
        return kernels if cmd[1] == "bench/peers_kernels.py" else engine

    monkeypatch.setattr(bench, "_json_of", fake)
    tables = tmp_path / "bench" / "results" / "README.md"
    tables.parent.mkdir(parents=True)
    tables.write_text(f"x\n{bench.README_START}\nold\n{bench.README_END}\n")
    meta = {"device": "dev", "torch": "t", "date": "d", "command": "batchkin bench peers"}
    md = bench._run_peers(tmp_path, tmp_path, "cpu", True, meta, {})
    assert calls == [("bench/peers_kernels.py", "1"), ("bench/peers_engine.py", "1")]
    text = md.read_text()
    assert "| 1800 | 10 | 1728 | 0.1 | 4.00x [3.50-4.50] | 0.04 | 2.84x [2.50-3.10] | 1.60x [1.40-1.80] |" in text
    assert "an overhead of 2.0% (target: at most 2%)" in text
    assert "| batchkin `fit` | 50.0 [40.0 - 60.0] |" in text and "12 fsyncs waiting 30.0 ms" in text
    assert "| batchkin `fit` without its fsync waits | 20.0 |" in text
    assert "Lightning `Trainer`" not in text  # not installed: no row
    assert json.loads((tmp_path / "peers.json").read_text())["engine"] == engine
    assert tables.read_text() == f"x\n{bench.README_START}\nold\n{bench.README_END}\n"
    with pytest.raises(bench.BatchkinError, match="gpu_check"):
        bench._run_peers(tmp_path, tmp_path, "cuda", True, meta, {})


def test_gpu_check_dry_run_completes_every_stage(tmp_path):
    """The GPU check's dry run (CPU, Triton interpreter, tiny sizes): every stage runs and is
    written as it ends; the Triton paths agree with the references; each method trains an epoch."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(res["stages"]) == ["env", "parity", "mixing", "layer", "drloc", "e2e", "tests"]
    assert all(st["status"] == "done" for st in res["stages"].values()), res["stages"]
    parity = res["stages"]["parity"]["result"]
    assert parity["ok"] and parity["cases"] >= 100 and parity["failed"] == []
    assert {row["method"] for row in res["stages"]["e2e"]["result"]["rows"]} == {
        "ce", "bbn", "batchformer", "drloc", "moco", "sdmp", "dino"}
    assert all(row["ok"] for row in res["stages"]["e2e"]["result"]["rows"])
    mixing = res["stages"]["mixing"]["result"]["rows"]
    assert len(mixing) == 4 and all(isinstance(row["met"], bool) and row["copy_fraction"] > 0 for row in mixing)
    md = (tmp_path / "gpu_check.md").read_text()
    assert "dry run" in md and "#### parity (done" in md and "| ce | quickstart.toml |" in md
    assert time.perf_counter() - t0 < 300


def test_gpu_check_without_cuda_asks_for_the_dry_run(monkeypatch, capsys):
    gpu = _module("gpu_check")
    monkeypatch.setattr(gpu.torch.cuda, "is_available", lambda: False)
    assert gpu.main([]) == 2
    assert "no CUDA device here; use --dry" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu.main(["--dry", "--stages", "env,warp"])


def test_fixed_cost_clock_counts_calls_made_inside_another_timed_call_apart():
    """The report's fsyncs are its own time: an fsync inside write_report counts under both
    "fsync" and "fsync in report", so the fixed cost can leave the report's out."""
    pe = _module("peers_engine")
    clock = pe._Clock()

    class Host:
        def sync(self):
            return "synced"

        def report(self):
            return self.sync()

    host = Host()
    clock.wrap(host, "sync", "fsync")
    clock.wrap(host, "report", "report")
    assert host.sync() == "synced" and host.report() == "synced"
    assert clock.count == {"fsync": 2, "report": 1, "fsync in report": 1}
    assert clock.seconds["fsync"] >= clock.seconds["fsync in report"] > 0
