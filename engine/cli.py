"""The ``batchkin`` command line.

Every user error (bad config, missing or corrupt data, a broken plugin, an
unusable run folder, a folder the file system refuses) is printed as one line
``batchkin: error: ...`` and exits with code 2; nothing in an existing run
folder is overwritten. Under several processes each rank prints its own line,
prefixed with its rank. Output cut short by its reader (``batchkin eval ... |
head``) ends the command quietly with code 141, as a shell reports a process
ended by SIGPIPE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .errors import BatchkinError, one_line

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process ended by SIGPIPE


def _add_plugin_arg(p, run_files: bool = False):
    p.add_argument("--plugin", action="append", default=[], metavar="FILE",
                   help="load a plugin module from a local .py file (repeatable)"
                   + ("; the plugin files a run was trained with are loaded again by themselves" if run_files else ""))
    if run_files:
        p.add_argument("--allow-changed-plugins", action="store_true",
                       help="use a plugin file the run was trained with even though its content changed since")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchkin", description="batchkin: training methods as plugins")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a run")
    t.add_argument("config", nargs="?", help="TOML config (default: the built-in defaults, digits + resnet8 + ce)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--out", help="run folder (default: runs/<config name>, numbered if it exists)")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                   "(a run without one starts again from its saved config)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace an existing batchkin run folder (the old run stays until the new one's first checkpoint)")
    t.add_argument("--until", type=int, metavar="EPOCH", help="stop after this epoch (the schedule still spans `epochs`)")
    t.add_argument("--nproc", type=int, metavar="N", help="launch N processes with torchrun (DDP)")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    _add_plugin_arg(t, run_files=True)

    e = sub.add_parser("eval", help="evaluate a checkpoint or a run folder")
    e.add_argument("checkpoint", help="a checkpoint file or a run folder (uses checkpoints/last.pt)")
    e.add_argument("--split", choices=["test", "val"], default="test")
    e.add_argument("--best", action="store_true", help="use checkpoints/best.pt of a run folder")
    _add_plugin_arg(e, run_files=True)

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
    _add_plugin_arg(pr, run_files=True)

    bn = sub.add_parser("bench", help="run benchmarks and write bench/results/<device>/ (needs a source checkout)")
    bn.add_argument("kind", choices=["kernels", "e2e", "accuracy", "interleaved"])
    bn.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bn.add_argument("--quick", action="store_true", help="the smallest sizes only")

    sub.add_parser("doctor", help="versions, devices and which path every kernel takes")
    b = sub.add_parser("build", help="compile the C++ kernels ahead of time")
    b.add_argument("--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BatchkinError as exc:
        return error(str(exc))
    except BrokenPipeError:
        _stdout_to_devnull()
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # the file system refused: a path under a file, a read-only folder, ...
        return error(f"{exc.filename}: {exc.strerror}" if exc.filename and exc.strerror else str(exc))
    except KeyboardInterrupt:
        print("batchkin: interrupted", file=sys.stderr)
        return 130


def error(message: str) -> int:
    """Print ``batchkin: error: MESSAGE`` as one line (prefixed with the rank under several
    processes) and return the exit code of a user error."""
    rank = f"rank {os.environ['RANK']}: " if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""
    sys.stderr.write(f"batchkin: error: {rank}{one_line(message)}\n")  # one write: ranks share the stream
    sys.stderr.flush()
    return EXIT_USAGE


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


# ------------------------------------------------------------------------------ train


def _default_out(config: str | None) -> str:
    stem = Path(config).stem if config else "default"
    base = Path("runs") / stem
    out, i = base, 1
    while out.exists() and any(out.iterdir()):
        i += 1
        out = base.with_name(f"{stem}-{i}")
    return str(out)


def _recover(run: Path, quiet: bool) -> None:
    """Finish a replacement of the run folder ``run`` that a killed process cut short."""
    from .rundir import RunDir

    for note in RunDir(run).recover():
        if not quiet:
            print(f"batchkin: note: {note}", file=sys.stderr)


def _run_plugins(run: Path | None, args, quiet: bool = False):
    """The plugins of a command on the run folder ``run``: ``--plugin`` files, and the plugin
    files the run was trained with (run.json), checked against their recorded sha256."""
    from .plugin import ENV_PLUGINS, Plugins
    from .rundir import plugin_files_for_run

    given = list(args.plugin)
    if run is None:
        return Plugins(extra_files=given)
    _recover(run, quiet)
    env = [f for f in os.environ.get(ENV_PLUGINS, "").split(os.pathsep) if f]
    return Plugins(extra_files=given + plugin_files_for_run(run, given + env, args.allow_changed_plugins))


def cmd_train(args) -> int:
    from .config import apply_overrides, load_raw
    from .errors import ConfigError
    from .trainer import fit, resume_config

    if args.until is not None and args.until < 1:
        raise ConfigError(f"--until must be an epoch >= 1; got {args.until}")
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces it: give one of them")
    if args.allow_changed_plugins and not args.resume:
        raise ConfigError("--allow-changed-plugins applies to --resume (and eval) of a run only")
    if args.nproc is not None:
        return _launch_torchrun(args)
    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the run folder's own config; give changes with --set")
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError("--resume continues the run in its own folder; --out cannot differ")
        run = Path(args.resume)
        plugins = _run_plugins(run, args, args.quiet)
        raw = apply_overrides(resume_config(run), args.set)
        out = str(run)
    else:
        raw = apply_overrides(load_raw(args.config), args.set)
        out = args.out or _default_out(args.config)
        plugins = _run_plugins(None, args)
    fit(raw, out, resume=bool(args.resume), overwrite=args.overwrite, until=args.until, plugins=plugins,
        progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"batchkin: run folder {out}", file=sys.stderr)
    return 0


def _launch_torchrun(args) -> int:
    """Run ``batchkin train`` (without ``--nproc``) on ``--nproc`` processes with torchrun.

    Each rank reports its own error as one line (torchrun then stops the other ranks); the
    launcher adds a line only when no rank reported one (a rank killed by a signal, a crash),
    and never prints torchrun's own traceback.
    """
    import logging
    import signal

    from .errors import ConfigError, RunError

    if args.nproc < 1:
        raise ConfigError(f"--nproc must be >= 1 (the number of processes); got {args.nproc}")
    cleaned, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            cleaned.append(a)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(args.nproc), "-m", "batchkin", *cleaned])
    # torchrun's own log lines (rendezvous, OMP_NUM_THREADS, the failure table) are not the user's
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(launch)
    except ChildFailedError as exc:
        if any(f.exitcode == EXIT_USAGE for f in exc.failures.values()):
            return EXIT_USAGE  # the failing ranks printed their lines; torchrun then stopped the others
        # the rank that failed first, not one that torchrun then stopped (with SIGTERM)
        rank, failure = min(exc.failures.items(),
                            key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))
        how = f"was killed by signal {failure.signal_name()}" if failure.exitcode < 0 else \
            f"exited with code {failure.exitcode}"
        raise RunError(f"rank {rank} of {args.nproc} {how} without reporting an error (its output is above)")
    return 0


# ------------------------------------------------------------------------------ eval


def cmd_eval(args) -> int:
    from .config import load_raw
    from .data import DeviceData
    from .errors import RunError
    from .rundir import load_checkpoint
    from .trainer import evaluate, prepare, restore

    path = Path(args.checkpoint)
    if not path.exists():
        _recover(path, quiet=True)
    if path.is_dir():
        run, ckpt_path = path, path / "checkpoints" / ("best.pt" if args.best else "last.pt")
    else:
        run, ckpt_path = path.parent.parent, path
    plugins = _run_plugins(run, args, quiet=True)
    if not (run / "config.toml").is_file():
        raise RunError(f"no config.toml found for {path} (expected in {run})")
    ckpt = load_checkpoint(ckpt_path)
    state = prepare(load_raw(run / "config.toml"), plugins)
    restore(state, ckpt)
    split = state.splits.test if args.split == "test" else state.splits.val
    if not len(split):
        raise RunError(f"the {args.split} split of {run} is empty (data.val_fraction = "
                       f"{state.config.data.val_fraction}); evaluate --split test instead")
    metrics = evaluate(state, args.split, DeviceData(split, state.splits, state.device))
    print_json({"checkpoint": str(ckpt_path), "epoch": ckpt["epoch"], "split": args.split, **metrics})
    return 0


def print_json(data) -> None:
    """Print ``data`` as strict JSON: a metric that is undefined (NaN, e.g. the accuracy of an
    empty group of classes) is ``null``, never the invalid bare ``NaN``."""
    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v

    print(json.dumps(strict(data), indent=2, allow_nan=False))


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
    for name in dispatch.ensure_ops_imported():
        for dev in devices:
            try:
                path, reason = dispatch.explain(name, dev)
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
    from .schema import shown
    from batchkin.probe import linear_probe

    run = Path(args.run_dir)
    plugins = _run_plugins(run, args, quiet=True)
    if not (run / "config.toml").is_file():
        raise RunError(f"{run} is not a batchkin run folder (no config.toml)")
    for name, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1; got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0; got {args.lr}")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0; got {args.weight_decay}")
    if not -(2**63) <= args.seed < 2**63:
        raise ConfigError(f"--seed must fit in a 64-bit signed integer; got {shown(args.seed)}")
    result = linear_probe(run, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                          weight_decay=args.weight_decay, seed=args.seed,
                          checkpoint="best.pt" if args.best else "last.pt", plugins=plugins)
    print_json({"run": str(run), **result})
    return 0


def cmd_bench(args) -> int:
    from .bench import run

    path = run(args.kind, args.device, args.quick)
    print(f"batchkin: results in {path}")
    return 0


COMMANDS = {"probe": cmd_probe, "bench": cmd_bench, "train": cmd_train, "eval": cmd_eval, "plugins": cmd_plugins, "doctor": cmd_doctor, "build": cmd_build}
