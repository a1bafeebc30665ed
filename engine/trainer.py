"""The training loop. Read it top to bottom: :func:`fit` is the whole run.

The hooks fired here are specified, with the loop as pseudo-code, in
:mod:`batchkin.hookspecs`.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, is_dataclass

import torch
import torch.nn.functional as F  # noqa: F401  (used by plugins importing from here)

from . import __version__
from .config import Config, build_config, load_raw, resume_changes
from .data import DeviceData, ShuffleSampler, check_crop_padding, make_splits
from .errors import BatchkinError, ConfigError, NonFiniteError, PluginError, RunError, describe_exception, is_out_of_memory
from .hookspecs import hookimpl
from .metrics import classification_metrics, confusion_counts, shot_groups
from .models import check_protocol, state_dict_mismatch
from .plugin import Plugins, RunHooks
from .rundir import CHECKPOINT_FORMAT, MARKER, RunDir, load_checkpoint, plugin_file_records
from .schema import dump_toml, parse, shown, to_dict
from .state import State
from batchkin.kernels.rng import derive_key


# ------------------------------------------------------------------------------ engine defaults


class EngineDefaults:
    """The engine's own answers to the firstresult hooks; called after every method."""

    @hookimpl(trylast=True)
    def build_sampler(self, state):
        cfg = state.config
        return ShuffleSampler(
            len(state.train_data), cfg.data.batch_size, cfg.seed,
            drop_last=cfg.data.drop_last, rank=state.rank, world=state.world_size,
        )

    @hookimpl(trylast=True)
    def forward(self, state):
        return classify_forward(state, state.model, state.batch["x"])


def classify_forward(state, model, x) -> dict:
    """The default forward: features -> ``transform_features`` -> classifier on every stream."""
    outputs = dict(model(x, return_features=True)) if _takes_return_features(model) else dict(model.forward_features(x))
    return classify_streams(state, outputs)


def classify_streams(state, outputs: dict) -> dict:
    """Put ``outputs["features"]`` in ``outputs["streams"]``, fire ``transform_features`` and
    apply the model's classifier to every stream (``outputs["logits"]``, streams stacked).

    A method that owns the forward pass calls this once it has its features.
    """
    outputs["streams"] = [outputs["features"]]
    state.hooks.transform_features(state=state, outputs=outputs)
    classifier = state.unwrapped_model.classifier
    logits = [classifier(s) for s in outputs["streams"]]
    outputs["logits"] = logits[0] if len(logits) == 1 else torch.cat(logits)
    return outputs


def _takes_return_features(model) -> bool:
    return getattr(getattr(model, "module", model), "supports_return_features", False)


# ------------------------------------------------------------------------------ pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device = {name!r} but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device = {name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return dev


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    if mode == "off":
        return None
    if mode == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mode == "fp16" and device.type != "cuda":
        raise ConfigError("train.amp = 'fp16' needs a CUDA device (use 'bf16' or 'off' on CPU)")
    return torch.float16 if mode == "fp16" else torch.bfloat16


