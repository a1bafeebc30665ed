"""`batchkin config`: every key from the schemas that check configs, docs/config.md current, suggestions."""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from batchkin import config as C
from batchkin.cli import main
from batchkin.options import engine_keys, listing, render_markdown
from batchkin.plugin import Plugins

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "config.md"


@pytest.fixture(scope="module")
def builtin():
    return Plugins(autoload=False)


def _run(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def _all_keys(data: dict) -> dict[str, dict]:
    keys = {k["key"]: k for k in data.get("engine", [])}
    for kind in ("models", "datasets", "methods"):
        for name, entry in data.get(kind, {}).items():
            keys.update({f"{name}:{k['key']}": k for k in entry["keys"]})
    return keys


def test_docs_config_md_is_the_listing_of_the_builtin_plugins(builtin, monkeypatch):
    monkeypatch.delenv("BATCHKIN_PLUGINS", raising=False)
    expected = render_markdown(listing(builtin))
    assert DOC.read_text() == expected, (
        "docs/config.md is out of date: BATCHKIN_DISABLE_PLUGIN_AUTOLOAD=1 batchkin config --markdown > docs/config.md")


def test_every_engine_field_is_listed_with_its_schema_default_and_help():
    listed = {k.key: k for k in engine_keys()}
    sections = {"": C.Config, "data.": C.DataConfig, "optim.": C.OptimConfig, "schedule.": C.ScheduleConfig,
                "train.": C.TrainConfig, "metrics.": C.MetricsConfig, "log.": C.LogConfig}
    defaults = {"": C.Config(), "data.": C.DataConfig(), "optim.": C.OptimConfig(),
                "schedule.": C.ScheduleConfig(), "train.": C.TrainConfig(), "metrics.": C.MetricsConfig(),
                "log.": C.LogConfig()}
    count = 0
    while sections:
        prefix, cls = sections.popitem()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in C.ENGINE_TABLES:
                continue
            if dataclasses.is_dataclass(hints[f.name]):  # a nested table such as train.ema: its keys are listed
                sections[f"{prefix}{f.name}."] = hints[f.name]
                defaults[f"{prefix}{f.name}."] = getattr(defaults[prefix], f.name)
                continue
            key = listed[prefix + f.name]
            assert key.default == getattr(defaults[prefix], f.name), key
            assert key.help == f.metadata["help"] and key.help.strip()
            count += 1
    assert len(listed) == count + 1 and listed["model.name"].default == "resnet8"
    assert listed["optim.lr"].type == "float" and listed["optim.lr"].bounds == "> 0.0"
    assert listed["schedule.name"].type == "'cosine' | 'step' | 'constant'"
    assert listed["data.hflip"].type == "bool | unset" and listed["data.hflip"].default is None
    # the keys --resume may change are the ones the resume check allows
    assert sorted(k for k, v in listed.items() if v.resume) == sorted(C.resume_keys())


def test_every_option_of_every_plugin_is_listed_with_help(builtin):
    data = listing(builtin)
    keys = _all_keys(data)
    assert all(k["help"].strip() for k in keys.values()), [n for n, k in keys.items() if not k["help"].strip()]
    reg = builtin.registry
    for kind, table in (("models", reg.models), ("datasets", reg.datasets), ("methods", reg.methods)):
        assert list(data[kind]) == list(table)
        for name, entry in table.items():
            own = [f.name for f in dataclasses.fields(entry.options)] if entry.options else []
            fields = list(dict.fromkeys(k["key"].split(".")[1] for k in data[kind][name]["keys"]))
            assert fields == own, name  # every field, in schema order (a nested table's keys under its name)
    smoothing = keys["ce:ce.label_smoothing"]
    assert (smoothing["type"], smoothing["default"], smoothing["bounds"]) == ("float", 0.0, ">= 0.0, < 1.0")
    assert "label smoothing" in smoothing["help"]
    # a nested table's keys are flattened, with the defaults of the table the method gives
    assert keys["moco:moco.views.crop_scale"]["default"] == [0.2, 1.0]
    assert keys["resnet18:model.layers"]["default"] == [2, 2, 2, 2]
    assert keys["resnet50:model.block"]["default"] == "bottleneck"


def test_cli_lists_one_method_as_text(capsys):
    out = _run(capsys, ["config", "--method", "ce"])
    lines = out.splitlines()
    assert lines[0] == "method ce: [ce]"
    assert re.fullmatch(r"  ce\.label_smoothing +float \(>= 0\.0, < 1\.0\) +0\.0 +label smoothing.*", lines[1])
    assert re.fullmatch(r"  ce\.weight +float \(>= 0\.0\) +1\.0 +weight of the term", lines[2])
    assert len(lines) == 3  # only the method: no engine keys, no other plugin


def test_cli_lists_everything_as_json_and_markdown(capsys, builtin):
    data = json.loads(_run(capsys, ["config", "--json"]))
    assert set(data) == {"engine", "models", "datasets", "methods"}
    assert data["engine"][0] == {"key": "seed", "type": "int", "default": 0,
                                 "help": "seed of every random stream of the run", "bounds": "", "resume": False}
    assert data["methods"]["bbn"]["origin"] == "builtin"
    assert _all_keys(data).keys() >= _all_keys(listing(builtin)).keys()
    md = _run(capsys, ["config", "--markdown", "--model", "tiny", "--dataset", "imagelist"])
    assert "### `tiny`\n\n| key | type | default | meaning |" in md
    assert "| `model.width` | `int`, >= 1 | `8` | channels of the single convolution |" in md
    assert "| `data.train_list` | `str` | `\"\"` |" in md
    assert "## Methods" not in md and "seed" not in md.split("## Engine", 1)[1].split("##", 1)[0]
    text = _run(capsys, ["config"])
    assert "model resnet8, resnet14, resnet20, resnet32: [model]" in text  # one options class, one block
    assert "dataset digits, fashion_mnist, idx, cifar10, cifar100, imagefolder, synthetic: [data]" in text


def test_cli_lists_a_plugin_files_method_and_dataset(capsys, plugin_file):
    path = plugin_file("mine", """
        from dataclasses import dataclass, field
        import batchkin
        from batchkin.hookspecs import hookimpl

        class Mine(batchkin.Method):
            @dataclass
            class Options:
                strength: float = field(default=0.5, metadata={"gt": 0.0, "help": "how strong"})

        @dataclass
        class NpzOptions:
            path: str = field(default="x.npz", metadata={"help": "the file"})

        @hookimpl
        def register_methods(register):
            register("mine", Mine)

        @hookimpl
        def register_datasets(register):
            register("npzmine", lambda options, data: None, options=NpzOptions)
    """)
    data = json.loads(_run(capsys, ["config", "--json", "--plugin", str(path), "--method", "mine",
                                    "--dataset", "npzmine"]))
    assert data["methods"]["mine"] == {"origin": f"file {path}", "keys": [
        {"key": "mine.strength", "type": "float", "default": 0.5, "help": "how strong", "bounds": "> 0.0",
         "resume": False}]}
    assert data["datasets"]["npzmine"]["keys"][0]["key"] == "data.path"
    text = _run(capsys, ["config", "--plugin", str(path), "--method", "mine"])
    assert text.splitlines()[0] == f"method mine: [mine]  (file {path})"


@pytest.mark.parametrize("argv,fragment", [
    (["config", "--method", "bbm"], "no method named 'bbm' is registered (did you mean 'bbn'?); registered: "),
    (["config", "--model", "resnet9"], "no model named 'resnet9' is registered (did you mean 'resnet8'?)"),
    (["config", "--dataset", "nope"], "no dataset named 'nope' is registered; registered: cifar10, cifar100"),
])
def test_cli_refuses_an_unknown_name_in_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("batchkin: error: ") and fragment in err, err


@pytest.mark.parametrize("setting,suggestion", [
    ("lr=0.1", "unknown config key lr (did you mean 'optim.lr'?)"),
    ("label_smoothing=0.1", "unknown config key label_smoothing (did you mean 'ce.label_smoothing'?)"),
    ("optim.label_smoothing=0.1", "unknown config key optim.label_smoothing (did you mean 'ce.label_smoothing'?)"),
    ("ce.lr=0.1", "unknown config key ce.lr (did you mean 'optim.lr'?)"),
    ("batch_size=8", "unknown config key batch_size (did you mean 'data.batch_size'?)"),
    # the engine's tables first, then the methods' by name (the order of the built-in plugins)
    ("momentum=0.9", "unknown config key momentum (did you mean 'optim.momentum' or 'dino.momentum' or "
                     "'moco.momentum'?)"),
    ("epoch=3", "unknown config key epoch (did you mean 'epochs'?)"),  # a close key of the table itself
    ("optim.lrr=1", "unknown config key optim.lrr (did you mean 'lr'?)"),
    ("zzz=1", "unknown config key zzz"),
    ("ce.weigth=1", "unknown config key ce.weigth (did you mean 'weight'?)"),  # a typo in the table comes first
])
def test_set_of_a_key_in_another_table_suggests_its_full_name(capsys, tmp_path, setting, suggestion):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--out", str(out), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err == f"batchkin: error: {suggestion}\n"
    assert not out.exists()
