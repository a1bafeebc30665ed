"""The config: schema checks with messages naming the key, --set overrides, the resolved config."""

from __future__ import annotations

import sys
import tomllib

import pytest

from batchkin.config import Config, apply_overrides, build_config, parse_value
from batchkin.errors import ConfigError
from batchkin.plugin import Plugins
from batchkin.schema import dump_toml


@pytest.fixture(scope="module")
def methods():
    return Plugins().registry.methods


def error_of(raw: dict, methods) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw, methods)
    return str(info.value)


def test_defaults(methods):
    cfg = build_config({}, methods)
    assert isinstance(cfg, Config)
    assert cfg.methods == ["ce"] and cfg.epochs == 10 and cfg.seed == 0
    assert cfg.data.name == "digits" and cfg.data.batch_size == 64
    assert cfg.model == {"name": "resnet8"}
    assert cfg.method_options == {}


def test_values_reach_the_config(methods):
    cfg = build_config(
        {"epochs": 3, "data": {"batch_size": 5, "imbalance_factor": 10}, "optim": {"name": "adamw", "lr": 1},
         "model": {"name": "vit", "dim": 16}, "ce": {"label_smoothing": 0.1}},
        methods,
    )
    assert cfg.epochs == 3 and cfg.data.batch_size == 5
    assert cfg.data.imbalance_factor == 10.0 and isinstance(cfg.data.imbalance_factor, float)
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.name == "adamw"
    assert cfg.model == {"name": "vit", "dim": 16}
    assert cfg.method_options == {"ce": {"label_smoothing": 0.1}}


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"epoch": 3}, "unknown config key epoch (did you mean 'epochs'?)"),
        ({"optim": {
            "lr": 0.1, "wieght_decay": 0}}, "unknown config key optim.wieght_decay (did you mean 'weight_decay'?)"),
    ],
)
def test_unknown_keys_are_named_with_a_suggestion(methods, raw, message):
    msg = error_of(raw, methods)
    assert msg == message or msg.startswith(message)
    if "did you mean" not in message:
        assert "did you mean" not in msg


@pytest.mark.parametrize(
    "data, message",
    [
        ({"batchsize": 3}, "unknown config key data.batchsize (did you mean 'batch_size'?)"),
        ({"zzz": 3}, "unknown config key data.zzz"),
    ],
)
def test_unknown_data_keys_are_named_with_the_valid_ones(methods, tiny, data, message):
    """[data] also holds the selected dataset's own options, so a key that is not the
    engine's is kept by build_config and refused when the dataset is picked."""
    from batchkin.trainer import prepare

    cfg = build_config({"data": data}, methods)
    assert cfg.data.options == data
    with pytest.raises(ConfigError) as info:
        prepare(tiny(data=data))
    msg = str(info.value)
    assert msg.startswith(message)
    if "did you mean" not in message:
        assert "did you mean" not in msg
    assert ("; valid [data] keys for data.name = 'synthetic': the engine's name, root, val_fraction, "
            in msg) and msg.endswith("synthetic_shape (the dataset has no options of its own)")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"epochs": "x"}, "epochs must be an integer, got str 'x'"),
        ({"data": {"batch_size": 1.5}}, "data.batch_size must be an integer, got float 1.5"),
        ({"epochs": True}, "epochs must be an integer, got bool True"),
        ({"data": {"augment": 1}}, "data.augment must be true or false, got int 1"),
        ({"optim": {"lr": "fast"}}, "optim.lr must be a number, got str 'fast'"),
        ({"optim": {"lr": float("nan")}}, "optim.lr must be finite"),
        ({"methods": "ce"}, "methods must be a list of str"),
        ({"data": {"image_size": [8, "8"]}}, "data.image_size[1] must be an integer"),
        ({"data": 3}, "data must be a table"),
        ({"optim": {"name": "adam"}}, "optim.name must be one of 'sgd', 'adamw'; got 'adam'"),
        ({"schedule": {"name": "cosin"}}, "(did you mean 'cosine'?)"),
    ],
)
def test_wrong_types_are_named(methods, raw, message):
    assert message in error_of(raw, methods)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"data": {"batch_size": 0}}, "data.batch_size must be >= 1; got 0"),
        ({"data": {"imbalance_factor": 0.5}}, "data.imbalance_factor must be >= 1.0; got 0.5"),
        ({"epochs": 0}, "epochs must be >= 1; got 0"),
        ({"data": {"val_fraction": 1.0}}, "data.val_fraction must be < 1.0; got 1.0"),
        ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas must be < 1.0; got 1.0"),
        ({"optim": {"betas": [0.9]}}, "optim.betas must have two values"),
        ({"epochs": 3, "schedule": {"milestones": [2, 5]}}, "schedule.milestones has epoch 5 beyond epochs = 3"),
        ({"data": {
            "few_shot": 5, "imbalance_factor": 10}}, "data.few_shot and data.imbalance_factor cannot both be set"),
        ({"metrics": {"few_threshold": 50, "many_threshold": 10}}, "metrics.few_threshold must not exceed"),
        ({"methods": []}, "methods must name at least one method"),
        ({"methods": ["ce", "ce"]}, "methods lists a method twice"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N; got 'gpu'"),
    ],
)
def test_impossible_values_are_named(methods, raw, message):
    assert message in error_of(raw, methods)


