"""``model.weights = "file.pt"``: initialise a model from a local state-dict file.

Every built-in model has the options ``weights`` and ``weights_prefix``
(:class:`WeightsOptions`); its builder calls :func:`load_weights` after building the
model from the run's seed, before any method wraps it. The rules:

* **Reading.** ``.safetensors`` files are read by a small reader of that format (no
  code runs; the ``safetensors`` package is not needed); any other file with
  ``torch.load(path, map_location="cpu", weights_only=True)``, which refuses a pickle
  that would build anything but tensors and plain containers.
* **Unwrapping.** A table of tensors is the state dict. Otherwise the first of
  ``state_dict``, ``model``, ``model_state_dict``, ``module`` found is taken, repeatedly
  (a timm or MoCo training checkpoint, a batchkin ``checkpoints/last.pt``). A ``module.``
  prefix on every key (DistributedDataParallel) is removed; then, with
  ``weights_prefix = "p."``, only the keys starting with ``p.`` are kept, without it
  (``"encoder."`` for a batchkin MoCo/DINO run, ``"module.base_encoder."`` for MoCo v3).
* **Adapting.** A model may define ``adapt_state_dict(sd) -> sd`` (the ViT resamples a
  file's position embeddings to its own token grid; the Swin model drops the buffers
  older timm files store). A model naming its input convolution's weight in
  ``input_conv`` takes a 3-channel file's weight summed over the input channels when
  it has one input channel (timm's rule for grayscale inputs).
* **The classifier** (the parameters of ``model.classifier``) is kept as initialised when
  the file lacks it or any of its shapes differ (1000 ImageNet classes, K classes here):
  the usual fine-tuning start. Every other parameter and buffer must be in the file
  with its shape (``num_batches_tracked`` may be absent), and the file may hold no key
  the model lacks; otherwise a :class:`~batchkin.errors.ConfigError` of one line names
  the first few missing keys, unexpected keys and shape mismatches, and when no key
  matches, the prefix that would make them match.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError

WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
SHOWN = 3  # keys listed per kind of mismatch

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass
class WeightsOptions:
    """The weight-file options every built-in model has (first in its ``[model]`` table)."""

    weights: str = field(default="", metadata={
        "help": "state-dict file to initialise the model from (.pt/.pth read with torch.load(weights_only=True), "
                "or .safetensors); empty: the seeded random init"})
    weights_prefix: str = field(default="", metadata={
        "help": "load only the file's keys under this prefix, with the prefix removed (e.g. 'encoder.')"})


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file: an 8-byte little-endian header length, a JSON
    header ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes."""
    data = path.read_bytes()
    try:
        n = int.from_bytes(data[:8], "little")
        if len(data) < 8 or 8 + n > len(data):
            raise ValueError("the header is cut short")
        header = json.loads(data[8:8 + n])
        body = memoryview(data)[8 + n:]
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name!r} has the unsupported dtype {info['dtype']}")
            shape, (start, end) = list(info["shape"]), info["data_offsets"]
            size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            if end - start != size or end > len(body) or start < 0:
                raise ValueError(f"tensor {name!r} ({info['dtype']} {shape}) does not fit its data offsets")
            flat = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if size else torch.empty(0, dtype=dtype)
            out[name] = flat.reshape(shape)
        return out
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"model.weights: {path} is not a valid .safetensors file ({exc})") from None


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in the file ``path``, unwrapped as the module docstring says."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.weights: no such file: {path}")
    if path.suffix == ".safetensors":
        obj = read_safetensors(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a refused pickle, a corrupt archive, not a torch file at all
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"model.weights: {path} cannot be read with torch.load(weights_only=True): "
                              f"{first}") from None
    while not _is_state_dict(obj):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if inner is None:
            what = f"a table with the keys {_first(list(obj))}" if isinstance(obj, dict) else type(obj).__name__
            raise ConfigError(f"model.weights: {path} holds no state dict (a table of tensors, or one under "
                              f"{' / '.join(WRAPPER_KEYS)}); it holds {what}")
        obj = inner
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _first(items, n: int = SHOWN) -> str:
    items = list(items)
    return ", ".join(items[:n]) + (", ..." if len(items) > n else "")


