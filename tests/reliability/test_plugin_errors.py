"""A plugin's runtime error or bad loss term is one line naming the method, its file and the
hook (not engine code); run hooks go through pluggy's hook caller, in the config's order."""

from __future__ import annotations

import pytest
import torch
from contract import TINY
from hostile import plugin

from batchkin.plugin import Plugins
from batchkin.testing import tiny_config
from batchkin.trainer import prepare, train_step

TRAIN = ["train", *TINY]


def _method(tmp_path, stem: str, body: str, extra: str = "") -> object:
    """A plugin file registering method ``bad`` whose class body is ``body``."""
    source = extra + "\nclass Bad(Method):\n" + "\n".join("    " + line for line in body.strip("\n").splitlines()) + """

@hookimpl
def register_methods(register):
    register("bad", Bad)
"""
    return plugin(tmp_path, stem, source)


def _train(path, tmp_path, methods='["ce","bad"]'):
    return [*TRAIN, "--plugin", path, "--set", f"methods={methods}", "--out", tmp_path / "run"]


# ------------------------------------------------------------------------------ hooks that raise


@pytest.mark.parametrize("hook, args", [
    ("configure", "state"), ("wrap_model", "state"), ("on_fit_start", "state"), ("on_epoch_start", "state"),
    ("transform_batch", "state"), ("transform_features", "state, outputs"), ("loss_terms", "state, outputs"),
    ("after_step", "state"), ("on_epoch_end", "state"), ("on_evaluate", "state, split, metrics"),
    ("on_fit_end", "state"),
])
def test_a_hook_that_raises_names_the_method_its_file_and_the_hook(user_error, tmp_path, hook, args):
    path = _method(tmp_path, f"raises_in_{hook}", f"""
@hookimpl
def {hook}(self, {args}):
    raise ValueError("the plugin's own bug")
""")
    unchanged = [path] + ([tmp_path / "run"] if hook in ("configure", "wrap_model") else [])
    user_error(_train(path, tmp_path), f"method 'bad' (file {path}) failed in {hook}: ValueError: the plugin's own bug",
               unchanged=unchanged)


def test_a_plugins_own_error_passes_unchanged(user_error, tmp_path):
    path = _method(tmp_path, "own_error", """
@hookimpl
def configure(self, state):
    from batchkin.errors import ConfigError
    raise ConfigError("bad.level must be set for this model")
""")
    line = user_error(_train(path, tmp_path), unchanged=[path, tmp_path / "run"])
    assert line == "batchkin: error: bad.level must be set for this model"


def test_sys_exit_in_a_plugin_file_or_a_hook_does_not_end_the_run_silently(user_error, tmp_path):
    at_import = plugin(tmp_path, "exits_at_import", "import sys\nsys.exit(0)\n")
    user_error([*TRAIN, "--plugin", at_import, "--out", tmp_path / "run"],
               f"plugin file {at_import} failed to import: it called sys.exit(0)", unchanged=[at_import, tmp_path / "run"])
    in_hook = _method(tmp_path, "exits_in_hook", """
@hookimpl
def on_epoch_start(self, state):
    import sys
    sys.exit(0)
""")
    user_error(_train(in_hook, tmp_path), "method 'bad'", "failed in on_epoch_start: it called sys.exit(0)",
               unchanged=[in_hook])


def test_an_allocation_failure_in_a_hook_is_still_reported_as_out_of_memory(user_error, tmp_path):
    path = _method(tmp_path, "hook_oom", """
@hookimpl
def loss_terms(self, state, outputs):
    import torch
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
""")
    user_error(_train(path, tmp_path), "out of memory at epoch 1 step 1", unchanged=[path])


# ------------------------------------------------------------------------------ bad loss terms


@pytest.mark.parametrize("value, fragments", [
    ("torch.ones(4, requires_grad=True)", ["returned 'extra' as a torch.float32 tensor of shape [4]", "one floating-point value"]),
    ("0.5", ["returned 'extra' as float 0.5", "must be a scalar tensor"]),
    ("torch.tensor(3)", ["returned 'extra' as a torch.int64 tensor of shape []"]),
])
def test_a_loss_term_that_is_not_a_scalar_tensor(user_error, tmp_path, value, fragments):
    path = _method(tmp_path, f"term_{abs(hash(value))}", f"""
@hookimpl
def loss_terms(self, state, outputs):
    import torch
    return {{"extra": {value}}}
""")
    user_error(_train(path, tmp_path), f"method 'bad' (file {path}): loss_terms", *fragments, unchanged=[path])