def test_unknown_method_is_named_with_a_suggestion(methods):
    msg = error_of({"methods": ["cee"]}, methods)
    assert msg.startswith("unknown method 'cee' in methods (did you mean 'ce'?)")
    assert "registered: " in msg and "ce" in msg.split("registered: ")[1]


def test_unknown_table_is_named_with_a_suggestion(methods):
    assert error_of({"optimizer": {"lr": 0.1}}, methods) == "unknown config table [optimizer] (did you mean 'optim'?)"
    assert error_of({"c": {"x": 1}}, methods).startswith("unknown config table [c]")


def test_table_of_a_registered_but_disabled_method_is_kept(methods):
    cfg = build_config({"methods": ["ce"], "ce": {"weight": 2.0}}, methods)
    assert cfg.method_options == {"ce": {"weight": 2.0}}


def test_method_and_model_tables_are_checked_by_their_own_schema(tiny):
    from batchkin.trainer import prepare

    with pytest.raises(ConfigError, match=r"unknown config key ce\.label_smooth \(did you mean 'label_smoothing'\?\)"):
        prepare(tiny(ce={"label_smooth": 0.1}))
    with pytest.raises(ConfigError, match=r"ce\.label_smoothing must be < 1\.0; got 1\.5"):
        prepare(tiny(ce={"label_smoothing": 1.5}))
    with pytest.raises(ConfigError, match=r"unknown config key model\.widht \(did you mean 'width'\?\)"):
        prepare(tiny(model={"widht": 8}))
    with pytest.raises(ConfigError, match=r"unknown model\.name 'resnet9' \(did you mean 'resnet8'\?\)"):
        prepare(tiny(model={"name": "resnet9"}))
    with pytest.raises(ConfigError, match=r"unknown data\.name 'digit' \(did you mean 'digits'\?\)"):
        prepare(tiny(data={"name": "digit"}))


# ------------------------------------------------------------------------------ dataset options


DATASET_PLUGIN = """
    from dataclasses import dataclass, field
    from typing import Literal

    import torch

    from batchkin.data import ImageDataset
    from batchkin.hookspecs import hookimpl

    CALLS = []


    @dataclass
    class BlobOptions:
        blobs: int = field(default=3, metadata={"ge": 1, "help": "number of classes"})
        per_blob: int = field(default=12, metadata={"ge": 4, "help": "images per class"})
        scale: float = field(default=1.0, metadata={"gt": 0.0, "help": "pixel spread"})
        mode: Literal["dense", "sparse"] = "dense"


    @dataclass
    class OtherOptions:
        level: int = 1


    def blobs(k, n, scale=1.0):
        gen = torch.Generator().manual_seed(0)
        x = (torch.rand(k * n, 3, 6, 6, generator=gen) * 255 * min(scale, 1.0)).to(torch.uint8)
        return ImageDataset(x, torch.arange(k).repeat_interleave(n), [f"b{i}" for i in range(k)], name="blobs")


    def load_blobs(options, data):
        CALLS.append(("blobs", options, data))
        return blobs(options.blobs, options.per_blob, options.scale)


    def load_plain(data):
        CALLS.append(("plain", data))
        return blobs(3, 12)


    @hookimpl
    def register_datasets(register):
        register("blobs", load_blobs, options=BlobOptions)
        register("other", lambda options, data: blobs(2, 12), options=OtherOptions)
        register("plain", load_plain)
"""


@pytest.fixture
def dataset_plugins(plugin_file):
    return Plugins(extra_files=[plugin_file("dataset_options", DATASET_PLUGIN)])


def _calls(plugins) -> list:
    return sys.modules[plugins.dataset("blobs").obj.loader.__module__].CALLS