def lr_factor(cfg: Config, steps_per_epoch: int):
    """The schedule as a function of the optimizer step (warm-up, then cosine/step/constant)."""
    s = cfg.schedule
    total = cfg.epochs * steps_per_epoch
    warm = int(round(s.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return s.warmup_start + (1 - s.warmup_start) * step / warm
        if s.name == "cosine":
            t = (step - warm) / max(total - warm, 1)
            return s.min_lr + (1 - s.min_lr) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        if s.name == "step":
            return s.gamma ** sum(step >= m * steps_per_epoch for m in s.milestones)
        return 1.0

    return factor


def build_optimizer(state: State):
    cfg = state.config.optim
    model = state.model
    claimed: dict[int, str] = {}
    groups = []
    for extra in state.hooks.param_groups(state=state):
        for g in extra or []:
            params = [p for p in g["params"] if p.requires_grad]
            name = g.get("name", "group")
            for p in params:
                if id(p) in claimed:
                    raise ConfigError(f"parameter group {name!r} claims a parameter already in {claimed[id(p)]!r}")
                claimed[id(p)] = name
            groups.append({
                "params": params, "name": name,
                "lr": cfg.lr * g.get("lr_scale", 1.0),
                "weight_decay": cfg.weight_decay * g.get("weight_decay_scale", 1.0),
            })
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    if cfg.no_decay_norm_bias:
        decay = [p for p in rest if p.dim() > 1]
        no_decay = [p for p in rest if p.dim() <= 1]
        groups = [{"params": decay, "name": "default"}, {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}] + groups
    else:
        groups = [{"params": rest, "name": "default"}] + groups
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    return opt


class Progress:
    """tqdm bar on a terminal, plain periodic lines otherwise; silent on ranks > 0."""

    def __init__(self, enabled: bool, log_every: int, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self.bar = None

    def start_epoch(self, epoch: int, epochs: int, total: int):
        self.epoch, self.epochs, self.total, self.t0 = epoch, epochs, total, time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=f"epoch {epoch}/{epochs}", file=self.stream, leave=False, dynamic_ncols=True)

    def update(self, step: int, loss: float, lr: float):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", refresh=False)
        elif step % self.log_every == 0 or step == self.total:
            print(f"epoch {self.epoch}/{self.epochs} step {step}/{self.total} loss {loss:.4f} lr {lr:.4g}",
                  file=self.stream, flush=True)

    def end_epoch(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str):
        if self.enabled:
            print(text, file=self.stream, flush=True)


# ------------------------------------------------------------------------------ the run


@dataclass
class RunResult:
    run_dir: str
    final: dict  # the final line of metrics.jsonl (test metrics)
    state: State


def prepare(raw: dict, plugins: Plugins | None = None, *, rank: int = 0, world_size: int = 1) -> State:
    """Everything before the first epoch: config, methods, data, model, sampler, optimizer."""
    plugins = plugins or Plugins()
    cfg = build_config(raw, plugins.registry.methods)
    device = resolve_device(cfg.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % max(torch.cuda.device_count(), 1))
    hooks = RunHooks(plugins, cfg.methods, cfg.method_options, EngineDefaults())
    state = State(config=cfg, device=device, hooks=hooks, rank=rank, world_size=world_size)
    state.amp_dtype = amp_dtype(cfg.train.amp, device)
    model_entry = plugins.model(cfg.model["name"])
    model_options = parse(model_entry.options, {k: v for k, v in cfg.model.items() if k != "name"}, "model") \
        if model_entry.options else None
    hooks.configure(state=state)

    dataset = plugins.dataset(cfg.data.name).obj(cfg.data)
    state.splits = splits = make_splits(dataset, cfg.data)
    check_crop_padding(cfg.data, splits.image_shape[1:])
    state.num_classes = splits.num_classes
    state.train_data = DeviceData(splits.train, splits, device)
    c, h, w = splits.image_shape
    state.model_options = model_options
    # parameters are initialised from the run's seed without touching the caller's RNG
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_key(cfg.seed, 0x696E6974))
            state.model = model_entry.obj(model_options, num_classes=splits.num_classes, in_channels=c, image_size=(h, w))
            check_protocol(state.model, cfg.model["name"])
            hooks.wrap_model(state=state)
        state.model.to(device)
    except BatchkinError:
        raise
    except Exception as exc:  # the builder is a plugin's code; the options may ask for any size
        what = f"model {cfg.model['name']!r} ({model_entry.origin}) with options {shown(cfg.model, 200)}"
        if is_out_of_memory(exc):
            raise ConfigError(f"{what} does not fit in the memory of {device}: {describe_exception(exc)}") from None
        raise PluginError(f"{what} failed to build: {describe_exception(exc)}") from exc
    if cfg.train.compile:
        m = state.unwrapped_model
        m.forward_features = torch.compile(m.forward_features)
    state.sampler = hooks.build_sampler(state=state)
    state.steps_per_epoch = len(state.sampler)
    if state.steps_per_epoch < 1:
        raise ConfigError("an epoch has no training step; lower data.batch_size")
    state.optimizer = build_optimizer(state)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(state.optimizer, lr_factor(cfg, state.steps_per_epoch))
    state.scaler = torch.amp.GradScaler(device.type, enabled=state.amp_dtype == torch.float16)
    return state


def resolved_config(state: State) -> dict:
    """The run's config with every default filled in (written to config.toml)."""
    cfg = state.config
    d = to_dict(cfg)
    d.pop("method_options")
    d["model"] = {"name": cfg.model["name"], **(to_dict(state.model_options) if state.model_options else {})}
    d.update(cfg.method_options)  # tables of registered methods that are not enabled, kept as written
    for name, method in state.hooks.methods.items():
        options = getattr(method, "options", None)
        d[name] = to_dict(options) if options is not None and is_dataclass(options) else {}
    return d


def checkpoint_dict(state: State, best: dict) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": state.epoch,
        "step": state.step,
        "model": state.unwrapped_model.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "sampler": state.sampler.state_dict(),
        "rng": {
            "cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if state.device.type == "cuda" else [],
        },
        "generators": {k: g.get_state() for k, g in state.generators.items()},
        "methods": state.hooks.state_dicts(),
        "method_order": list(state.hooks.names),
        "best": best,
        "versions": {"batchkin": __version__, "torch": str(torch.__version__)},
    }


