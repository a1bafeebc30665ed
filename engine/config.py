"""The run configuration: TOML files, ``--set key=value`` overrides and the engine's schema.

A config is one TOML document. Top-level keys are the run's own (``seed``,
``epochs``, ``methods``, ``device``); tables configure the engine (``[data]``,
``[model]``, ``[optim]``, ``[schedule]``, ``[train]``, ``[metrics]``) and each
method has its own table named after it (``[bbn]``, ``[drloc]``, ...), checked
by that method's own schema. ``[model]`` holds ``name`` plus the options of the
chosen model, checked by the model's schema. Likewise ``[data]`` holds the
engine's data keys (:class:`DataConfig`) plus the options of the chosen dataset,
if it registered any: those are kept in ``DataConfig.options`` and checked by the
dataset's schema (:func:`dataset_options`) when the dataset is loaded.

Decisions written down here:

* A table for a method that is registered but not enabled in ``methods`` is kept
  and ignored (so ``--set methods=[...]`` can toggle methods without editing the
  file); a table whose name is neither an engine table nor a registered method is
  an error, with a close-match suggestion.
* A ``[data]`` key that is neither an engine key nor an option of the selected
  dataset is an error, listing the valid keys; an option of another registered
  dataset is refused too (it would be ignored silently otherwise). A dataset's
  options may not reuse an engine key's name (refused when the plugin loads).
* Evaluation during training uses a validation split held out of the training
  data; the test split is only evaluated once, at the end, and never selects
  a checkpoint.
"""

from __future__ import annotations

import copy
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from .errors import ConfigError
from .schema import check_depth, parse, shown, suggest


