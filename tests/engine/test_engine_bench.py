"""The benchmark harnesses: bench/accuracy.py (tables, reuse, markers) and bench/harness.py's summaries."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from batchkin.cli import bench_harness

ROOT = Path(__file__).resolve().parents[2]
bench = bench_harness()  # bench/harness.py, as `batchkin bench` loads it


@pytest.fixture(scope="module")
def acc():
    spec = importlib.util.spec_from_file_location("bench_accuracy", ROOT / "bench" / "accuracy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_mean_and_sample_std(acc):
    m, s = acc.mean_std([0.5, 0.7, 0.9])
    assert m == pytest.approx(0.7)
    assert s == pytest.approx(0.2)  # sample std: sqrt(((0.2)^2 + 0 + (0.2)^2) / 2)
    assert acc.mean_std([0.4]) == (0.4, 0.0)
    assert all(math.isnan(v) for v in acc.mean_std([None, float("nan")]))
    assert acc.fmt(0.71234, 0.01) == "71.23 ± 1.00"


def test_a_run_is_reused_only_when_made_from_the_same_config(acc, tmp_path):
    raw = {"seed": 1, "epochs": 3, "data": {"name": "digits"}, "methods": ["ce"]}
    assert acc.made_with(raw, json.loads(json.dumps(raw)))
    assert not acc.made_with(raw, {**raw, "seed": 2})
    assert not acc.made_with(raw, {**raw, "data": {"name": "digits", "train_size": 10}})
    assert not acc.made_with(raw, None)
    (tmp_path / "bench_result.json").write_text(json.dumps({"raw": raw, "val": {"top1": 0.5}}))
    assert acc.finished(tmp_path, raw) == {"raw": raw, "val": {"top1": 0.5}}
    assert acc.finished(tmp_path, {**raw, "epochs": 4}) is None
    assert acc.finished(tmp_path / "absent", raw) is None


def test_write_doc_replaces_only_the_marked_block(acc, tmp_path):
    page = tmp_path / "x.md"
    page.write_text(f"# T\n\nprose before\n\n{acc.START}\nold table\n{acc.END}\n\nprose after\n")
    acc.write_doc(page, "T", "new table\n")
    text = page.read_text()
    assert "old table" not in text and "new table" in text
    assert text.startswith("# T\n\nprose before") and text.rstrip().endswith("prose after")
    fresh = tmp_path / "y.md"
    acc.write_doc(fresh, "Fresh", "t\n")
    assert fresh.read_text().startswith("# Fresh") and acc.START in fresh.read_text()


def test_the_budget_is_chosen_on_the_validation_split_of_the_baseline(acc):
    exp = acc.Experiment("e", "E", {"ce": acc.Run("c.toml"), "m": acc.Run("c.toml", ("x=1",))},
                         budgets=(2, 4, 8), pilot_seeds=(100, 101))

    def val(top1):
        return {"val": {"top1": top1}}

    # ce: mean 0.600 / 0.651 / 0.655 -> 4 is within 0.5 points of the best (8); m's scores do not count
    pilot = {("ce", 2, 100): val(0.60), ("ce", 2, 101): val(0.60), ("ce", 4, 100): val(0.650),
             ("ce", 4, 101): val(0.652), ("ce", 8, 100): val(0.655), ("ce", 8, 101): val(0.655),
             ("m", 8, 100): val(0.99)}
    budget, reason = acc.choose_budget(exp, pilot, "top1")
    assert budget == 4 and "within 0.5 points of its best (65.50 %)" in reason
    # still gaining at the largest budget: chosen, and the reason says it has not converged
    pilot[("ce", 8, 100)] = pilot[("ce", 8, 101)] = val(0.70)
    budget, reason = acc.choose_budget(exp, pilot, "top1")
    assert budget == 8 and "has not fully converged" in reason
    assert acc.choose_budget(exp, {}, "top1") == (None, "no finished pilot runs")
    fixed = acc.Experiment("f", "F", exp.runs, budget=30)
    assert acc.choose_budget(fixed, pilot, "top1") == (30, "fixed at epochs = 30")


def test_paired_differences_and_their_t_interval(acc):
    pr = acc.paired([0.55, 0.58, None], [0.50, 0.60, 0.7])  # a seed missing in one arm is left out
    assert pr["n"] == 2 and pr["diffs"] == pytest.approx([0.05, -0.02])
    # mean 0.015, sample sd sqrt(0.035^2 * 2) = 0.049497; half width t(0.975, 1) = 12.7062 * sd / sqrt(2)
    half = 12.7062 * 0.0494975 / math.sqrt(2)
    assert pr["mean"] == pytest.approx(0.015)
    assert pr["ci95"] == pytest.approx([0.015 - half, 0.015 + half], rel=1e-4)
    assert math.isnan(acc.paired([0.5], [0.4])["ci95"][0])  # one pair: no interval


def test_experiment_page_lists_every_run_and_the_paired_table(acc):
    exp = acc.Experiment("e", "E", {"ce": acc.Run("c.toml", ("epochs=2",)), "m": acc.Run("c.toml", (
        "epochs=2", "x=1"))}, budgets=(2,), pilot_seeds=(100,))
    suite = acc.Suite("s", "S", (exp,))
    plan = acc.Plan((1000, 1001, 1002))

    def r(top1, split="test"):
        return {split: {k: top1 for k, _ in acc.SUPERVISED}, "wall_s": 10.0, "commit": "abc"}

    final = {("ce", 2, 1000): r(0.50), ("ce", 2, 1001): r(0.60), ("m", 2, 1000): r(0.55), ("m", 2, 1001): r(0.58),
             ("m", 2, 1002): {"error": "boom", "wall_s": 1.0}}
    pilot = {("ce", 2, 100): r(0.4, "val"), ("m", 2, 100): r(0.45, "val")}
    text = "\n".join(acc.experiment_markdown(suite, exp, plan, pilot, final, 2, "why", None))
    assert "- `m`: `c.toml` `--set epochs=2` `--set x=1`" in text
    assert "| ce | 55.00 ± 7.07 | 55.00 ± 7.07 | 2/3 | 10 |" in text
    assert "| m | 56.50 ± 2.12 | 56.50 ± 2.12 | 2/3, 1 failed | 10 |" in text
    assert "- ce: 1000: 50.00; 1001: 60.00; 1002: not run" in text
    assert "- m: 1000: 55.00; 1001: 58.00; 1002: failed (boom)" in text
    assert "| m vs ce | top-1 | +5.00, -2.00 | +1.50 |" in text
    assert "| 2 | 40.00 (40.00) | 45.00 (45.00) |" in text


def test_quick_accuracy_pipeline_trains_writes_and_reuses(acc, tmp_path):
    args = ["bbn", "--only", "digitslt10", "--quick", "--out", str(tmp_path), "--workers", "1"]
    assert acc.main(args) == 0
    doc = tmp_path / "quick" / "docs" / "bbn.md"
    text = doc.read_text()
    assert "| ce |" in text and "| bbn |" in text and "bbn vs ce" in text
    assert (tmp_path / "quick" / "docs" / "bbn_budget.png").stat().st_size > 1000
    runs = tmp_path / "quick" / "digitslt10"
    pilot = json.loads((runs / "pilot" / "bbn" / "1" / "seed100" / "bench_result.json").read_text())
    final = json.loads((runs / "final" / "bbn" / "1" / "seed1000" / "bench_result.json").read_text())
    assert "val" in pilot and "test" not in pilot  # a pilot never sees the test split
    assert final["raw"]["epochs"] == 1 and 0.0 <= final["test"]["top1"] <= 1.0
    comp = json.loads((tmp_path / "quick" / "docs" / "bbn.json").read_text())["comparisons"][0]
    assert {"method", "baseline", "dataset", "metric", "seeds", "method_scores", "baseline_scores", "diff_mean",
            "ci95", "epochs", "config", "baseline_config"} <= set(comp)
    mtime = doc.stat().st_mtime_ns
    assert acc.main([*args, "--report-only"]) == 0  # finished runs are found again without training
    assert doc.stat().st_mtime_ns >= mtime and "| bbn |" in doc.read_text()


def test_unknown_suite_is_refused(acc, capsys):
    with pytest.raises(SystemExit) as e:
        acc.main(["bbm"])
    assert e.value.code == 2
    assert "unknown suite(s) ['bbm']" in capsys.readouterr().err


def test_summary_speedups_against_the_reference_row():
    raw = {"benchmarks": [
        {"group": "g", "name": "a", "extra_info": {"path": "ref", "bytes": 2e9}, "stats": {
            "median": 0.2, "iqr": 0.01, "rounds": 5}},
        {"group": "g", "name": "b", "extra_info": {"path": "cpp", "bytes": 2e9}, "stats": {
            "median": 0.05, "iqr": 0.01, "rounds": 5}},
    ]}
    rows = {r["impl"]: r for r in bench.summarize(raw, {"copy_GBps": 80.0})}
    assert rows["ref"]["speedup_vs_ref"] == pytest.approx(1.0)
    assert rows["cpp"]["speedup_vs_ref"] == pytest.approx(4.0)
    assert rows["cpp"]["GBps"] == pytest.approx(40.0)
    assert rows["cpp"]["fraction_of_copy_peak"] == pytest.approx(0.5)


def test_step_timer_measures_every_phase_without_changing_training():
    import torch

    from batchkin.state import StepTimer
    from batchkin.testing import tiny_config
    from batchkin.trainer import prepare, train_step

    def two_steps(timer):
        state = prepare(tiny_config())
        state.epoch = 1
        state.timer = StepTimer(state.device) if timer else None
        losses = [train_step(state, idx) for _, idx in zip(range(2), iter(state.sampler))]
        return state, losses

    plain, timed = two_steps(False), two_steps(True)
    assert plain[1] == timed[1]
    for (k, a), b in zip(plain[0].model.state_dict().items(), timed[0].model.state_dict().values()):
        assert torch.equal(a, b), k
    seconds = timed[0].timer.seconds
    assert set(seconds) == set(StepTimer.PHASES)
    assert all(seconds[p] > 0 for p in ("data", "forward", "loss", "backward", "optimizer"))
    assert sum(timed[0].timer.fractions().values()) == pytest.approx(1.0)


def test_summary_ratio_against_a_named_target_baseline():
    raw = {"benchmarks": [
        {"group": "g", "name": n, "extra_info": {"impl": n, "baseline": "original"},
         "stats": {"median": m, "iqr": 0.0, "rounds": 3}} for n, m in (("reference", 0.3), ("original", 0.4), (
             "ours", 0.1))
    ]}
    rows = {r["impl"]: r for r in bench.summarize(raw)}
    assert rows["ours"]["speedup_vs_ref"] == pytest.approx(3.0)
    assert rows["ours"]["speedup_vs_baseline"] == pytest.approx(4.0) and rows["ours"]["baseline"] == "original"
    table = bench.markdown_table(list(rows.values()), "t", {"device": "d", "torch": "t", "date": "x", "command": "c"})
    assert "| g | ours | 100.000 | 0.000 | 3.00x | 4.00x vs original | - |" in table


def test_interleave_alternates_the_order_and_takes_per_round_ratios(monkeypatch):
    """Each round runs every callable once, reversed on odd rounds; the ratio baseline /
    callable is taken within a round, so a machine that slows down mid-run (here: round 2
    runs everything 10x slower) leaves the median ratios exact."""
    clock, order = [0.0], []
    speed = {0: 1.0, 1: 1.0, 2: 10.0}
    rnd = [0]

    def fn(name, cost):
        def run():
            order.append(name)
            clock[0] += cost * speed[rnd[0]]
            if len(order) % 3 == 0:
                rnd[0] += 1
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    res = bench.interleave({"orig": fn("orig", 4.0), "ref": fn("ref", 2.0), "ours": fn("ours", 1.0)}, 3, "orig")
    assert order == ["orig", "ref", "ours", "ours", "ref", "orig", "orig", "ref", "ours"]
    assert res["median_ratio"] == {"orig": 1.0, "ref": 2.0, "ours": 4.0}
    assert res["ratios"]["ours"] == [4.0, 4.0, 4.0]
    assert res["median_s"] == {"orig": 4.0, "ref": 2.0, "ours": 1.0}  # rounds 0, 1 at speed 1
    with pytest.raises(ValueError, match="baseline 'x' is not one of orig"):
        bench.interleave({"orig": fn("orig", 1.0)}, 1, "x")
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        bench.interleave({"orig": fn("orig", 1.0)}, 0, "orig")


def test_interleaved_run_writes_both_tables(monkeypatch, tmp_path):
    """`batchkin bench interleaved` runs the DRLoc and engine scripts (engine on one CPU thread)
    and writes their rows as JSON and Markdown into the device's results folder."""
    calls = []
    drloc = [{"size": "B8 C32 7x7", "original_ms": 2.0, "reference_ms": 1.5, "ours_ms": 1.0, "ours_vs_original": 2.01,
              "ratios": [2.0, 2.01, 2.02]}]

    def fake(cmd, root, env):
        calls.append((cmd, env.get("OMP_NUM_THREADS")))
        if "bench/test_bench_drloc_pairs.py" in cmd:
            return drloc
        return {"case": cmd[cmd.index("--case") + 1], "plain_s": 1.0, "engine_s": 1.02, "steps": 10, "batch": 128,
                "ratio_plain_over_engine": 0.98, "ratios": [0.97, 0.98, 0.99]}

    monkeypatch.setattr(bench, "_json_of", fake)
    tables = tmp_path / "bench" / "results" / "README.md"
    tables.parent.mkdir(parents=True)
    tables.write_text(f"x\n{bench.README_START}\nold\n{bench.README_END}\n")  # not asked to update: left alone
    meta = {"device": "dev", "torch": "t", "triton": None, "date": "d", "threads": 2, "command": "c"}
    md = bench._run_interleaved(tmp_path, tmp_path, "cpu", True, meta, {})
    assert [c[0][1] for c in calls] == ["bench/test_bench_drloc_pairs.py", "bench/test_bench_engine.py"]
    assert "--quick" in calls[0][0] and calls[1][1] == "1"
    text = md.read_text()
    assert "| B8 C32 7x7 | 2.0 | 1.5 | 1.0 | 2.01x |" in text
    assert "| ce-resnet32 | 1.000 | 1.020 | 0.980 | 0.97, 0.98, 0.99 |" in text
    assert "10 training steps of batch 128" in text
    saved = json.loads((tmp_path / "interleaved.json").read_text())
    assert saved["drloc"] == drloc and saved["engine"][0]["case"] == "ce-resnet32"
    assert tables.read_text() == f"x\n{bench.README_START}\nold\n{bench.README_END}\n"


