"""batchkin.functional: one import for every method's plain functions and the ops."""

import importlib
import inspect
import re

import batchkin
import batchkin.functional as bf

# the brief of the module: each method's twin and each op it runs on
EXPECTED = {
    "reversed_sampler", "sample_epoch", "bbn_alpha", "bbn_logits", "bbn_loss",  # BBN: sampler, combiner, alpha
    "batchformer_logits", "batch_attention",  # BatchFormer
    "drloc_positions", "drloc_targets", "drloc_loss",  # DRLoc: sample, targets, loss
    "sdmp_mix", "batch_mix", "sdmp_ms_loss", "sdmp_mm_loss", "sdmp_moco_terms", "sdmp_dino_loss",  # SDMP
    "moco_loss", "moco_infonce", "dino_loss", "teacher_probs", "update_center",  # MoCo / DINO
}


def test_every_exported_name_imports_is_documented_and_listed():
    names = bf.__all__
    assert len(names) == len(set(names)), "a name is exported twice"
    assert EXPECTED <= set(names), sorted(EXPECTED - set(names))
    listed = set(re.findall(r":func:`(\w+)`", bf.__doc__))
    for name in names:
        obj = getattr(bf, name)
        assert callable(obj), name
        doc = inspect.getdoc(obj)
        assert doc and len(doc) > 30, f"{name} has no docstring of its own"
        assert name in listed, f"{name} is not in batchkin.functional's table"
        # a re-export of the function itself, from the module that defines it
        home = importlib.import_module(obj.__module__)
        assert getattr(home, name, None) is obj or getattr(home, obj.__name__) is obj, name
    assert listed <= set(names), sorted(listed - set(names))


def test_ops_come_from_the_kernels_and_twins_from_their_plugins():
    for name in ("batch_mix", "sample_mix_params", "batch_attention", "drloc_positions", "drloc_targets", "sample_epoch"):
        assert getattr(bf, name).__module__.startswith("batchkin.kernels"), name
    for name, plugin in (("bbn_alpha", "bbn"), ("batchformer_logits", "batchformer"), ("drloc_loss", "drloc"),
                         ("sdmp_mm_loss", "sdmp"), ("moco_loss", "moco"), ("dino_loss", "dino")):
        assert getattr(bf, name) is getattr(importlib.import_module(f"batchkin.plugins.{plugin}"), name)


def test_method_and_hookimpl_at_the_package_root():
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method

    assert batchkin.Method is Method and batchkin.hookimpl is hookimpl
    assert {"Method", "hookimpl"} <= set(batchkin.__all__)
