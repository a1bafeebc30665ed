"""Plugins: loading, validation at load time, method order, conflicts, switches, hook docs."""

from __future__ import annotations

import inspect
import io
import json
import re
import sys
import tomllib

import pytest
import torch

import batchkin
from batchkin import hookspecs
from batchkin.errors import PluginError
from batchkin.plugin import ENV_NO_AUTOLOAD, ENV_PLUGINS, Plugins, RunHooks
from batchkin.trainer import EngineDefaults, fit, prepare

SPECS = sorted(n for n, f in vars(hookspecs).items() if hasattr(f, "batchkin_spec"))

ORDER_PLUGIN = """
    import torch.nn.functional as F

    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    CALLS = []


    def _make(name):
        class Recorder(Method):
            @hookimpl
            def on_epoch_start(self, state):
                CALLS.append(("on_epoch_start", name, state.epoch))

            @hookimpl
            def loss_terms(self, state, outputs):
                CALLS.append(("loss_terms", name, state.step))
                return {name + "_ce": 0.5 * F.cross_entropy(outputs["logits"].float(), state.targets())}

        Recorder.__name__ = Recorder.__qualname__ = name.upper()
        return Recorder


    A, B = _make("a"), _make("b")


    @hookimpl
    def register_methods(register):
        register("a", A)
        register("b", B)
"""

CONFLICT_PLUGIN = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method
    from batchkin.trainer import classify_forward


    class F1(Method):
        @hookimpl
        def forward(self, state):
            return classify_forward(state, state.model, state.batch["x"])


    class F2(Method):
        @hookimpl
        def forward(self, state):
            return classify_forward(state, state.model, state.batch["x"])


    class S1(Method):
        @hookimpl
        def build_sampler(self, state):
            return None


    class Base1(Method):
        roles = frozenset({"ssl-base"})


    class Base2(Method):
        roles = frozenset({"ssl-base"})


    class Needy(Method):
        requires = ("base1", "base2")


    @hookimpl
    def register_methods(register):
        for name, cls in [("f1", F1), ("f2", F2), ("s1", S1), ("base1", Base1), ("base2", Base2), ("needy", Needy)]:
            register(name, cls)