def restore(state: State, ckpt: dict) -> dict:
    if ckpt["method_order"] != state.hooks.names:
        raise RunError(f"the checkpoint was trained with methods {ckpt['method_order']}, the config lists {state.hooks.names}")
    mismatch = state_dict_mismatch(state.unwrapped_model, ckpt["model"])
    if mismatch:
        raise RunError(f"the checkpoint does not fit the model: {mismatch}")
    saved = ckpt["optimizer"].get("param_groups", []) if isinstance(ckpt["optimizer"], dict) else []
    groups = state.optimizer.param_groups
    if [g.get("name") for g in saved] != [g.get("name") for g in groups] or \
            any(("betas" in a) != ("betas" in b) for a, b in zip(saved, groups)):
        o = state.config.optim
        raise RunError(f"the checkpoint's optimizer is not the config's (optim.name = {o.name!r}, optim.no_decay_norm_bias = "
                       f"{o.no_decay_norm_bias}, {len(groups)} parameter groups): the optimizer cannot change on resume")

    def rng():
        torch.set_rng_state(ckpt["rng"]["cpu"])
        if ckpt["rng"]["cuda"] and state.device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        for key, gstate in ckpt["generators"].items():
            name, _, dev = key.rpartition("@")
            state.generator(name, dev).set_state(gstate)

    parts = (("model", lambda: state.unwrapped_model.load_state_dict(ckpt["model"])),
             ("optimizer", lambda: state.optimizer.load_state_dict(ckpt["optimizer"])),
             ("scheduler", lambda: state.scheduler.load_state_dict(ckpt["scheduler"])),
             ("scaler", lambda: state.scaler.load_state_dict(ckpt["scaler"])),
             ("sampler", lambda: state.sampler.load_state_dict(ckpt["sampler"])),
             ("RNG", rng),
             ("methods'", lambda: state.hooks.load_state_dicts(ckpt["methods"])))
    for part, load in parts:
        try:
            load()
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
            raise RunError(f"the checkpoint's {part} state does not fit this run: {describe_exception(exc)}") from None
    state.epoch, state.step = ckpt["epoch"], ckpt["step"]
    return ckpt.get("best", {})


def _autocast(state: State):
    if state.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=state.amp_dtype)