# ------------------------------------------------------------------------------ where results go


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A source checkout with recorded results and bench/results/README.md with its generated
    section; pytest (the benchmark run) is faked: it writes pytest-benchmark's JSON for one
    reference row."""
    (tmp_path / "bench" / "results" / "old-device").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "old-device" / "e2e.md").write_text("### E2E\n\nrecorded table\n")
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "README.md").write_text("# the project's README\n")
    readme = f"# x\n\n{bench.README_START}\nold section\n{bench.README_END}\n\nafter\n"
    (tmp_path / "bench" / "results" / "README.md").write_text(readme)
    monkeypatch.setattr(bench, "repo_root", lambda: tmp_path)
    monkeypatch.setattr(bench, "device_name", lambda device: "dev")

    def fake_pytest(cmd, cwd, env):
        out = next(a.split("=", 1)[1] for a in cmd if a.startswith("--benchmark-json="))
        Path(out).write_text(json.dumps({"benchmarks": [
            {"group": "g", "name": "n", "extra_info": {"path": "ref"}, "stats": {"median": 0.5, "iqr": 0.0,
                                                                                 "rounds": 3}}]}))
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(bench.subprocess, "run", fake_pytest)
    return tmp_path, readme


def test_a_quick_benchmark_writes_under_its_quick_folder_and_leaves_the_readme(checkout):
    root, readme = checkout
    path = bench.run("kernels", "cpu", quick=True)
    assert path == root / "bench" / "results" / "dev" / "quick" / "kernels.md"
    assert "| g | ref | 500.000 | 0.000 | 1.00x |" in path.read_text()
    assert (root / "bench" / "results" / "README.md").read_text() == readme
    assert not (root / "bench" / "results" / "dev" / "kernels.md").exists()  # full results untouched


def test_a_full_benchmark_changes_the_readme_only_when_asked(checkout):
    root, readme = checkout
    path = bench.run("kernels", "cpu", quick=False)
    assert path == root / "bench" / "results" / "dev" / "kernels.md"
    assert (root / "bench" / "results" / "README.md").read_text() == readme
    bench.run("kernels", "cpu", quick=True)  # quick results are never read into the README
    bench.run("kernels", "cpu", quick=False, update=True)
    text = (root / "bench" / "results" / "README.md").read_text()
    assert "old section" not in text and text.endswith(f"{bench.README_END}\n\nafter\n")
    assert text.startswith(f"# x\n\n{bench.README_START}\n\n### dev — kernels\n")
    assert "### old-device — e2e\n\nrecorded table\n" in text
    assert "quick" not in text.split(bench.README_START)[1]
    assert (root / "README.md").read_text() == "# the project's README\n"  # the project's README is not generated


def test_the_cli_runs_the_checkouts_harness_and_refuses_without_a_checkout(tmp_path, monkeypatch, capsys):
    """`batchkin bench` loads bench/harness.py of the checkout (the module these tests use); an
    install without a checkout (no bench/harness.py here or where the package lives) is one line."""
    from batchkin import cli

    assert cli.bench_harness() is bench and Path(bench.__file__) == ROOT / "bench" / "harness.py"
    assert importlib.util.find_spec("batchkin.bench") is None and importlib.util.find_spec("batchkin.faults") is None
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench").mkdir()  # a bench/ folder without the harness is no checkout either
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "batchkin" / "cli.py"))
    assert cli.main(["bench", "kernels", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchkin: error: batchkin bench needs a source checkout") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench"]


@pytest.mark.parametrize("argv,fragment", [
    (["bench", "kernels", "--quick", "--update-readme"], "--update-readme takes full results only"),
    (["bench", "accuracy", "--update-readme"], "the accuracy tables live in docs/results/"),
])
def test_update_readme_refuses_what_it_cannot_show(checkout, capsys, argv, fragment):
    from batchkin.cli import main

    root, readme = checkout
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("batchkin: error: ") and fragment in err and err.count("\n") == 1
    assert (root / "bench" / "results" / "README.md").read_text() == readme
    assert not (root / "bench" / "results" / "dev").exists()


def test_a_missing_pytest_benchmark_is_one_line(checkout, monkeypatch):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "pytest_benchmark" else real(
        name))
    with pytest.raises(
        bench.BatchkinError, match=r"needs pytest_benchmark, which is not installed: pip install -e '\.\[bench\]'"):
        bench.run("e2e", "cpu", quick=True)