"""


def _calls(plugins: Plugins) -> list:
    return sys.modules[plugins.method("a").obj.__module__].CALLS


# ------------------------------------------------------------------------------ method order


def test_run_hooks_call_methods_in_config_order(plugin_file):
    plugins = Plugins(extra_files=[plugin_file("order_unit", ORDER_PLUGIN)])
    calls = _calls(plugins)
    for names in (["a", "b"], ["b", "a"]):
        calls.clear()
        hooks = RunHooks(plugins, names, {}, EngineDefaults())
        assert hooks.names == names
        hooks.on_epoch_start(state=type("S", (), {"epoch": 1})())
        assert [c[1] for c in calls] == names


def test_method_order_in_a_run(plugin_file, tmp_path, tiny, metrics_lines):
    path = plugin_file("order_run", ORDER_PLUGIN)
    plugins = Plugins(extra_files=[path])
    calls = _calls(plugins)
    calls.clear()
    stream = io.StringIO()
    run = tmp_path / "run"
    fit(tiny(methods=["b", "a"]), run, plugins=plugins, progress=True, stream=stream)

    starts = [c for c in calls if c[0] == "on_epoch_start"]
    assert starts == [("on_epoch_start", "b", 1), ("on_epoch_start", "a", 1),
                      ("on_epoch_start", "b", 2), ("on_epoch_start", "a", 2)]
    terms = [c for c in calls if c[0] == "loss_terms"]
    steps = sorted({c[2] for c in terms})
    assert [c[1] for c in terms] == ["b", "a"] * len(steps)
    assert "methods in order: b -> a" in stream.getvalue()

    info = json.loads((run / "run.json").read_text())
    assert info["methods"] == ["b", "a"]
    assert info["plugins"] == {"b": f"file {path}", "a": f"file {path}"}
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["method_order"] == ["b", "a"]
    first = metrics_lines(run)[0]
    assert "train/a_ce" in first and "train/b_ce" in first
    assert first["train/a_ce"] == first["train/b_ce"]


# ------------------------------------------------------------------------------ conflicts


@pytest.fixture
def conflict_plugins(plugin_file):
    return Plugins(extra_files=[plugin_file("conflicts", CONFLICT_PLUGIN)])


def test_two_owners_of_a_firstresult_hook_are_refused_before_training(conflict_plugins, tmp_path, tiny):
    run = tmp_path / "run"
    with pytest.raises(PluginError, match=r"methods 'f1' and 'f2' conflict: both provide forward"):
        fit(tiny(methods=["ce", "f1", "f2"]), run, plugins=conflict_plugins, progress=False)
    assert not (run / "metrics.jsonl").exists()
    assert not (run / "checkpoints" / "last.pt").exists()
    # one owner per hook is fine, whatever the hook
    state = prepare(tiny(methods=["ce", "f1"]), conflict_plugins)
    assert state.hooks.names == ["ce", "f1"]


def test_shared_role_is_refused(conflict_plugins, tiny):
    with pytest.raises(PluginError, match=r"methods 'base1' and 'base2' conflict: both are a ssl-base"):
        prepare(tiny(methods=["ce", "base1", "base2"]), conflict_plugins)


def test_requires_is_checked(conflict_plugins, tiny):
    with pytest.raises(PluginError, match=r"method 'needy' needs one of 'base1', 'base2' in methods"):
        prepare(tiny(methods=["ce", "needy"]), conflict_plugins)
    assert prepare(tiny(methods=["ce", "base2", "needy"]), conflict_plugins).hooks.names == ["ce", "base2", "needy"]


# ------------------------------------------------------------------------------ validation at load time


INVALID = {
    "unknown_hook": ("def on_step(self, state):\n            return None", "on_step"),
    "wrong_argument": ("def loss_terms(self, state, output):\n            return None", "output"),
    "tryfirst": ("def on_epoch_start(self, state):\n            return None", "tryfirst"),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_method_class_is_refused_at_load_time(plugin_file, case):
    body, fragment = INVALID[case]
    marker = "@hookimpl(tryfirst=True)" if case == "tryfirst" else "@hookimpl"
    source = f"""
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class Bad(Method):
        {marker}
        {body}


    @hookimpl
    def register_methods(register):
        register("bad_{case}", Bad)
    """
    path = plugin_file(f"invalid_{case}", source)
    with pytest.raises(PluginError) as info:
        Plugins(extra_files=[path])
    message = str(info.value)
    assert f"method 'bad_{case}' (file {path})" in message
    assert fragment in message


def test_run_hooks_at_module_level_are_refused(plugin_file):
    path = plugin_file("module_level", """
    from batchkin.hookspecs import hookimpl

    @hookimpl
    def loss_terms(state, outputs):
        return {}
    """)
    with pytest.raises(PluginError, match=rf"plugin 'module_level' \(file {re.escape(str(path))}\) implements loss_terms at module level"):
        Plugins(extra_files=[path])


def test_method_registered_twice_names_both_origins(plugin_file):
    path = plugin_file("dup", """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    @hookimpl
    def register_methods(register):
        register("ce", Method)
    """)
    with pytest.raises(PluginError) as info:
        Plugins(extra_files=[path])
    message = str(info.value)
    assert message.startswith("method 'ce' is registered twice: by ")
    assert "builtin" in message and f"file {path}" in message


# ------------------------------------------------------------------------------ switches


FAKE_DIST = "batchkin_fake_ep_dist"
FAKE_MODULE = "batchkin_fake_ep_plugin"


@pytest.fixture
def fake_distribution(tmp_path, monkeypatch):
    """An installed distribution with a `batchkin` entry point, on sys.path."""
    site = tmp_path / "site"
    info = site / f"{FAKE_DIST}-1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {FAKE_DIST}\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text(f"[batchkin]\nfake = {FAKE_MODULE}\n")
    (site / f"{FAKE_MODULE}.py").write_text(
        "from batchkin.hookspecs import hookimpl\n"
        "from batchkin.plugin import Method\n\n"
        "class Fake(Method):\n    pass\n\n"
        "@hookimpl\ndef register_methods(register):\n    register('fake_method', Fake)\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, FAKE_MODULE, raising=False)
    yield
    sys.modules.pop(FAKE_MODULE, None)


def test_entry_points_are_loaded_unless_disabled(fake_distribution, monkeypatch, capsys):
    from batchkin.cli import main

    monkeypatch.delenv(ENV_NO_AUTOLOAD, raising=False)
    plugins = Plugins()
    assert plugins.autoload is True
    assert plugins.method("fake_method").origin == f"package {FAKE_DIST} 1.2"
    assert plugins.origins["fake"] == f"package {FAKE_DIST} 1.2"

    monkeypatch.setenv(ENV_NO_AUTOLOAD, "1")
    plugins = Plugins()
    assert plugins.autoload is False
    assert "fake_method" not in plugins.registry.methods
    assert "ce" in plugins.registry.methods  # built-ins are always there
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "fake_method" not in out
    assert "(entry-point autoloading is disabled: BATCHKIN_DISABLE_PLUGIN_AUTOLOAD)" in out


def test_plugin_files_from_the_environment(plugin_file, monkeypatch):
    first = plugin_file("env_order", ORDER_PLUGIN)
    second = plugin_file("env_conflicts", CONFLICT_PLUGIN)
    monkeypatch.setenv(ENV_PLUGINS, f"{first}:{second}")
    plugins = Plugins()
    assert plugins.method("a").origin == f"file {first}"
    assert plugins.method("f1").origin == f"file {second}"
    assert plugins.method_hooks("a") == ["loss_terms", "on_epoch_start"]
    monkeypatch.setenv(ENV_PLUGINS, str(first.with_name("missing.py")))
    with pytest.raises(PluginError, match="plugin file not found"):
        Plugins()


# ------------------------------------------------------------------------------ hook docs


def test_every_hook_is_marked_in_the_loop_of_the_hookspecs_docstring():
    doc = hookspecs.__doc__
    start = doc.index("The loop, with every hook where it fires")
    loop = doc[start: doc.index("Methods also carry")]
    assert len(SPECS) >= 17
    missing = [name for name in SPECS if not re.search(rf"\b{name}\(", loop)]
    assert missing == []
    # and every spec has its own docstring saying when it fires
    for name in SPECS:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name


def test_firstresult_hooks_are_marked_in_the_loop():
    loop = hookspecs.__doc__
    first = sorted(n for n in SPECS if getattr(hookspecs, n).batchkin_spec.get("firstresult"))
    assert first == ["build_sampler", "forward", "transform_views"]
    for name in first:
        args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert re.search(rf"{name}\({args}\)\s+# =", loop), name


def test_the_decorator_named_in_the_docs_exists():
    """The hookspecs docstring tells plugin authors to write ``@batchkin.hookimpl``."""
    assert "@batchkin.hookimpl" in hookspecs.__doc__
    assert getattr(batchkin, "hookimpl", None) is hookspecs.hookimpl


# ------------------------------------------------------------------------------ set-up and forward hooks


SETUP_PLUGIN = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class SlowHead(Method):
        @hookimpl
        def param_groups(self, state):
            return [{"params": list(state.model.classifier.parameters()), "name": "head",
                     "lr_scale": 0.1, "weight_decay_scale": 0.0}]


    class Greedy(Method):
        @hookimpl
        def param_groups(self, state):
            return [{"params": [state.model.classifier.weight], "name": "greedy"}]


    class ExtraStream(Method):
        @hookimpl
        def transform_features(self, state, outputs):
            if state.training:
                outputs["streams"].append(outputs["streams"][0] * 0.5)


    @hookimpl
    def register_methods(register):
        register("slow_head", SlowHead)
        register("greedy", Greedy)
        register("extra_stream", ExtraStream)
"""