def test_dataset_options_are_parsed_and_passed_to_the_loader(dataset_plugins, tiny):
    from batchkin.trainer import prepare, resolved_config

    state = prepare(tiny(data={"name": "blobs", "blobs": 4, "scale": 2}), dataset_plugins)
    kind, options, data = _calls(dataset_plugins)[-1]
    assert kind == "blobs" and data is state.config.data
    assert (options.blobs, options.per_blob, options.scale, options.mode) == (4, 12, 2.0, "dense")
    assert type(options).__name__ == "BlobOptions" and isinstance(options.scale, float)
    assert state.num_classes == 4 and state.splits.classes == ["b0", "b1", "b2", "b3"]
    # the parsed options, defaults filled in, sit in [data] of the resolved config (config.toml)
    resolved = resolved_config(state)
    assert {k: resolved["data"][k] for k in ("name", "blobs", "per_blob", "scale", "mode")} == \
        {"name": "blobs", "blobs": 4, "per_blob": 12, "scale": 2.0, "mode": "dense"}
    assert "options" not in resolved["data"] and resolved["data"]["batch_size"] == 8
    again = tomllib.loads(dump_toml(resolved))
    assert resolved_config(prepare(again, dataset_plugins)) == resolved


def test_a_dataset_without_options_gets_the_data_table_only(dataset_plugins, tiny):
    from batchkin.trainer import prepare

    state = prepare(tiny(data={"name": "plain"}), dataset_plugins)
    kind, data = _calls(dataset_plugins)[-1]
    assert kind == "plain" and data is state.config.data and data.options == {}


@pytest.mark.parametrize(
    "data, message",
    [
        ({"blob": 4},
         "unknown config key data.blob (did you mean 'blobs'?); valid [data] keys for data.name = 'blobs': "
                      "blobs, per_blob, scale, mode (the dataset's own) and the engine's name, root, val_fraction, "),
        ({"per_blb": 4}, "unknown config key data.per_blb (did you mean 'per_blob'?)"),
        ({"batch_sise": 4}, "unknown config key data.batch_sise (did you mean 'batch_size'?); valid [data] keys"),
    ],
)
def test_an_unknown_dataset_key_is_named_with_the_valid_ones(dataset_plugins, tiny, data, message):
    from batchkin.trainer import prepare

    with pytest.raises(ConfigError) as info:
        prepare(tiny(data={"name": "blobs", **data}), dataset_plugins)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "data, message",
    [
        ({"blobs": "4"}, "data.blobs must be an integer, got str '4'"),
        ({"blobs": 2.5}, "data.blobs must be an integer, got float 2.5"),
        ({"scale": "big"}, "data.scale must be a number, got str 'big'"),
        ({"mode": "dens"}, "data.mode must be one of 'dense', 'sparse'; got 'dens' (did you mean 'dense'?)"),
        ({"blobs": 0}, "data.blobs must be >= 1; got 0"),
        ({"per_blob": 3}, "data.per_blob must be >= 4; got 3"),
        ({"scale": 0}, "data.scale must be > 0.0; got 0.0"),
    ],
)
def test_a_wrong_dataset_option_value_is_named(dataset_plugins, tiny, data, message):
    from batchkin.trainer import prepare

    calls = _calls(dataset_plugins)
    calls.clear()
    with pytest.raises(ConfigError) as info:
        prepare(tiny(data={"name": "blobs", **data}), dataset_plugins)
    assert str(info.value) == message
    assert calls == []  # refused before the loader runs


def test_options_of_a_dataset_that_is_not_selected_are_refused(dataset_plugins, tiny):
    from batchkin.trainer import prepare

    with pytest.raises(ConfigError) as info:
        prepare(tiny(data={"name": "blobs", "level": 2}), dataset_plugins)
    assert str(info.value) == ("data.level is an option of dataset 'other', not of the selected data.name = 'blobs' "
                               "(whose own options are blobs, per_blob, scale, mode)")
    for name in ("synthetic", "plain"):
        with pytest.raises(ConfigError) as info:
            prepare(tiny(data={"name": name, "blobs": 4}), dataset_plugins)
        assert str(info.value) == (f"data.blobs is an option of dataset 'blobs', not of the selected "
                                   f"data.name = '{name}' (which has no options of its own)")


