"""The ``batchkin`` command line.

Every user error (bad config, missing or corrupt data, a broken plugin, an
unusable run folder) is printed as one line ``batchkin: error: ...`` and exits
with code 2; nothing in an existing run folder is overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from .errors import BatchkinError

EXIT_USAGE = 2


def _add_plugin_arg(p):
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="load a plugin module from a local .py file (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchkin", description="batchkin: training methods as plugins")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run")
    t.add_argument("config", nargs="?", help="TOML config (default: the built-in defaults, digits + resnet8 + ce)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/<config name>, numbered if it exists)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    t.add_argument("--until", type=int, metavar="EPOCH", help="stop after this epoch (the schedule still spans `epochs`)")
    t.add_argument("--nproc", type=int, default=0, metavar="N", help="launch N processes with torchrun (DDP)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    _add_plugin_arg(t)

    e = sub.add_parser("eval", help="evaluate a checkpoint or a run folder")
    e.add_argument("checkpoint", help="a checkpoint file or a run folder (uses checkpoints/last.pt)")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--best", action="store_true", help="use checkpoints/best.pt of a run folder")
    _add_plugin_arg(e)

    p = sub.add_parser("plugins", help="list plugins, methods, models and datasets")
    p.add_argument("--hook", help="list the methods implementing this hook")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _add_plugin_arg(p)

    pr = sub.add_parser("probe", help="linear-probe accuracy of a self-supervised run's frozen encoder")
    pr.add_argument("run_dir", help="a run folder (uses checkpoints/last.pt)")
    pr.add_argument("--epochs", type=int, default=100)
    pr.add_argument("--lr", type=float, default=0.1)
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--weight-decay", type=float, default=0.0)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--best", action="store_true", help="use checkpoints/best.pt")
    _add_plugin_arg(pr)

    bn = sub.add_parser("bench", help="run benchmarks and write bench/results/<device>/ (needs a source checkout)")
    bn.add_argument("kind", choices=["kernels", "e2e", "accuracy", "interleaved"])
    bn.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bn.add_argument("--quick", action="store_true", help="the smallest sizes only")

    sub.add_parser("doctor", help="versions, devices and which path every kernel takes")
    b = sub.add_parser("build", help="compile the C++ kernels ahead of time")
    b.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except BatchkinError as exc:
        print(f"batchkin: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("batchkin: interrupted", file=sys.stderr)
        return 130


# ------------------------------------------------------------------------------ train


def _default_out(config: str | None) -> str:
    stem = Path(config).stem if config else "default"
    base = Path("runs") / stem
    out, i = base, 1
    while out.exists() and any(out.iterdir()):
        i += 1
        out = base.with_name(f"{stem}-{i}")
    return str(out)


def cmd_train(args) -> int:
    from .config import apply_overrides, load_raw
    from .errors import ConfigError
    from .plugin import Plugins
    from .trainer import fit

    if args.nproc:
        return _launch_torchrun(args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run folder's own config; give changes with --set")
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume continues the run in its own folder; --out cannot differ")
        run = Path(args.resume)
        if not (run / "config.toml").is_file():
            raise ConfigError(f"{run} is not a batchkin run folder (no config.toml)")
        raw = apply_overrides(load_raw(run / "config.toml"), args.set)
        out = str(run)
    else:
        raw = apply_overrides(load_raw(args.config), args.set)
        out = args.out or _default_out(args.config)
    plugins = Plugins(extra_files=args.plugin)
    fit(raw, out, resume=bool(args.resume), overwrite=args.overwrite, until=args.until, plugins=plugins,
        progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"batchkin: run folder {out}", file=sys.stderr)
    return 0


def _launch_torchrun(args) -> int:
    argv = [a for a in sys.argv[1:]]
    cleaned, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        cleaned.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc), "-m", "batchkin", *cleaned]
    return subprocess.call(cmd)


# ------------------------------------------------------------------------------ eval


def cmd_eval(args) -> int:
    from .config import load_raw
    from .data import DeviceData
    from .errors import RunError
    from .plugin import Plugins
    from .rundir import load_checkpoint
    from .trainer import evaluate, prepare, restore

    path = Path(args.checkpoint)
    if path.is_dir():
        run, ckpt_path = path, path / "checkpoints" / ("best.pt" if args.best else "last.pt")
    else:
        run, ckpt_path = path.parent.parent, path
    if not (run / "config.toml").is_file():
        raise RunError(f"no config.toml found for {path} (expected in {run})")
    ckpt = load_checkpoint(ckpt_path)
    state = prepare(load_raw(run / "config.toml"), Plugins(extra_files=args.plugin))
    restore(state, ckpt)
    split = state.splits.test if args.split == "test" else state.splits.val
    metrics = evaluate(state, args.split, DeviceData(split, state.splits, state.device))
    print(json.dumps({"checkpoint": str(ckpt_path), "epoch": ckpt["epoch"], "split": args.split, **metrics}, indent=2))
    return 0


# ------------------------------------------------------------------------------ plugins


def cmd_plugins(args) -> int:
    from .plugin import Plugins

    plugins = Plugins(extra_files=args.plugin)
    reg = plugins.registry
    methods = {name: {"origin": e.origin, "hooks": plugins.method_hooks(name)} for name, e in sorted(reg.methods.items())}
    if args.hook:
        from . import hookspecs

        if not hasattr(hookspecs, args.hook) or args.hook.startswith("_"):
            from .errors import ConfigError
            from .schema import suggest

            specs = [n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "batchkin_spec")]
            raise ConfigError(f"unknown hook {args.hook!r}{suggest(args.hook, specs)}")
        names = [n for n, m in methods.items() if args.hook in m["hooks"]]
        if args.hook.startswith("register_"):
            names = [n for n, o in plugins.origins.items() if hasattr(plugins.pm.get_plugin(n), args.hook)]
        print("\n".join(names) if names else f"(no plugin implements {args.hook})")
        return 0
    data = {
        "plugins": plugins.origins,
        "methods": methods,
        "models": {n: e.origin for n, e in sorted(reg.models.items())},
        "datasets": {n: e.origin for n, e in sorted(reg.datasets.items())},
        "autoload": plugins.autoload,
    }
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    print("methods:")
    for name, m in methods.items():
        print(f"  {name:<20} {m['origin']:<28} hooks: {', '.join(m['hooks']) or '-'}")
    print("models:")
    for name, origin in data["models"].items():
        print(f"  {name:<20} {origin}")
    print("datasets:")
    for name, origin in data["datasets"].items():
        print(f"  {name:<20} {origin}")
    if not plugins.autoload:
        print("(entry-point autoloading is disabled: BATCHKIN_DISABLE_PLUGIN_AUTOLOAD)")
    return 0


# ------------------------------------------------------------------------------ doctor / build


def cmd_doctor(args) -> int:
    import platform

    import torch

    from . import __version__
    from batchkin.kernels import dispatch

    print(f"batchkin {__version__}, python {platform.python_version()}, torch {torch.__version__}")
    ok, interp, why = dispatch.triton_status()
    print(f"triton: {why}")
    print(f"CUDA: {'available, ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    print(f"kernel mode: {dispatch.requested_mode()} ({dispatch.ENV_MODE}); C++ cache: {dispatch.cache_dir()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    import importlib

    for name in dispatch.ensure_ops_imported():
        # an op whose CPU path is not a C++ extension (batch attention: SDPA) explains itself
        own = getattr(importlib.import_module(f"batchkin.kernels.{name}"), "explain_path", None)
        for dev in devices:
            try:
                path, reason = own(dev) if own else dispatch.explain(name, dev)
            except dispatch.KernelUnavailable as exc:
                path, reason = "unavailable", str(exc)
            print(f"  {name:<18} {dev:<5} -> {path:<7} {reason}")
    return 0


def cmd_build(args) -> int:
    from batchkin.kernels import dispatch

    failed = []
    for name in dispatch.ensure_ops_imported():
        info = dispatch.REGISTRY[name]
        if info.cpp_library is None:
            print(f"  {name:<18} no C++ extension")
            continue
        ok = dispatch.load_cpp(info, verbose=args.verbose)
        print(f"  {name:<18} {'built' if ok else 'FAILED: ' + dispatch.cpp_error(info)}")
        if not ok:
            failed.append(name)
    return 1 if failed else 0


def cmd_probe(args) -> int:
    from .errors import ConfigError, RunError
    from .plugin import Plugins
    from batchkin.probe import linear_probe

    run = Path(args.run_dir)
    if not (run / "config.toml").is_file():
        raise RunError(f"{run} is not a batchkin run folder (no config.toml)")
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1; got {value}")
    if args.lr <= 0:
        raise ConfigError(f"--lr must be > 0; got {args.lr}")
    result = linear_probe(run, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          weight_decay=args.weight_decay, seed=args.seed,
                          checkpoint="best.pt" if args.best else "last.pt", plugins=Plugins(extra_files=args.plugin))
    print(json.dumps({"run": str(run), **result}, indent=2))
    return 0


def cmd_bench(args) -> int:
    from .bench import run

    path = run(args.kind, args.device, args.quick)
    print(f"batchkin: results in {path}")
    return 0


COMMANDS = {"probe": cmd_probe, "bench": cmd_bench, "train": cmd_train, "eval": cmd_eval, "plugins": cmd_plugins, "doctor": cmd_doctor, "build": cmd_build}