@dataclass
class DataConfig:
    name: str = field(default="digits", metadata={"help": "registered dataset name (`batchkin plugins` lists them)"})
    root: str = field(default="", metadata={"help": "folder of a file-based dataset (idx, cifar10, cifar100, imagefolder, imagelist, inaturalist)"})
    val_fraction: float = field(
        default=0.1, metadata={"ge": 0.0, "lt": 1.0, "help": "fraction of the training split held out for evaluation during training (stratified)"}
    )
    test_fraction: float = field(
        default=0.2, metadata={"gt": 0.0, "lt": 1.0, "help": "test fraction for datasets without an official test split"}
    )
    split_seed: int = field(default=0, metadata={"help": "seed of the fixed train/val/test split and of the subsets"})
    imbalance_factor: float = field(
        default=1.0, metadata={"ge": 1.0, "help": "n_max / n_min of a long-tailed training subset (1 = keep all)"}
    )
    few_shot: int = field(default=0, metadata={"ge": 0, "help": "keep this many training images per class (0 = all)"})
    train_size: int = field(default=0, metadata={"ge": 0, "help": "keep this many training images, stratified (0 = all)"})
    batch_size: int = field(default=64, metadata={"ge": 1, "help": "training batch size (per process)"})
    eval_batch_size: int = field(default=256, metadata={"ge": 1, "resume": True, "help": "evaluation batch size"})
    drop_last: bool = field(default=True, metadata={"help": "drop the last incomplete training batch of an epoch"})
    augment: bool = field(default=True, metadata={"help": "random crop with padding (+ flip) during training"})
    crop_padding: int = field(default=2, metadata={"ge": 0, "help": "zero padding of the random crop, in pixels"})
    hflip: bool | None = field(default=None, metadata={"help": "random horizontal flip (default: the dataset's own choice)"})
    image_size: list[int] = field(default_factory=list, metadata={
        "help": "[H, W]: image folders in memory are resized to it, streamed images cropped to it (empty: the images' own size)"})
    # streamed datasets (engine/stream.py): images stay on disk, DataLoader workers decode them
    storage: Literal["auto", "memory", "stream"] = field(default="auto", metadata={
        "help": "memory: decode the whole set onto the device; stream: decode batches from disk in worker processes; "
                "auto: memory when the decoded set fits data.memory_budget_mb (list-file datasets always stream)"})
    memory_budget_mb: int = field(default=2048, metadata={"ge": 0, "help": "storage = auto: the largest decoded set kept in memory, in MiB"})
    num_workers: int = field(default=4, metadata={"ge": 0, "help": "streamed: DataLoader worker processes (0 = decode in the training process)"})
    prefetch_factor: int = field(default=2, metadata={"ge": 1, "help": "streamed: batches each worker prepares ahead"})
    persistent_workers: bool = field(default=True, metadata={"help": "streamed: keep the training workers alive between epochs"})
    pin_memory: bool = field(default=True, metadata={"help": "streamed: page-locked batches for asynchronous copies (CUDA only)"})
    skip_bad: bool = field(default=False, metadata={
        "help": "streamed: replace an unreadable image by the next readable one of its class and count it, instead of stopping"})
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0], metadata={
        "gt": 0.0, "le": 1.0, "help": "streamed training: random-resized crop area range"})
    crop_ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3], metadata={
        "gt": 0.0, "help": "streamed training: random-resized crop aspect-ratio range"})
    resize_size: int = field(default=0, metadata={
        "ge": 0, "help": "streamed evaluation: shorter side before the centre crop (0 = max(image_size) / crop_fraction)"})
    crop_fraction: float = field(default=0.875, metadata={"gt": 0.0, "le": 1.0, "help": "streamed evaluation: centre-crop fraction"})
    synthetic_classes: int = field(default=4, metadata={"ge": 1, "help": "synthetic set: number of classes"})
    synthetic_per_class: int = field(default=48, metadata={"ge": 1, "help": "synthetic set: images per class"})
    synthetic_shape: list[int] = field(default_factory=lambda: [1, 8, 8], metadata={"help": "synthetic set: [C, H, W]"})
    # The selected dataset's own keys, written in [data] next to the engine's (inline:
    # config.toml writes them there too). Filled by build_config with every [data] key
    # that is not an engine key; checked against the dataset's Options when it is loaded.
    options: dict = field(default_factory=dict, init=False, metadata={"inline": True})

    def validate(self):
        if self.image_size and (len(self.image_size) != 2 or min(self.image_size) < 1):
            raise ConfigError(f"data.image_size must be [H, W] with positive sizes; got {self.image_size}")
        if len(self.synthetic_shape) != 3 or min(self.synthetic_shape) < 1:
            raise ConfigError(f"data.synthetic_shape must be [C, H, W] with positive sizes; got {self.synthetic_shape}")
        for key in ("crop_scale", "crop_ratio"):
            pair = getattr(self, key)
            if len(pair) != 2 or pair[0] > pair[1]:
                raise ConfigError(f"data.{key} must be [low, high] with low <= high; got {pair}")
        if self.few_shot and self.imbalance_factor > 1:
            raise ConfigError("data.few_shot and data.imbalance_factor cannot both be set: choose one subset")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = field(default="sgd", metadata={"help": "optimizer"})
    lr: float = field(default=0.1, metadata={"gt": 0.0, "help": "base learning rate"})
    momentum: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0, "help": "SGD momentum"})
    nesterov: bool = field(default=False, metadata={"help": "SGD Nesterov momentum"})
    weight_decay: float = field(default=5e-4, metadata={"ge": 0.0, "help": "weight decay"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"ge": 0.0, "lt": 1.0, "help": "AdamW betas"})
    eps: float = field(default=1e-8, metadata={"gt": 0.0, "help": "AdamW epsilon"})
    no_decay_norm_bias: bool = field(default=False, metadata={"help": "no weight decay on norm weights and biases"})

    def validate(self):
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must have two values; got {self.betas}")


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "step", "constant"] = field(default="cosine", metadata={"help": "learning-rate schedule after warm-up"})
    warmup_epochs: float = field(default=0.0, metadata={"ge": 0.0, "help": "linear warm-up length in epochs"})
    warmup_start: float = field(default=0.1, metadata={"ge": 0.0, "le": 1.0, "help": "warm-up starts at this fraction of lr"})
    milestones: list[int] = field(default_factory=list, metadata={"ge": 1, "help": "step schedule: epochs at which lr is multiplied by gamma"})
    gamma: float = field(default=0.1, metadata={"gt": 0.0, "help": "step schedule factor"})
    min_lr: float = field(default=0.0, metadata={"ge": 0.0, "help": "cosine schedule floor, as a fraction of lr"})