def test_set_overrides_reach_dataset_options(dataset_plugins, tiny):
    from batchkin.trainer import prepare

    raw = apply_overrides(tiny(), ["data.name=blobs", "data.blobs=5", "data.mode=sparse", "data.scale=0.5"])
    assert raw["data"]["blobs"] == 5 and raw["data"]["mode"] == "sparse"
    state = prepare(raw, dataset_plugins)
    _, options, _ = _calls(dataset_plugins)[-1]
    assert (options.blobs, options.mode, options.scale, options.per_blob) == (5, "sparse", 0.5, 12)
    assert state.num_classes == 5
    with pytest.raises(ConfigError, match=r"^data\.blobs must be >= 1; got 0$"):
        prepare(apply_overrides(raw, ["data.blobs=0"]), dataset_plugins)


# ------------------------------------------------------------------------------ --set


@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3),
        ("-2", -2),
        ("0.05", 0.05),
        ("1e-3", 1e-3),
        ("true", True),
        ("false", False),
        ("[1, 2, 3]", [1, 2, 3]),
        ('["ce", "bbn"]', ["ce", "bbn"]),
        ("'quoted'", "quoted"),
        ('"two words"', "two words"),
        ("digits", "digits"),
        ("/tmp/some path", "/tmp/some path"),
        ("cuda:0", "cuda:0"),
        ("[ce, bbn", "[ce, bbn"),
    ],
)
def test_parse_value(text, value):
    out = parse_value(text)
    assert out == value and type(out) is type(value)


def test_apply_overrides_nested_keys():
    raw = {"epochs": 10, "data": {"name": "digits", "batch_size": 64}, "ce": {"weight": 1.0}}
    out = apply_overrides(raw, [
        "epochs=3",
        "data.batch_size = 16",
        "data.root=/data/a=b",
        "optim.lr=0.05",
        'methods=["ce"]',
        "model.blocks=[1, 1, 2]",
        "a.b.c=x",
        "ce.weight=2",
    ])
    assert out == {
        "epochs": 3,
        "data": {"name": "digits", "batch_size": 16, "root": "/data/a=b"},
        "optim": {"lr": 0.05},
        "methods": ["ce"],
        "model": {"blocks": [1, 1, 2]},
        "a": {"b": {"c": "x"}},
        "ce": {"weight": 2},
    }
    assert raw == {"epochs": 10, "data": {"name": "digits", "batch_size": 64}, "ce": {"weight": 1.0}}, "input untouched"


def test_apply_overrides_errors():
    with pytest.raises(ConfigError, match="--set expects key=value, got 'epochs'"):
        apply_overrides({}, ["epochs"])
    with pytest.raises(ConfigError, match="--set expects key=value"):
        apply_overrides({}, ["=3"])
    with pytest.raises(ConfigError, match=r"--set epochs\.x: epochs is not a table"):
        apply_overrides({"epochs": 3}, ["epochs.x=1"])


def test_overridden_values_are_checked(methods):
    raw = apply_overrides({}, ["data.batch_size=0"])
    assert "data.batch_size must be >= 1; got 0" in error_of(raw, methods)
    raw = apply_overrides({}, ["epochs=x"])
    assert "epochs must be an integer, got str 'x'" in error_of(raw, methods)


# ------------------------------------------------------------------------------ the resolved config


@pytest.fixture(scope="module")
def prepared(tiny):
    from batchkin.trainer import prepare

    return prepare(tiny(model={"name": "vit", "dim": 16, "depth": 1, "heads": 2, "stem_channels": 4},
                             ce={"label_smoothing": 0.1}, schedule={"milestones": [], "min_lr": 0.01}))


def test_dump_toml_round_trips_the_resolved_config(prepared):
    from batchkin.trainer import resolved_config

    resolved = resolved_config(prepared)
    text = dump_toml(resolved)
    assert tomllib.loads(text) == resolved
    assert resolved["model"]["dim"] == 16 and resolved["model"]["patch"] == 1  # model defaults filled in
    assert resolved["ce"] == {"label_smoothing": 0.1, "weight": 1.0}
    assert resolved["optim"]["eps"] == 1e-8
    assert resolved["data"]["synthetic_shape"] == [3, 6, 6]


def test_dump_toml_escapes_strings():
    data = {"s": 'a "quoted" \\ back\nslash', "t": {"u": [1.5, True, "x"], "v": {"w": -3}}, "e": []}
    assert tomllib.loads(dump_toml(data)) == data


def test_the_resolved_config_is_a_valid_config(prepared, methods):
    """config.toml of a run is read back by --resume and `batchkin eval`: it must load as a config
    and resolve to itself."""
    from batchkin.trainer import prepare, resolved_config

    resolved = resolved_config(prepared)
    again = tomllib.loads(dump_toml(resolved))
    build_config(again, methods)
    assert resolved_config(prepare(again)) == resolved
