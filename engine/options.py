"""Every config key a run accepts, listed from the schemas that check them (``batchkin config``).

The listing is built from the same dataclasses that validate a config
(:func:`batchkin.schema.describe`): the engine's own keys (:class:`batchkin.config.Config`
and its tables), then the options of every registered model (``[model]``), dataset
(``[data]``, next to the engine's keys) and method (its own table) — registered plugins
included. Each key has its type, default, bounds, help text and whether ``--resume`` may
change it. :func:`render_text` prints it for a terminal, :func:`render_markdown` writes
docs/config.md (built-in plugins only; a test checks the file is current) and
:func:`listing` gives the JSON of ``batchkin config --json``.
"""

from __future__ import annotations

from .config import Config
from .errors import ConfigError
from .schema import REQUIRED, KeyInfo, _toml_value, describe, suggest

#: The engine's key of the ``[model]`` table (every other key belongs to the chosen model).
MODEL_NAME = KeyInfo("model.name", "str", "resnet8",
                     "registered model: its options are listed under models (`batchkin plugins` lists every model)")

KINDS = ("models", "datasets", "methods")
TABLE = {"models": "model.", "datasets": "data."}  # methods: their own table


def engine_keys() -> list[KeyInfo]:
    """The engine's keys in schema order, ``model.name`` before the ``[optim]`` table."""
    keys = describe(Config)
    at = next((i for i, k in enumerate(keys) if k.key.startswith("optim.")), len(keys))
    return keys[:at] + [MODEL_NAME] + keys[at:]


def _entries(plugins, kind: str) -> dict:
    return getattr(plugins.registry, kind)


def listing(plugins, *, methods=(), models=(), datasets=()) -> dict:
    """``{"engine": [...], "models": {name: {"origin", "keys"}}, "datasets": ..., "methods": ...}``,
    each key a :meth:`KeyInfo.as_dict`. Naming any method, model or dataset lists only those
    (and not the engine's keys); an unregistered name is a ConfigError with a suggestion."""
    chosen = {"methods": list(methods), "models": list(models), "datasets": list(datasets)}
    some = any(chosen.values())
    out: dict = {} if some else {"engine": [k.as_dict() for k in engine_keys()]}
    for kind in KINDS:
        entries = _entries(plugins, kind)
        for name in chosen[kind]:
            if name not in entries:
                raise ConfigError(f"no {kind[:-1]} named {name!r} is registered{suggest(name, entries)}; "
                                  f"registered: {', '.join(sorted(entries))}")
        if some and not chosen[kind]:
            continue
        names = chosen[kind] or list(entries)  # registration order
        out[kind] = {}
        for name in names:
            entry = entries[name]
            prefix = TABLE.get(kind, f"{name}.")
            keys = describe(entry.options, prefix) if entry.options is not None else []
            out[kind][name] = {"origin": entry.origin, "keys": [k.as_dict() for k in keys]}
    return out


def _grouped(table: dict) -> list[tuple[list[str], str, list[dict]]]:
    """Entries with identical keys (the CIFAR ResNets share one options class) as one group:
    ``(names, origin, keys)`` in the order of their first name."""
    groups: list[tuple[list[str], str, list[dict]]] = []
    for name, entry in table.items():
        for names, origin, keys in groups:
            if keys == entry["keys"] and origin == entry["origin"]:
                names.append(name)
                break
        else:
            groups.append(([name], entry["origin"], entry["keys"]))
    return groups


def format_default(value) -> str:
    """A default as TOML writes it; ``unset`` for None (decided at run time)."""
    if value is None:
        return "unset"
    if value == REQUIRED:
        return REQUIRED
    try:
        return _toml_value(value)
    except TypeError:
        return repr(value)


def _kind_title(kind: str) -> str:
    return {"models": "model", "datasets": "dataset", "methods": "method"}[kind]