@pytest.mark.parametrize("result, fragment", [
    ("[1.0]", "loss_terms must return a dict of named loss terms or None; got list [1.0]"),
    ("{3: outputs['logits'].sum()}", "loss_terms named a loss term 3; names must be strings"),
])
def test_a_loss_terms_result_that_is_not_a_dict_of_names(user_error, tmp_path, result, fragment):
    path = _method(tmp_path, f"result_{abs(hash(result))}", f"""
@hookimpl
def loss_terms(self, state, outputs):
    return {result}
""")
    user_error(_train(path, tmp_path), f"method 'bad' (file {path}): {fragment}", unchanged=[path])


def test_a_nan_loss_term_names_the_method_and_the_hook(user_error, tmp_path):
    path = _method(tmp_path, "nan_term", """
@hookimpl
def loss_terms(self, state, outputs):
    return {"extra": outputs["logits"].sum() * float("nan")}
""")
    user_error(_train(path, tmp_path), "non-finite loss term(s) 'extra' from method 'bad' (loss_terms)",
               unchanged=[path])


def test_loss_terms_that_depend_on_no_parameter(user_error, tmp_path):
    path = _method(tmp_path, "constant_term", """
@hookimpl
def loss_terms(self, state, outputs):
    import torch
    return {"constant": torch.tensor(1.0)}
""")
    user_error(_train(path, tmp_path, methods='["bad"]'), "no loss term depends on the model's parameters",
               "loss_terms of bad: constant", unchanged=[path])


# ------------------------------------------------------------------------------ pluggy's hook caller and the order


ORDER_PLUGIN = """
import torch


def _term(name):
    class M(Method):
        @hookimpl
        def loss_terms(self, state, outputs):
            if name == "silent":
                return None
            return {name: outputs["logits"].float().pow(2).mean() * 0.0 + len(name)}

    return M


@hookimpl
def register_methods(register):
    for name in ("zeta", "silent", "alpha"):
        register(name, _term(name))
"""


def test_run_hooks_go_through_pluggy_in_the_config_order(tmp_path):
    path = plugin(tmp_path, "ordered_terms", ORDER_PLUGIN)
    raw = tiny_config(["zeta", "ce", "silent", "alpha"], data={"synthetic_shape": [3, 8, 8]})
    state = prepare(raw, Plugins(extra_files=[path]))
    trace: list[str] = []
    state.hooks.pm.trace.root.setwriter(trace.append)
    undo = state.hooks.pm.enable_tracing()
    try:
        pairs = state.hooks.call_each("loss_terms", state=state, outputs=state.hooks.forward(state=_batch(state)))
        calls_before_step = sum(line.lstrip().startswith("loss_terms ") for line in trace)
        state.epoch = 1
        state.sampler.set_epoch(1)
        train_step(state, next(iter(state.sampler)))
    finally:
        undo()
    assert [name for name, _ in pairs] == ["zeta", "ce", "silent", "alpha"]
    assert pairs[2][1] is None and list(pairs[0][1]) == ["zeta"] and list(pairs[3][1]) == ["alpha"]
    assert calls_before_step == 1
    hooks_traced = [line.split()[0] for line in trace if not line.lstrip().startswith("finish")]
    for hook in ("loss_terms", "transform_batch", "forward", "transform_features", "after_step"):
        assert hooks_traced.count(hook) >= 1, (hook, trace)
    assert hooks_traced.count("loss_terms") == 2  # the direct call and the step's: every call is traced
    assert list(state.loss_terms) == ["zeta", "ce", "alpha"]
    assert float(state.loss_terms["zeta"].detach()) == 4.0 and float(state.loss_terms["alpha"].detach()) == 5.0


def _batch(state):
    state.training = True
    x, y = state.train_data.batch(torch.arange(4), augment=False, padding=0, hflip=False, gen=None)
    state.batch = {"x": x, "y": y, "idx": torch.arange(4)}
    return state


def test_a_plugin_model_whose_builder_raises(user_error, tmp_path):
    path = plugin(tmp_path, "broken_model", """
def build(options, num_classes, in_channels, image_size):
    raise IndexError("the plugin's own bug")


@hookimpl
def register_models(register):
    register("broken", build)
""")
    user_error([*TRAIN, "--plugin", path, "--set", "model.name=broken", "--out", tmp_path / "run"],
               f"model 'broken' (file {path}) with options {{'name': 'broken'}} failed to build: IndexError: "
               "the plugin's own bug", unchanged=[path, tmp_path / "run"])