@dataclass
class TrainConfig:
    amp: Literal["auto", "off", "bf16", "fp16"] = field(
        default="auto", metadata={"help": "mixed precision: auto = bf16 on GPUs that support it, else fp16 on CUDA, off on CPU"}
    )
    grad_clip: float = field(default=0.0, metadata={"ge": 0.0, "help": "clip the global gradient norm (0 = off)"})
    eval_every: int = field(default=1, metadata={"ge": 1, "resume": True, "help": "evaluate on the validation split every N epochs"})
    checkpoint_every: int = field(default=1, metadata={"ge": 1, "resume": True, "help": "write a checkpoint every N epochs (and at the end)"})
    log_every: int = field(default=20, metadata={"ge": 1, "resume": True, "help": "steps between plain progress lines when not on a terminal"})
    on_nonfinite: Literal["stop", "skip"] = field(
        default="stop", metadata={"resume": True, "help": "a non-finite loss or gradient: stop the run, or skip the step"}
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    sync_bn: Literal["auto", "on", "off"] = field(
        default="auto", metadata={"help": "SyncBatchNorm under DDP on CUDA: auto = for methods that need it (moco, dino)"}
    )
    deterministic: bool = field(default=True, metadata={"help": "torch.use_deterministic_algorithms(warn_only) during the run"})


@dataclass
class MetricsConfig:
    many_threshold: int = field(default=100, metadata={"ge": 1, "help": "classes with more training images than this are 'many'"})
    few_threshold: int = field(default=20, metadata={"ge": 0, "help": "classes with fewer training images than this are 'few'"})
    shot_split: Literal["auto", "absolute", "relative"] = field(
        default="auto",
        metadata={"help": "many/medium/few groups: absolute thresholds, relative terciles of the class sizes, or auto"},
    )

    def validate(self):
        if self.few_threshold > self.many_threshold:
            raise ConfigError("metrics.few_threshold must not exceed metrics.many_threshold")


ENGINE_TABLES = ("data", "model", "optim", "schedule", "train", "metrics")

# the engine's own [data] keys; every other key of [data] belongs to the selected dataset
DATA_KEYS = tuple(f.name for f in fields(DataConfig) if f.init)


@dataclass
class Config:
    seed: int = field(default=0, metadata={"help": "seed of every random stream of the run"})
    epochs: int = field(default=10, metadata={"ge": 1, "resume": True, "help": "number of training epochs"})
    methods: list[str] = field(default_factory=lambda: ["ce"], metadata={"help": "enabled methods, in hook-call order"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # validated against the model's / each method's own schema by the plugin manager
    model: dict = field(default_factory=lambda: {"name": "resnet8"})
    method_options: dict = field(default_factory=dict, init=False)

    def validate(self):
        if not self.methods:
            raise ConfigError("methods must name at least one method")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods lists a method twice: {self.methods}")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]{1,4})?", self.device):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {shown(self.device)}")
        for m in self.schedule.milestones:
            if m > self.epochs:
                raise ConfigError(f"schedule.milestones has epoch {m} beyond epochs = {self.epochs}")
        if self.schedule.warmup_epochs > self.epochs:
            raise ConfigError(f"schedule.warmup_epochs ({self.schedule.warmup_epochs}) exceeds epochs ({self.epochs})")


def parse_value(text: str):
    """A ``--set`` value: TOML syntax (numbers, booleans, lists, quoted strings), else a bare string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    except (RecursionError, ValueError) as exc:  # nesting deeper than the parser's stack, a 5000-digit int
        raise ConfigError(f"--set value {shown(text)} cannot be read: {_toml_limit(exc)}") from None
    check_depth(value, f"--set value {shown(text)}")
    return value


def _toml_limit(exc: Exception) -> str:
    return "arrays or tables nested too deeply" if isinstance(exc, RecursionError) else str(exc)


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides to a raw config dict (a copy is returned)."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {shown(item)}")
        parts = key.split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[: i + 1])} is not a table")
            node = child
        node[parts[-1]] = parse_value(text.strip())
    return raw


def load_raw(path: str | Path | None) -> dict:
    """Read a TOML config file (an empty config when ``path`` is None)."""
    if path is None:
        return {}
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder; give the TOML file itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {_toml_limit(exc)}") from None
    check_depth(raw, f"config file {path}")
    return raw


def build_config(raw: dict, known_methods) -> Config:
    """Check a raw config against the engine schema; method tables go to ``method_options``.

    ``known_methods`` are the registered method names (their tables are checked later
    by each method's schema).
    """
    raw = dict(raw)
    method_options = {}
    for key in list(raw):
        if isinstance(raw[key], dict) and key not in ENGINE_TABLES:
            if key in known_methods:
                method_options[key] = raw.pop(key)
            else:
                names = list(ENGINE_TABLES) + list(known_methods)
                raise ConfigError(f"unknown config table [{key}]{suggest(key, names)}")
    model = raw.pop("model", {"name": "resnet8"})
    if not isinstance(model, dict):
        raise ConfigError(f"model must be a table, got {type(model).__name__}")
    dataset_keys = {}
    if isinstance(raw.get("data"), dict):
        dataset_keys = {k: v for k, v in raw["data"].items() if k not in DATA_KEYS}
        raw["data"] = {k: v for k, v in raw["data"].items() if k in DATA_KEYS}
    cfg = parse(Config, raw)
    cfg.data.options = dataset_keys
    cfg.model = {"name": "resnet8", **model}
    if not isinstance(cfg.model["name"], str):
        raise ConfigError(f"model.name must be a string, got {cfg.model['name']!r}")
    for name in cfg.methods:
        if name not in known_methods:
            raise ConfigError(f"unknown method {name!r} in methods{suggest(name, known_methods)}; "
                              f"registered: {', '.join(sorted(known_methods))}")
    cfg.method_options = method_options
    return cfg


def _option_names(options) -> list[str]:
    return [f.name for f in fields(options) if f.init] if options is not None else []


def dataset_options(name: str, options, given: dict, registered: Mapping[str, type | None]):
    """Check the dataset keys of ``[data]`` against dataset ``name``'s schema.

    ``options`` is the dataset's Options dataclass (None when it registered none),
    ``given`` the ``[data]`` keys that are not engine keys (``DataConfig.options``)
    and ``registered`` every registered dataset's Options (to name the dataset a
    stray key belongs to). Returns the parsed Options instance, or None for a
    dataset without options (which then accepts no key of its own).
    """
    own = _option_names(options)
    engine = f"the engine's {', '.join(DATA_KEYS)}"
    for key in given:
        if key in own:
            continue
        owners = sorted(n for n, o in registered.items() if n != name and key in _option_names(o))
        if owners:
            mine = f"whose own options are {', '.join(own)}" if own else "which has no options of its own"
            raise ConfigError(
                f"data.{key} is an option of dataset {', '.join(map(repr, owners))}, not of the selected "
                f"data.name = {name!r} ({mine})"
            )
        valid = f"{', '.join(own)} (the dataset's own) and {engine}" if own else \
            f"{engine} (the dataset has no options of its own)"
        raise ConfigError(
            f"unknown config key data.{key}{suggest(key, own + list(DATA_KEYS))}; "
            f"valid [data] keys for data.name = {name!r}: {valid}"
        )
    if options is None:
        return None
    return parse(options, given, "data")


# ------------------------------------------------------------------------------ what --resume may change


def _same(a, b) -> bool:
    """Equal config values: numbers by value (1 == 1.0), booleans and strings by type and value."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or (a != a and b != b)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


_UNSET = object()


def _diff(old: dict, new: dict, prefix: str = ""):
    """``(key, old, new)`` for every leaf that differs (``_UNSET`` where a side lacks it)."""
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            yield from _diff(a, b, f"{prefix}{key}.")
        elif a is _UNSET or b is _UNSET or not _same(a, b):
            yield f"{prefix}{key}", a, b


_SECTIONS = {"data": DataConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "train": TrainConfig,
             "metrics": MetricsConfig}


def _init_fields(cls) -> dict:
    return {f.name: f for f in fields(cls) if f.init} if cls is not None else {}


def _field_metadata(key: str, option_schemas: Mapping[str, type | None]) -> Mapping | None:
    """The schema metadata of a config key, or None when no schema knows the key."""
    *tables, name = key.split(".")
    if len(tables) > 1:
        return None
    if not tables:
        cls = Config if name not in ENGINE_TABLES else None
    else:
        own = _init_fields(_SECTIONS.get(tables[0]))
        if name in own:
            return own[name].metadata
        cls = option_schemas.get(tables[0])  # a model's, a dataset's or a method's options
    f = _init_fields(cls).get(name)
    return None if f is None else f.metadata


def resume_keys(option_schemas: Mapping[str, type | None] = {}) -> list[str]:
    """The keys ``--resume`` may change: fields whose metadata says ``"resume": True``, of
    the engine's schema and of the options in ``option_schemas`` (table name -> dataclass:
    the run's model, dataset and methods)."""
    tables = [("", Config), *((f"{t}.", c) for t, c in _SECTIONS.items()),
              *((f"{t}.", c) for t, c in option_schemas.items())]
    return [f"{prefix}{name}" for prefix, cls in tables for name, f in _init_fields(cls).items()
            if f.metadata.get("resume")]


@dataclass(frozen=True)
class Change:
    """One config value changed on ``--resume`` (``old``/``new`` are None where unset)."""

    key: str
    old: object
    new: object


def _show(value) -> str:
    text = "unset" if value is _UNSET else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def resume_changes(saved: dict, given: dict, option_schemas: Mapping[str, type | None] = {}) -> list[Change]:
    """The changes from a run's saved config (its config.toml) to the config of ``--resume``.

    Only keys marked ``"resume": True`` in their schema may change: what a run does
    next, not what it computed (``epochs``, evaluation, logging and checkpoint cadence,
    ``train.on_nonfinite``, ``data.eval_batch_size``, and the options a plugin marks).
    Any other change would make the continued run a different run than the one the
    checkpoint belongs to and is refused with a line naming the key.
    """
    changes = []
    for key, old, new in _diff(saved, given):
        meta = _field_metadata(key, option_schemas)
        if meta is None or not meta.get("resume"):
            allowed = ", ".join(resume_keys(option_schemas))
            raise ConfigError(
                f"--resume cannot change {key} ({_show(old)} -> {_show(new)}): the checkpoint belongs to the run "
                f"as configured; --resume may change only {allowed} (start a new run with another --out instead)"
            )
        changes.append(Change(key, None if old is _UNSET else old, None if new is _UNSET else new))
    return changes