def render_text(data: dict) -> str:
    """The listing as aligned plain text, one key a line."""
    lines: list[str] = []

    def block(title: str, keys: list[dict]) -> None:
        lines.append(title)
        if not keys:
            lines.append("  (no options of its own)")
            return
        rows = [(k["key"], k["type"] + (f" ({k['bounds']})" if k["bounds"] else ""), format_default(k["default"]),
                 k["help"] + (" [--resume may change it]" if k["resume"] else "")) for k in keys]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])

    if "engine" in data:
        block("engine (every run; [data] also holds the chosen dataset's options)", data["engine"])
    for kind in KINDS:
        for names, origin, keys in _grouped(data.get(kind, {})):
            where = "" if origin == "builtin" else f"  ({origin})"
            table = {"models": "[model]", "datasets": "[data]"}.get(kind, f"[{names[0]}]")
            if lines:
                lines.append("")
            block(f"{_kind_title(kind)} {', '.join(names)}: {table}{where}", keys)
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(keys: list[dict]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for k in keys:
        kind = f"`{_cell(k['type'])}`" + (f", {k['bounds']}" if k["bounds"] else "")
        meaning = _cell(k["help"]) + (" (`--resume` may change it)" if k["resume"] else "")
        lines.append(f"| `{k['key']}` | {kind} | `{_cell(format_default(k['default']))}` | {meaning} |")
    return lines


MARKDOWN_INTRO = """\
# Config reference

<!-- generated by `BATCHKIN_DISABLE_PLUGIN_AUTOLOAD=1 batchkin config --markdown > docs/config.md`; do not edit:
     tests/test_docs.py checks that it is current -->

A config is one TOML file; `--set key.sub=value` overrides any key (values in TOML syntax; a
bare word is a string), and an unknown key is refused with the closest known key (`--set lr=0.1`
suggests `optim.lr`). Top-level keys are the run's own; tables configure the engine (`[data]`,
`[model]`, `[optim]`, ...); `[model]` holds `name` plus the chosen model's options, `[data]`
the engine's keys plus the chosen dataset's options, and each enabled method reads its own
table named after it (`[bbn]`, `[drloc]`, ...). Ready configs live in `configs/`.

`batchkin config` prints this listing for the plugins installed where it runs (theirs
included); `batchkin config --method NAME` (or `--model NAME`, `--dataset NAME`) one entry,
`--json` the same as JSON. A type `'a' | 'b'` takes one of the values shown; `unset` means the
engine decides at run time (the text says how).
"""


#: The environment variables a user may set (the test harness's own are not listed).
ENVIRONMENT = (
    ("BATCHKIN_KERNELS", "auto", "`ref`, `cpp` or `triton`: force one kernel path for every op (`batchkin doctor` "
     "shows which path each op takes and why)"),
    ("BATCHKIN_CACHE", "~/.cache/batchkin", "folder of the compiled C++ ops (one subfolder per build key: sources, "
     "torch, Python, compiler and flags)"),
    ("BATCHKIN_PLUGINS", "", "plugin `.py` files to load, separated by `:` (as `--plugin FILE`)"),
    ("BATCHKIN_DISABLE_PLUGIN_AUTOLOAD", "", "`1`: load no installed plugin package, only batchkin's built-ins"),
    ("BATCHKIN_DIST_TIMEOUT", "300", "seconds a rank waits at a collective for a rank that died"),
    ("TRITON_INTERPRET", "0", "`1` before triton is imported: Triton kernels run on CPU tensors in the "
     "interpreter (tests only; slow)"),
)


def render_markdown(data: dict) -> str:
    """The listing as docs/config.md, then the environment variables."""
    lines = [MARKDOWN_INTRO, "## Engine", ""] + _table(data.get("engine", [])) + [""]
    headings = {"models": "## Models (`[model]`)", "datasets": "## Datasets (`[data]`)", "methods": "## Methods"}
    for kind in KINDS:
        groups = _grouped(data.get(kind, {}))
        if not groups:
            continue
        lines += [headings[kind], ""]
        bare = [names for names, _, keys in groups if not keys]
        for names, origin, keys in groups:
            if not keys:
                continue
            where = "" if origin == "builtin" else f" ({origin})"
            lines += [f"### {', '.join(f'`{n}`' for n in names)}{where}", ""] + _table(keys) + [""]
        if bare:
            every = ", ".join(f"`{n}`" for names in bare for n in names)
            lines += [f"No options of their own: {every}.", ""]
    lines += ["## Environment variables", "", "| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{name}` | {f'`{default}`' if default else 'unset'} | {meaning} |" for name, default,
              meaning in ENVIRONMENT]
    return "\n".join(lines) + "\n"