def _shape(t) -> str:
    return str(list(t.shape))


def _module_prefix(model: nn.Module, module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return f"{name}." if name else ""
    return None


def _prefix_hint(file_keys: list[str], own_keys) -> str:
    """`` (set model.weights_prefix = 'p.')`` when stripping a prefix ``p.`` of the file's keys
    makes some of them the model's, else an empty string."""
    own = set(own_keys)
    best, best_n = "", 0
    for key in file_keys[:50]:
        parts = key.split(".")
        for i in range(1, len(parts)):
            p = ".".join(parts[:i]) + "."
            n = sum(k.startswith(p) and k[len(p):] in own for k in file_keys)
            if n > best_n:
                best, best_n = p, n
    return f"; set model.weights_prefix = {best!r} ({best_n} keys match without it)" if best else ""


def load_state_dict_into(model: nn.Module, sd: dict[str, torch.Tensor], *, source: str, name: str) -> dict:
    """Load ``sd`` into ``model`` by the rules of the module docstring.

    ``source`` (the file) and ``name`` (the model's registered name) go into the message
    of a mismatch. Returns ``{"loaded": [keys], "reinitialised": [classifier keys kept as
    initialised]}``.
    """
    adapt = getattr(model, "adapt_state_dict", None)
    if callable(adapt):
        sd = adapt(dict(sd))
    own = model.state_dict()
    conv = getattr(model, "input_conv", None)
    if conv in sd and conv in own:
        theirs, mine = sd[conv], own[conv]
        if theirs.dim() == 4 and mine.shape[1] == 1 and theirs.shape[1] > 1 \
                and theirs.shape[:1] + theirs.shape[2:] == mine.shape[:1] + mine.shape[2:]:
            sd[conv] = theirs.sum(1, keepdim=True)
    head = _module_prefix(model, getattr(model, "classifier", None))
    head_keys = {k for k in own if head is not None and k.startswith(head)}
    head_fits = all(k in sd and sd[k].shape == own[k].shape for k in head_keys)
    missing = [k for k in own if k not in sd and k not in head_keys and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and k not in head_keys and sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if mismatched:
            shown = [f"{k}: file {_shape(sd[k])}, model {_shape(own[k])}" for k in mismatched[:SHOWN]]
            parts.append(f"{len(mismatched)} shape mismatches ({', '.join(shown)}{', ...' if len(mismatched) > SHOWN else ''})")
        hint = _prefix_hint(list(sd), own) if not any(k in own for k in sd) else ""
        raise ConfigError(f"model.weights: {source} does not fit model {name!r}: {'; '.join(parts)}{hint}")
    reinit = [] if head_fits else sorted(head_keys)
    merged = dict(own)
    merged.update({k: v for k, v in sd.items() if k not in reinit})
    model.load_state_dict(merged)
    return {"loaded": [k for k in sd if k not in reinit], "reinitialised": reinit}


def load_weights(model: nn.Module, options, name: str) -> nn.Module:
    """Apply ``options.weights`` / ``options.weights_prefix`` (a :class:`WeightsOptions`) to
    ``model``; a no-op when ``weights`` is empty. Returns the model."""
    path = getattr(options, "weights", "")
    if not path:
        return model
    sd = read_weights(path)
    prefix = options.weights_prefix
    if prefix:
        kept = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not kept:
            raise ConfigError(f"model.weights: no key of {path} starts with model.weights_prefix = {prefix!r} "
                              f"(its keys: {_first(sd)})")
        sd = kept
    load_state_dict_into(model, sd, source=str(path), name=name)
    return model
