"""Soak: many kill -9 / resume cycles of a tiny run, counting divergences and lost epochs.

Not part of the test suite (a thousand cycles take about an hour on two CPU cores).
Each cycle starts one child process (``python tests/faults.py``) that resumes the
current run folder (or starts it) and is killed with SIGKILL at a point drawn from an
explicit generator:

* ``step``: right after a random optimizer step within the next two epochs;
* ``write``: in the middle of one of the process's first atomic file writes
  (checkpoints, metrics.jsonl, config.toml, run.json), half the bytes on disk;
* ``signal``: by the parent after a random delay, wherever the child is (importing,
  building the data, training, writing).

After every cycle the harness checks what a user relies on: the run folder's
``last.pt`` loads (``weights_only``), its epoch never goes backwards (a finished epoch
is never lost), and the metrics lines of the checkpointed epochs equal those of an
uninterrupted reference run. When a child finishes the run, its final weights and
metrics.jsonl must equal the reference's exactly (a divergence otherwise), and the
next cycle starts a fresh run folder. Any other exit status is a failure.

    python bench/soak.py                      # 1,000 cycles, results under bench/results/<device>/soak.*
    python bench/soak.py --cycles 50 --out /tmp/soak
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the fault-injection toolkit, tests/faults.py

import faults  # noqa: E402

EPOCHS = 6
STEPS_PER_EPOCH = 6  # synthetic: 4 classes x 24 images = 96 images, 80 in the training split -> 5 + 1 batches of 16


def same_weights(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def one_cycle(run: Path, rng: np.random.Generator, step_now: int, max_delay: float) -> tuple[str, int, int, str]:
    """One child process with one fault; returns (fault kind, its position, exit status, stderr tail)."""
    if (run / "checkpoints" / "last.pt").is_file():
        cli = ["train", "--quiet", "--resume", str(run), "--plugin", faults.PLUGIN_FILE]
    else:
        cli = ["train", "--quiet", "--overwrite", "--out", str(run), *faults.tiny_run_args(EPOCHS),
               *faults.KILLER_ARGS]
    kind = str(rng.choice(["step", "write", "signal"], p=[0.5, 0.25, 0.25]))
    if kind == "step":
        at = step_now + int(rng.integers(1, 2 * STEPS_PER_EPOCH + 1))
    elif kind == "write":
        at = int(rng.integers(1, 13))  # about the writes of the next two epochs
    else:
        at = int(1000 * rng.uniform(0.0, max_delay))  # milliseconds
    argv, env = faults.command(kind if kind != "signal" else "none", at if kind != "signal" else 0, cli)
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kind == "signal":
        try:
            proc.wait(timeout=at / 1000)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    return kind, at, proc.returncode, (err or "")[-1500:]


def soak(cycles: int, out: Path, seed: int, max_delay: float, verbose: bool = False, report=None) -> dict:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    ref_dir = out / "reference"
    r = faults.run("none", 0, ["train", "--quiet", "--overwrite", "--out", str(ref_dir),
                               *faults.tiny_run_args(EPOCHS), *faults.KILLER_ARGS])
    if r.returncode != 0:
        raise SystemExit(f"the reference run failed: {r.stderr[-2000:]}")
    ref_weights, ref_lines = faults.checkpoint(ref_dir)["model"], faults.epoch_lines(ref_dir)
    stats = {"cycles": 0, "completed_runs": 0, "divergences": 0, "lost_epochs": 0, "unloadable_checkpoints": 0,
             "prefix_mismatches": 0, "failures": 0, "stale_temp_files": 0,
             "kills": {"step": 0, "write": 0, "signal": 0}}
    problems: list[str] = []
    run_no, t0 = 0, time.perf_counter()
    run = out / f"run{run_no}"
    shutil.rmtree(run, ignore_errors=True)
    committed = 0
    while stats["cycles"] < cycles:
        ck = faults.checkpoint(run)
        kind, at, code, err = one_cycle(run, rng, ck["step"] if ck else 0, max_delay)
        stats["cycles"] += 1
        stats["kills"][kind] += 1
        where = f"cycle {stats['cycles']} ({kind} {at}, run{run_no})"
        if code not in (0, -9):
            stats["failures"] += 1
            problems.append(f"{where}: exit {code}: {err.strip().splitlines()[-1:] if err.strip() else ''}")
        try:
            ck = faults.checkpoint(run)
        except Exception as e:  # a checkpoint on disk that does not load is a bug
            stats["unloadable_checkpoints"] += 1
            problems.append(f"{where}: last.pt does not load: {e}")
            ck = None
        epoch = ck["epoch"] if ck else 0
        if epoch < committed:
            stats["lost_epochs"] += committed - epoch
            problems.append(f"{where}: checkpoint went back from epoch {committed} to {epoch}")
        committed = max(committed, epoch)
        kept = [x for x in faults.epoch_lines(run) if x.get("kind") != "final" and x.get("epoch", 0) <= epoch]
        want = [x for x in ref_lines if x.get("kind") != "final" and x.get("epoch", 0) <= epoch]
        if kept[: len(want)] != want:
            stats["prefix_mismatches"] += 1
            problems.append(f"{where}: metrics of the checkpointed epochs differ from the reference")
        if code == 0:
            stats["completed_runs"] += 1
            if not same_weights(ck["model"], ref_weights) or faults.epoch_lines(run) != ref_lines:
                stats["divergences"] += 1
                problems.append(f"{where}: the finished run differs from the uninterrupted reference")
            if list((run / "checkpoints").glob(".*.tmp-*")):
                stats["stale_temp_files"] += 1
                problems.append(f"{where}: temporary files left in a finished run")
            shutil.rmtree(run, ignore_errors=True)
            run_no += 1
            run, committed = out / f"run{run_no}", 0
            shutil.rmtree(run, ignore_errors=True)
        elif code != -9:
            shutil.rmtree(run, ignore_errors=True)
            run_no += 1
            run, committed = out / f"run{run_no}", 0
        if verbose:
            print(f"{where}: exit {code}, checkpoint epoch {epoch}", flush=True)
        if stats["cycles"] % 50 == 0:
            print(f"[{time.perf_counter() - t0:7.0f}s] {stats}", flush=True)
            if report is not None:  # partial results survive an interrupted soak
                report({**stats, "wall_s": round(time.perf_counter() - t0, 1), "problems": problems[:50]})
    stats["wall_s"] = round(time.perf_counter() - t0, 1)
    stats["problems"] = problems[:50]
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the fault generator (recorded)")
    ap.add_argument("--max-delay", type=float, default=6.0, help="longest 'signal' delay in seconds")
    ap.add_argument("--out", default="/tmp/batchkin-soak", help="work folder (run folders)")
    ap.add_argument("--verbose", action="store_true", help="one line per cycle")
    ap.add_argument("--results", default=None, help="results folder (default bench/results/<device>/)")
    args = ap.parse_args(argv)
    import torch

    from harness import device_name

    results = Path(args.results) if args.results else ROOT / "bench" / "results" / device_name("cpu")
    given = list(argv or sys.argv[1:])
    for flag in ("--out", "--results"):  # folders: they change no result, so the recorded command leaves them out
        while flag in given:
            del given[given.index(flag):given.index(flag) + 2]
    meta = {"command": "python bench/soak.py" + "".join(f" {a}" for a in given), "seed": args.seed,
            "torch": str(torch.__version__), "date": time.strftime("%Y-%m-%d"), "device": device_name("cpu")}

    def report(stats: dict) -> str:
        results.mkdir(parents=True, exist_ok=True)
        (results / "soak.json").write_text(json.dumps({"meta": meta, "stats": stats}, indent=2) + "\n")
        status = "" if stats["cycles"] >= args.cycles else f" ({stats['cycles']} of the {args.cycles} cycles asked for)"
        lines = [
            "### Soak: kill -9 / resume cycles", "",
            f"Device: {meta['device']}; torch {meta['torch']}; {meta['date']}. Command: `{meta['command']}` "
            f"(fault generator seed {args.seed}){status}.", "",
            "| cycles | kills: step / write / signal | finished runs | divergences | lost epochs | unloadable "
            "checkpoints | metrics mismatches | other failures | wall (min) |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {stats['cycles']} | {stats['kills']['step']} / {stats['kills']['write']} / {stats['kills']['signal']} "
            f"| {stats['completed_runs']} | {stats['divergences']} | {stats['lost_epochs']} | "
            f"{stats['unloadable_checkpoints']} | {stats['prefix_mismatches']} | {stats['failures']} | "
            f"{stats['wall_s'] / 60:.1f} |", "",
        ]
        (results / "soak.md").write_text("\n".join(lines))
        return "\n".join(lines)

    stats = soak(args.cycles, Path(args.out), args.seed, args.max_delay, args.verbose, report)
    print(report(stats))
    bad = sum(stats[k] for k in ("divergences", "lost_epochs", "unloadable_checkpoints", "prefix_mismatches",
                                 "failures", "stale_temp_files"))
    for p in stats["problems"]:
        print(p, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