@pytest.fixture
def setup_plugins(plugin_file):
    return Plugins(extra_files=[plugin_file("setup_hooks", SETUP_PLUGIN)])


def test_param_groups_scale_lr_and_weight_decay(setup_plugins, tiny):
    from batchkin.errors import ConfigError

    state = prepare(tiny(methods=["ce", "slow_head"], optim={"lr": 0.2, "weight_decay": 0.01}), setup_plugins)
    groups = {g["name"]: g for g in state.optimizer.param_groups}
    assert set(groups) == {"default", "head"}
    head_ids = {id(p) for p in state.model.classifier.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    assert not head_ids & {id(p) for p in groups["default"]["params"]}
    assert len(groups["default"]["params"]) + len(groups["head"]["params"]) == len(list(state.model.parameters()))
    assert groups["head"]["lr"] == pytest.approx(0.02) and groups["head"]["weight_decay"] == 0.0
    assert groups["default"]["lr"] == pytest.approx(0.2) and groups["default"]["weight_decay"] == 0.01
    with pytest.raises(ConfigError, match="parameter group 'greedy' claims a parameter already in 'head'"):
        prepare(tiny(methods=["ce", "slow_head", "greedy"]), setup_plugins)


def test_transform_features_streams_reach_the_logits_and_targets(setup_plugins, tiny):
    state = prepare(tiny(methods=["ce", "extra_stream"]), setup_plugins)
    x, y = state.train_data.batch(torch.arange(5), augment=False, padding=0, hflip=False, gen=None)
    state.batch, state.training = {"x": x, "y": y}, True
    out = state.hooks.forward(state=state)
    state.outputs = out
    assert len(out["streams"]) == 2
    assert out["logits"].shape == (10, 3)
    expected = state.unwrapped_model.classifier(out["streams"][0] * 0.5)
    assert torch.allclose(out["logits"][5:], expected)
    assert torch.equal(state.targets(), torch.cat([y, y]))
    state.training = False
    state.model.eval()
    out = state.hooks.forward(state=state)
    assert out["logits"].shape == (5, 3)


# ------------------------------------------------------------------------------ datasets with options, origins in run.json


ORIGINS_PLUGIN = """
    from dataclasses import dataclass, field

    import torch

    from batchkin.data import ImageDataset
    from batchkin.hookspecs import hookimpl
    from batchkin.models import TinyNet, TinyOptions
    from batchkin.plugin import Method


    @dataclass
    class StripeOptions:
        stripes: int = field(default=3, metadata={"ge": 2, "help": "number of classes"})


    def load_stripes(options, data):
        k, n = options.stripes, 12
        x = torch.zeros(k * n, 3, 6, 6, dtype=torch.uint8)
        for c in range(k):
            x[c * n : (c + 1) * n, :, c % 6] = 255
        return ImageDataset(x, torch.arange(k).repeat_interleave(n), [f"s{c}" for c in range(k)], name="stripes")


    class Quiet(Method):
        pass


    @hookimpl
    def register_datasets(register):
        register("stripes", load_stripes, options=StripeOptions)


    @hookimpl
    def register_models(register):
        register("tiny_copy", lambda o, *, num_classes, in_channels, image_size: TinyNet(o, num_classes, in_channels),
                 options=TinyOptions)


    @hookimpl
    def register_methods(register):
        register("quiet", Quiet)
"""


def test_run_json_records_builtin_origins_of_methods_dataset_and_model(tmp_path, tiny):
    run = tmp_path / "run"
    fit(tiny(epochs=1), run, progress=False)
    info = json.loads((run / "run.json").read_text())
    assert info["plugins"] == {"ce": "builtin"}
    assert info["dataset"] == {"name": "synthetic", "origin": "builtin"}
    assert info["model"] == {"name": "resnet8", "origin": "builtin"}


def test_cli_sets_dataset_options_and_run_json_records_plugin_origins(plugin_file, tmp_path, tiny, capsys):
    from batchkin.cli import main
    from batchkin.schema import dump_toml

    path = plugin_file("origins", ORIGINS_PLUGIN)
    config = tmp_path / "tiny.toml"
    config.write_text(dump_toml(tiny(epochs=1, methods=["ce", "quiet"], model={"name": "tiny_copy", "width": 4})))
    run = tmp_path / "run"
    argv = ["train", "--quiet", str(config), "--plugin", str(path), "--out", str(run),
            "--set", "data.name=stripes", "--set", "data.stripes=4"]
    assert main(argv) == 0, capsys.readouterr().err
    info = json.loads((run / "run.json").read_text())
    assert info["plugins"] == {"ce": "builtin", "quiet": f"file {path}"}
    assert info["dataset"] == {"name": "stripes", "origin": f"file {path}"}
    assert info["model"] == {"name": "tiny_copy", "origin": f"file {path}"}
    saved = tomllib.loads((run / "config.toml").read_text())["data"]
    assert saved["name"] == "stripes" and saved["stripes"] == 4
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert len(final["test/per_class"]) == 4

    # a wrong value given with --set stops the CLI with one line naming the key
    capsys.readouterr()
    argv = ["train", "--quiet", str(config), "--plugin", str(path), "--out", str(tmp_path / "unused"),
            "--set", "data.name=stripes", "--set", "data.stripes=1"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "batchkin: error: data.stripes must be >= 2; got 1"
    assert not (tmp_path / "unused" / "run.json").exists()


def test_dataset_options_may_not_reuse_an_engine_data_key(plugin_file):
    path = plugin_file("clash", """
    from dataclasses import dataclass

    from batchkin.hookspecs import hookimpl


    @dataclass
    class Options:
        root: str = ""
        depth: int = 1


    @hookimpl
    def register_datasets(register):
        register("clashing", lambda options, data: None, options=Options)
    """)
    with pytest.raises(PluginError) as info:
        Plugins(extra_files=[path])
    assert str(info.value) == (f"dataset 'clashing' (file {path}): option 'root' reuses the name of the engine's "
                               f"data.root; a dataset's options sit next to the engine's keys in [data]")