def _read_loss(loss: torch.Tensor, terms: dict) -> tuple[float | None, list[bool]]:
    """The loss value and whether each term is all-finite, read from the device at once.

    One small tensor, [loss, isfinite(term_1), ..., isfinite(term_k)], crosses to the
    host: one wait for the device instead of one per term plus one for the loss. The
    value is None when the loss has more than one element (``float`` would refuse it).
    """
    finite = torch.stack([torch.isfinite(t.detach()).all().to(loss.device) for t in terms.values()]).float()
    scalar = loss.numel() == 1
    values = (torch.cat([loss.detach().float().reshape(1), finite]) if scalar else finite).tolist()
    return (values[0] if scalar else None), [v != 0 for v in values[scalar:]]


def train_step(state: State, indices: dict) -> float:
    cfg = state.config
    state.training = True
    raw = any(getattr(m, "raw_batch", False) for m in state.hooks.methods.values())
    batch = {}
    with state.phase("data"):
        for stream, idx in indices.items():
            suffix = f"_{stream}" if stream else ""
            if raw:  # a method builds its own views: the uint8 images as stored
                dev_idx = idx.to(state.device, non_blocking=True)
                x, y = state.train_data.x[dev_idx], state.train_data.y[dev_idx]
            else:
                x, y = state.train_data.batch(idx, augment=cfg.data.augment, padding=cfg.data.crop_padding,
                                              hflip=state.splits.hflip, gen=state.generator("augment"),
                                              shard=(state.rank, state.world_size))
            batch["x" + suffix], batch["y" + suffix] = x, y
            batch["idx" + suffix] = idx  # dataset indices: state.train_data.x[idx] are the raw uint8 images
    state.batch = batch
    with state.phase("hooks"):
        state.hooks.transform_batch(state=state)
    with _autocast(state):
        with state.phase("forward"):
            state.outputs = state.hooks.forward(state=state)
        with state.phase("loss"):
            terms, owner = state.hooks.collect_loss_terms(state=state, outputs=state.outputs)
    if not terms:
        raise ConfigError(f"no enabled method produced a loss term (methods: {', '.join(state.hooks.names)}); add 'ce'")
    state.loss_terms = terms
    loss = sum(t.float() for t in terms.values())
    state.step_skipped = False
    loss_value, finite = _read_loss(loss, terms)
    bad = [k for k, ok in zip(terms, finite) if not ok]
    with state.phase("backward"):
        state.optimizer.zero_grad(set_to_none=True)
        if not bad:
            state.scaler.scale(loss).backward()
            state.scaler.unscale_(state.optimizer)
            state.hooks.before_optimizer_step(state=state)
            params = [p for g in state.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if cfg.train.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            else:
                # one fused pass (the same kernel clip_grad_norm_ uses) for the non-finite check
                norms = torch._foreach_norm([p.grad.detach() for p in params]) if params else [torch.zeros(())]
                norm = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
            grads_finite = bool(torch.isfinite(norm))
        else:
            grads_finite = False
    if bad or not grads_finite:
        if state.scaler.is_enabled() and not bad:
            state.scaler.update()  # fp16 overflow: the scaler skips the step and lowers its scale
            state.step_skipped = True
        else:
            detail = ", ".join(
                f"{k}={float(t.detach().float().mean()):.4g} (from {owner[k]})" for k, t in terms.items()
            )
            what = f"non-finite loss term(s) {', '.join(f'{b!r} from method {owner[b]!r} (loss_terms)' for b in bad)}" \
                if bad else "non-finite gradients"
            msg = f"epoch {state.epoch} step {state.step + 1}: {what}; loss terms: {detail}"
            if cfg.train.on_nonfinite == "stop":
                raise NonFiniteError(msg + " (train.on_nonfinite = 'stop')")
            print(f"batchkin: skipping {msg}", file=sys.stderr, flush=True)
            state.step_skipped = True
    else:
        with state.phase("optimizer"):
            state.scaler.step(state.optimizer)
            state.scaler.update()
    with state.phase("optimizer"):
        state.scheduler.step()
    state.step += 1
    with state.phase("hooks"):
        state.hooks.after_step(state=state)
    return loss_value if loss_value is not None else float(loss.detach())


@torch.no_grad()
def evaluate(state: State, split_name: str, data: DeviceData) -> dict:
    """Top-1, balanced, many/medium/few and per-class accuracy of ``state.model`` on a split."""
    model = state.model
    was_training = model.training
    model.eval()
    state.training = False
    k = state.num_classes
    correct = torch.zeros(k, dtype=torch.int64, device=state.device)
    total = torch.zeros(k, dtype=torch.int64, device=state.device)
    for x, y in data.eval_batches(state.config.data.eval_batch_size, state.rank, state.world_size):
        state.batch = {"x": x, "y": y}
        with _autocast(state):
            outputs = state.hooks.forward(state=state)
        c, t = confusion_counts(outputs["logits"].argmax(1), y, k)
        correct += c
        total += t
    if state.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(correct)
        dist.all_reduce(total)
    m = state.config.metrics
    groups, how = shot_groups(state.splits.train_counts(), m.many_threshold, m.few_threshold, m.shot_split)
    metrics = classification_metrics(correct.cpu(), total.cpu(), groups)
    metrics["shot_split"] = how
    state.hooks.on_evaluate(state=state, split=split_name, metrics=metrics)
    model.train(was_training)
    state.training = True
    return metrics


def fit(
    raw: dict,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    until: int | None = None,
    plugins: Plugins | None = None,
    progress: bool = True,
    stream=None,
) -> RunResult:
    """Train a run described by the raw config dict into the folder ``out``.

    ``resume=True`` continues the run in ``out`` from its last checkpoint (``raw`` is
    then the folder's saved config, in which only the keys that may change on resume
    may differ: :func:`batchkin.config.resume_changes`). ``until`` stops after that
    epoch while the schedule still spans ``epochs``.
    The caller's global RNG state is restored when the run ends.

    A command that fails leaves the folder as it was, and a killed one leaves a run in it:

    * a new run is written straight into an absent or empty folder;
    * a run that replaces a batchkin run (``overwrite``, or a folder whose run never
      wrote ``checkpoints/last.pt``; with ``resume`` such a run starts again from its
      saved config) is built in a hidden sibling folder and swapped in when it writes
      its first ``last.pt`` (:class:`batchkin.rundir.RunDir`);
    * a resumed run changes nothing until its first new epoch, or its final test line,
      is committed: then its config changes are recorded (run.json's ``overrides``,
      then config.toml) and metrics.jsonl is cut back to the checkpoint's epoch.
    """
    from .distributed import DistContext

    dist_ctx = DistContext.from_env()
    folder = _Folder(RunDir(out), writer=dist_ctx.rank == 0)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    deterministic_before = torch.are_deterministic_algorithms_enabled()
    try:
        with torch.random.fork_rng(devices=devices):
            return _fit(raw, folder, resume, overwrite, until, plugins or Plugins(), progress and folder.writer,
                        stream, dist_ctx)
    except BatchkinError as exc:
        if folder.started and folder.writer:
            exc.args = (f"{exc}; {folder.what_is_left()}",)
        raise
    finally:
        torch.use_deterministic_algorithms(deterministic_before)
        if folder.writer:
            folder.run.discard_replacement()
            folder.run.unlock()


class _Folder:
    """The run folder as one ``fit`` changes it (rank 0 alone writes)."""

    def __init__(self, run: RunDir, writer: bool):
        self.run, self.writer = run, writer
        self.mode = ""  # "fresh", "replace" or "resume"
        self.started = False  # the run is under way: an error says what the folder still holds
        self.pending = False  # a resume that has not committed anything yet
        self.done = 0  # epochs of the checkpoint resumed from
        self.changes: list = []  # config changes of the resume
        self.plugin_files: list[dict] = []  # run.json's plugin_files of this command

    def what_is_left(self) -> str:
        run = self.run
        if run.staging is not None:
            return f"{run.final} is unchanged (the new run was discarded)"
        if self.pending:
            return f"{run.final} is unchanged"
        if run.last_epoch:
            return f"checkpoints/last.pt of epoch {run.last_epoch} is intact; --resume {run.final} continues from it"
        return "checkpoints/last.pt was not written yet; the same command starts the run again"

    def history(self, before: list | None, epoch: int, plugin_files_before=None) -> list:
        """run.json's ``overrides``: ``before`` and this command's changes (time, epoch, key, old, new)."""
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        entries = [{"time": now, "epoch": epoch, "key": c.key, "old": c.old, "new": c.new} for c in self.changes]
        if plugin_files_before is not None and plugin_files_before != self.plugin_files:
            entries.append({"time": now, "epoch": epoch, "key": "plugin_files", "old": plugin_files_before,
                            "new": self.plugin_files})
        return list(before or []) + entries

    def commit_resume(self, state: State) -> None:
        """Before the resumed run's first record: record its changes, then cut metrics.jsonl back."""
        if not (self.writer and self.pending):
            return
        run = self.run
        info = run.read_json(MARKER)
        before = info.get("plugin_files") or []
        if self.changes or before != self.plugin_files:
            info["overrides"] = self.history(info.get("overrides"), self.done, before)
            info["plugin_files"] = self.plugin_files
            run.write_json(MARKER, info)
        if self.changes:
            run.write_text("config.toml", dump_toml(resolved_config(state)))
        run.remove_stale_temp_files()
        run.truncate_metrics(self.done)
        self.pending = False


def resume_config(path: str | os.PathLike) -> dict:
    """The saved config.toml of the run folder ``path``, for ``--resume``: continued from its
    checkpoints/last.pt, or started again when a batchkin run has none yet."""
    run = RunDir(path)
    config = run.final / "config.toml"
    if config.is_file() and (run.checkpoint_path().is_file() or run.is_run()):
        return load_raw(config)
    if run.checkpoint_path().is_file():
        raise RunError(f"{run.final} has checkpoints/last.pt but no config.toml to resume it with")
    if run.is_run():
        raise RunError(f"nothing to resume in {run.final}: its run stopped before it wrote config.toml; "
                       "the command that started it starts it again")
    if not config.is_file():
        raise RunError(f"nothing to resume in {run.final}: it is not a batchkin run folder (no config.toml)")
    raise RunError(f"nothing to resume in {run.final}: no checkpoints/last.pt")


def _option_schemas(plugins: Plugins, cfg: Config) -> dict:
    """The options dataclasses of the run's methods, model and dataset (table name -> dataclass)."""
    reg = plugins.registry
    schemas = {name: reg.methods[name].options for name in cfg.methods if name in reg.methods}
    for table, entry in (("model", reg.models.get(cfg.model["name"])), ("data", reg.datasets.get(cfg.data.name))):
        schemas[table] = entry.options if entry is not None else None
    return schemas


def _check_epochs(cfg: Config, until: int | None, done: int, run: RunDir) -> None:
    if cfg.epochs < done:
        raise ConfigError(f"epochs = {cfg.epochs} is below the {done} epochs {run.final} has trained; "
                          "--resume can keep or extend epochs, not undo trained ones")
    if until is not None and until <= done:
        raise ConfigError(f"--until {until}: {run.final} has already trained {done} epochs; "
                          f"give a later epoch, up to epochs = {cfg.epochs}")


def _fit(raw, folder: _Folder, resume, overwrite, until, plugins, show, stream, dist_ctx) -> RunResult:
    run, rank0 = folder.run, folder.writer
    out = Progress(show, 20, stream)
    if until is not None and until < 1:
        raise ConfigError(f"--until must be an epoch >= 1; got {until}")
    if rank0:
        for note in run.recover():
            out.line(f"batchkin: note: {note}")
    saved = resume_config(run.final) if resume else None
    if resume:
        folder.mode = "resume" if run.checkpoint_path().is_file() else "replace"
    else:
        folder.mode = run.check_new(overwrite) if rank0 else "fresh"
    if rank0 and folder.mode != "fresh":
        run.lock()  # refuse a folder another live run is using, before any work
    if resume:
        folder.changes = resume_changes(saved, raw, _option_schemas(plugins, build_config(raw, plugins.registry.methods)))
    folder.plugin_files = plugin_file_records(plugins.origins.values())
    # config, data and model are checked before the folder is created or anything in it changes
    state = prepare(raw, plugins, rank=dist_ctx.rank, world_size=dist_ctx.world_size)
    cfg = state.config
    if until is not None and until > cfg.epochs:
        raise ConfigError(f"--until {until} is beyond epochs = {cfg.epochs} (the schedule spans epochs; "
                          "set epochs to train longer)")
    out.log_every = cfg.train.log_every
    # dropout and other ops without a generator argument draw from the global RNG: it is
    # forked for the run (fit() restores the caller's state), seeded, and saved in checkpoints
    torch.manual_seed(derive_key(cfg.seed, 0x6C6F6F70))
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    best = {"epoch": 0, "top1": -1.0}
    if folder.mode == "resume":
        ckpt = load_checkpoint(run.checkpoint_path(), map_location=state.device)
        _check_epochs(cfg, until, ckpt["epoch"], run)
        best = restore(state, ckpt)
        folder.done = run.last_epoch = state.epoch
        folder.pending = folder.started = True
    elif rank0:
        history = None
        if folder.mode == "fresh":
            run.create()
        else:
            if resume:  # a run without last.pt started again: keep its history of changes
                history = folder.history(run.read_json(MARKER).get("overrides"), 0)
            run.begin_replacement()
            out.line(f"batchkin: note: {_replacing(run, resume, overwrite)}; it stays until the new run writes "
                     "its first checkpoints/last.pt")
        folder.started = True
        run.write_json(MARKER, run_info(state, folder.plugin_files, history))
        run.write_text("config.toml", dump_toml(resolved_config(state)))
    dist_ctx.barrier()
    dist_ctx.wrap(state)
    state.hooks.on_fit_start(state=state)
    out.line(f"batchkin: methods in order: {' -> '.join(state.hooks.names)}; device {state.device}; "
             f"{len(state.train_data)} training images, {state.steps_per_epoch} steps per epoch")
    val_data = DeviceData(state.splits.val, state.splits, state.device) if len(state.splits.val) else None
    last_epoch = cfg.epochs if until is None else until
    while state.epoch < last_epoch:
        state.epoch += 1
        state.epoch_metrics = {}
        state.sampler.set_epoch(state.epoch)
        state.hooks.on_epoch_start(state=state)
        state.model.train()
        out.start_epoch(state.epoch, cfg.epochs, state.steps_per_epoch)
        t0, losses, n_img = time.perf_counter(), [], 0
        for i, indices in enumerate(state.train_data.steps(state), 1):  # the sampler's steps (streamed: loaded ahead)
            try:
                loss = train_step(state, indices)
            except (torch.OutOfMemoryError, MemoryError) as exc:
                raise RunError(_oom_message(state, i, exc)) from None
            except RuntimeError as exc:
                if "can't allocate memory" not in str(exc) and "out of memory" not in str(exc):
                    raise
                raise RunError(_oom_message(state, i, exc)) from None
            losses.append(loss)
            n_img += len(state.batch["y"])
            out.update(i, loss, state.optimizer.param_groups[0]["lr"])
        out.end_epoch()
        state.hooks.on_epoch_end(state=state)
        record = {
            "kind": "epoch", "epoch": state.epoch, "step": state.step,
            "loss": sum(losses) / max(len(losses), 1),
            "lr": state.optimizer.param_groups[0]["lr"],
            "images_per_s": n_img * state.world_size / max(time.perf_counter() - t0, 1e-9),
            **{f"train/{k}": float(v.detach().float()) for k, v in state.loss_terms.items()},
            **state.epoch_metrics,
        }
        improved = False
        if val_data is not None and (state.epoch % cfg.train.eval_every == 0 or state.epoch == cfg.epochs):
            val = evaluate(state, "val", val_data)
            record.update({f"val/{k}": v for k, v in val.items()})
            if val["top1"] > best["top1"]:
                best, improved = {"epoch": state.epoch, "top1": val["top1"]}, True
        if rank0:
            folder.commit_resume(state)
            if improved:
                run.save_checkpoint(checkpoint_dict(state, best), "best.pt")
            run.append_metrics(record)
            if state.epoch % cfg.train.checkpoint_every == 0 or state.epoch == last_epoch:
                run.save_checkpoint(checkpoint_dict(state, best))
                if run.staging is not None:
                    run.commit_replacement()
                run.last_epoch = state.epoch
            out.line(_epoch_line(record))
    state.train_data.close()
    final = {}
    if state.epoch >= cfg.epochs:
        state.hooks.on_fit_end(state=state)
        test_data = DeviceData(state.splits.test, state.splits, state.device)
        test = evaluate(state, "test", test_data)
        final = {"kind": "final", "epoch": state.epoch, "best_val_epoch": best["epoch"],
                 **{f"test/{k}": v for k, v in test.items()}}
        if rank0:
            folder.commit_resume(state)
            run.append_metrics(final)
            out.line(_final_line(final))
            from .report import write_report

            write_report(run.path)
    dist_ctx.barrier()
    return RunResult(str(run.path), final, state)


def _replacing(run: RunDir, resume: bool, overwrite: bool) -> str:
    if resume:
        return f"{run.final} has no checkpoints/last.pt: its run starts again from epoch 1 with its saved config"
    if overwrite:
        return f"replacing the run in {run.final}"
    return f"{run.final} holds a run that never wrote checkpoints/last.pt: replacing it"


def run_info(state: State, plugin_files: list[dict], overrides: list | None = None) -> dict:
    """run.json of a new run: methods, seed, device, where every piece came from, versions."""
    cfg, registry = state.config, state.hooks.registry
    info = {
        "methods": state.hooks.names, "seed": cfg.seed, "device": str(state.device),
        "world_size": state.world_size, "plugins": {n: plugins_origin(state, n) for n in state.hooks.names},
        # where the dataset and the model came from, written as the methods' origins are
        "dataset": {"name": cfg.data.name, "origin": registry.datasets[cfg.data.name].origin},
        "model": {"name": cfg.model["name"], "origin": registry.models[cfg.model["name"]].origin},
        "plugin_files": plugin_files,  # eval and --resume load these again (checked by sha256)
        **system_info(),
    }
    if overrides:
        info["overrides"] = overrides
    return info


def _oom_message(state: State, step: int, exc: BaseException) -> str:
    bs = state.config.data.batch_size
    return (
        f"out of memory at epoch {state.epoch} step {step} with data.batch_size = {bs} on {state.device} "
        f"({type(exc).__name__}); lower the batch size (e.g. --set data.batch_size={max(bs // 2, 1)} in a new run)"
        + (" or enable mixed precision (train.amp)" if state.amp_dtype is None and state.device.type == "cuda" else "")
    )


def _epoch_line(r: dict) -> str:
    parts = [f"epoch {r['epoch']}", f"loss {r['loss']:.4f}"]
    if "val/top1" in r:
        parts.append(f"val top1 {100 * r['val/top1']:.2f}%")
        parts.append(f"balanced {100 * r['val/balanced_acc']:.2f}%")
    parts.append(f"{r['images_per_s']:.0f} img/s")
    return "batchkin: " + ", ".join(parts)


def _final_line(r: dict) -> str:
    def pct(v):
        return "n/a" if v != v else f"{100 * v:.2f}%"

    return (f"batchkin: test top1 {pct(r['test/top1'])}, balanced {pct(r['test/balanced_acc'])}, "
            f"many {pct(r['test/many_acc'])} / medium {pct(r['test/medium_acc'])} / few {pct(r['test/few_acc'])} "
            f"({r['test/shot_split']} split)")


def plugins_origin(state: State, name: str) -> str:
    return state.hooks.origins.get(name, "?")


def system_info() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "batchkin": __version__}
