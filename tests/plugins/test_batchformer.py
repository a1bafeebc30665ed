"""BatchFormer: the module against nn.TransformerEncoderLayer, the two-stream logits and loss,
evaluation as identity, gradients through both streams, the optimizer group, the ablation,
composition with ce / bbn / moco, exact resume with dropout, the global-batch all-gather
(2 gloo processes) and bad options."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchkin.plugins.batchformer as bf
from batchkin.errors import ConfigError
from batchkin.hookspecs import hookimpl
from batchkin.nn import BatchFormer, draw_seed
from batchkin.kernels.rng import derive_key
from batchkin.plugin import Plugins
from batchkin.rundir import load_checkpoint
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import evaluate, fit, prepare

import batchkin.plugins.bbn as bbn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plugins(*extra) -> Plugins:
    return Plugins(extra_modules=[bf, *extra])


def config(methods=("ce", "batchformer"), **tables) -> dict:
    """A tiny run (synthetic 1x8x8 images, 4 classes, the BN-free tiny CNN of width 8)."""
    return tiny_config(list(methods), **tables)


def bbn_config(methods=("bbn", "batchformer"), **tables) -> dict:
    """A tiny long-tailed run for BBN: 3x8x8 synthetic images, ResNet-8 of width 4 (D = 16, 2D = 32)."""
    base = tiny_config(
        list(methods),
        data={"synthetic_shape": [3, 8, 8], "synthetic_per_class": 24, "imbalance_factor": 4.0, "batch_size": 8,
              "val_fraction": 0.25, "test_fraction": 0.25},
        model={"name": "resnet8", "width": 4},
    )
    for key, value in tables.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def module_of(state) -> BatchFormer:
    return state.unwrapped_model.batchformer


def ce(logits, y):
    return F.cross_entropy(logits.float(), y)


# ------------------------------------------------------------------------------ the module


@pytest.mark.parametrize("width,heads,ffn,layers", [(8, 4, 8, 1), (12, 1, 12, 1), (16, 4, 24, 2)])
def test_module_equals_transformer_encoder_layer(width, heads, ffn, layers):
    """With dropout 0, BatchFormer == nn.TransformerEncoderLayer(C, h, ffn, 0) on f.unsqueeze(1)
    (the sequence is the batch), with the reference layers' weights loaded as they are."""
    torch.manual_seed(0)
    refs = [nn.TransformerEncoderLayer(width, heads, ffn, dropout=0.0) for _ in range(layers)]
    module = BatchFormer(width, num_layers=layers, nhead=heads, dim_feedforward=ffn, dropout=0.0)
    for layer, ref in zip(module.layers, refs):
        layer.load_state_dict(ref.state_dict())
    f = torch.randn(7, width, requires_grad=True)
    out = module(f)
    x = f.unsqueeze(1)
    for ref in refs:
        ref.train()
        x = ref(x)
    torch.testing.assert_close(out, x.squeeze(1), rtol=1e-5, atol=1e-5)
    # and the gradients w.r.t. the features
    g = torch.randn_like(out)
    (ga,) = torch.autograd.grad(out, f, g)
    f2 = f.detach().clone().requires_grad_(True)
    x = f2.unsqueeze(1)
    for ref in refs:
        x = ref(x)
    (gb,) = torch.autograd.grad(x.squeeze(1), f2, g)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)


def test_module_is_permutation_equivariant_over_the_batch():
    torch.manual_seed(1)
    module = BatchFormer(8, nhead=2, dropout=0.0)
    f = torch.randn(6, 8)
    perm = torch.randperm(6)
    torch.testing.assert_close(module(f)[perm], module(f[perm]), rtol=1e-5, atol=1e-6)
    # and it really mixes samples: changing one sample changes the others' outputs
    g = f.clone()
    g[0] += 1.0
    assert not torch.allclose(module(f)[1:], module(g)[1:])


def test_resolve_heads_upstream_rule():
    assert bf.resolve_heads(0, 64) == 1
    assert bf.resolve_heads(0, 128) == 1
    assert bf.resolve_heads(0, 256) == 4
    assert bf.resolve_heads(2, 256) == 2


# ------------------------------------------------------------------------------ the functional twin


def _parts(seed=0, width=8, k=3, n=5, dropout=0.0):
    torch.manual_seed(seed)
    backbone = nn.Linear(4, width)
    module = BatchFormer(width, nhead=2, dropout=dropout)
    classifier = nn.Linear(width, k)
    x = torch.randn(n, 4)
    y = torch.randint(0, k, (n,))
    return backbone, module, classifier, x, y


def test_twin_training_logits_are_both_streams_through_one_classifier():
    backbone, module, classifier, x, y = _parts()
    f = backbone(x)
    logits, labels = bf.batchformer_logits(f, y, module, classifier, True)
    assert logits.shape == (10, 3)
    torch.testing.assert_close(logits[:5], classifier(f))
    torch.testing.assert_close(logits[5:], classifier(module(f)))
    assert torch.equal(labels, torch.cat([y, y]))
    # the mean CE over the 2B rows is the average of the plain and the BatchFormer CE
    expected = 0.5 * (ce(classifier(f), y) + ce(classifier(module(f)), y))
    torch.testing.assert_close(ce(logits, labels), expected)


def test_twin_dropout_follows_the_seed_and_the_generator():
    backbone, module, classifier, x, y = _parts(dropout=0.5)
    f = backbone(x).detach()
    a, _ = bf.batchformer_logits(f, y, module, classifier, True, seed=123)
    b, _ = bf.batchformer_logits(f, y, module, classifier, True, seed=123)
    c, _ = bf.batchformer_logits(f, y, module, classifier, True, seed=124)
    assert torch.equal(a, b) and not torch.equal(a[5:], c[5:])
    torch.testing.assert_close(a[5:], classifier(module(f, seed=123)))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    d, _ = bf.batchformer_logits(f, y, module, classifier, True, generator=g1)
    torch.testing.assert_close(d[5:], classifier(module(f, g2)))
    # dropout is active: the output differs from the module in eval mode
    module.eval()
    assert not torch.allclose(a[5:], classifier(module(f)))


def test_twin_gradients_reach_the_backbone_through_both_streams():
    backbone, module, classifier, x, y = _parts()

    def backbone_grad(which):
        backbone.zero_grad()
        f = backbone(x)
        if which == "both":
            logits, labels = bf.batchformer_logits(f, y, module, classifier, True)
            loss = ce(logits, labels)
        elif which == "plain":
            loss = ce(classifier(f), y)
        else:
            loss = ce(classifier(module(f)), y)
        loss.backward()
        return backbone.weight.grad.clone()

    plain, through_bf, both = backbone_grad("plain"), backbone_grad("bf"), backbone_grad("both")
    assert plain.abs().sum() > 0 and through_bf.abs().sum() > 0
    assert not torch.allclose(plain, through_bf)
    torch.testing.assert_close(both, 0.5 * (plain + through_bf))


def test_twin_evaluation_is_the_identity_and_per_sample():
    backbone, module, classifier, x, y = _parts(dropout=0.5)
    f = backbone(x)
    logits, labels = bf.batchformer_logits(f, y, module, classifier, False)
    assert torch.equal(labels, y)
    torch.testing.assert_close(logits, classifier(f))
    for i in range(5):
        single, _ = bf.batchformer_logits(f[i : i + 1], y[i : i + 1], module, classifier, False)
        torch.testing.assert_close(single, logits[i : i + 1])


def test_twin_ablation_without_the_shared_classifier():
    backbone, module, classifier, x, y = _parts()
    f = backbone(x)
    logits, labels = bf.batchformer_logits(f, y, module, classifier, True, shared_classifier=False)
    assert torch.equal(labels, y)
    torch.testing.assert_close(logits, classifier(module(f)))


def test_twin_rejects_bad_shapes():
    backbone, module, classifier, x, y = _parts()
    with pytest.raises(ValueError, match=r"\[B, C\]"):
        bf.batchformer_logits(torch.randn(2, 5, 8), y, module, classifier, True)
    with pytest.raises(ValueError, match="batch size"):
        bf.batchformer_logits(torch.randn(4, 8), y, module, classifier, True)


def test_all_gather_without_a_process_group_is_the_identity():
    x = torch.randn(3, 4)
    out, start = bf.all_gather_with_grad(x)
    assert out is x and start == 0
    _, module, *_ = _parts()
    f = torch.randn(5, 8)
    torch.testing.assert_close(bf.batchformer_features(f, module, global_batch=True), module(f))


# ------------------------------------------------------------------------------ through the engine


def test_registered_like_a_third_party_method():
    p = plugins()
    entry = p.method("batchformer")
    assert entry.obj is bf.BatchFormerMethod
    assert entry.origin in ("builtin", "module batchkin.plugins.batchformer")
    assert set(p.method_hooks("batchformer")) == {
        "configure", "wrap_model", "param_groups", "on_fit_start", "transform_features"}


def _capture_step(raw, extra_modules=(), steps=1):
    """Run ``steps`` training steps; return the state, the batchformer generator's state before
    the last step, and the features the last step's transform_features saw."""
    seen = {}
    orig = bf.BatchFormerMethod.transform_features

    @functools.wraps(orig)  # a method's name and signature, as pluggy reads them (self is implicit)
    def spy(self, state, outputs):
        if state.training:
            seen["gen"] = state.generator("batchformer", "cpu").get_state()
            seen["f"] = outputs["streams"][0].detach().clone()
        return orig(self, state, outputs)

    bf.BatchFormerMethod.transform_features = hookimpl(spy)
    try:
        state = run_plugin(raw["methods"], steps=steps, config=raw, plugin_modules=[bf, *extra_modules])
    finally:
        bf.BatchFormerMethod.transform_features = orig
    return state, seen


def test_engine_training_streams_logits_and_loss_with_dropout():
    """Step 2 of a run: streams [f, BF(f)] with BF's dropout seeded from the run's generator,
    logits [classifier(f); classifier(BF(f))], labels repeated, ce = (CE plain + CE bf) / 2."""
    raw = config()
    state1, seen1 = _capture_step(raw, steps=1)  # its weights are those step 2 runs with
    state2, seen2 = _capture_step(raw, steps=2)
    out, f = state2.outputs, seen2["f"]
    B = f.shape[0]
    assert len(out["streams"]) == 2 and out["streams"][0] is out["features"]
    # one draw of the "batchformer" CPU generator per step
    g = torch.Generator()
    g.set_state(seen1["gen"])
    draw_seed(g)
    assert torch.equal(g.get_state(), seen2["gen"])
    seed = draw_seed(g)
    module = module_of(state1).train()
    assert module.layers[0].dropout_p == 0.5
    cls = state1.unwrapped_model.classifier
    with torch.no_grad():
        stream = module(f, seed=seed)
        torch.testing.assert_close(out["streams"][1].detach(), stream, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(stream, module.eval()(f), atol=1e-3)  # dropout was active
        torch.testing.assert_close(out["logits"][:B].detach(), cls(f), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(out["logits"][B:].detach(), cls(stream), rtol=1e-6, atol=1e-6)
    y = state2.batch["y"]
    assert out["logits"].shape == (2 * B, state2.num_classes)
    assert torch.equal(state2.targets(), torch.cat([y, y]))
    expected = 0.5 * (ce(out["logits"][:B], y) + ce(out["logits"][B:], y))
    torch.testing.assert_close(state2.loss_terms["ce"].detach(), expected.detach())


def test_engine_gradients_reach_module_and_backbone_through_both_streams():
    raw = config(batchformer={"dropout": 0.0})
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=[bf])
    module = module_of(state)
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # recompute the loss on the step's batch with the updated weights, per stream
    model = state.unwrapped_model
    model.zero_grad()
    x, y = state.batch["x"], state.batch["y"]
    f = model.forward_features(x)["features"]
    stem = next(model.parameters())
    (g_plain,) = torch.autograd.grad(ce(model.classifier(f), y), stem, retain_graph=True)
    (g_bf,) = torch.autograd.grad(ce(model.classifier(module(f)), y), stem)
    assert g_plain.abs().sum() > 0 and g_bf.abs().sum() > 0 and not torch.allclose(g_plain, g_bf)


def test_engine_evaluation_is_identity_and_single_sample():
    raw = config()
    state = run_plugin(raw["methods"], steps=2, config=raw, plugin_modules=[bf])
    model = state.unwrapped_model
    model.eval()
    state.training = False
    x = state.train_data.x[:6].float() / 255.0
    state.batch = {"x": x, "y": torch.zeros(6, dtype=torch.int64)}
    with torch.no_grad():
        out = state.hooks.forward(state=state)
        assert len(out["streams"]) == 1
        plain = model.classifier(model.forward_features(x)["features"])
        torch.testing.assert_close(out["logits"], plain)
        for i in range(6):
            state.batch = {"x": x[i : i + 1], "y": torch.zeros(1, dtype=torch.int64)}
            single = state.hooks.forward(state=state)["logits"]
            torch.testing.assert_close(single, out["logits"][i : i + 1], rtol=1e-5, atol=1e-6)
    # the engine's evaluation runs (and gives the same metrics with or without the module's weights)
    from batchkin.data import DeviceData

    m1 = evaluate(state, "test", DeviceData(state.splits.test, state.splits, state.device))
    with torch.no_grad():
        for p in module_of(state).parameters():
            p.add_(torch.randn_like(p))
    m2 = evaluate(state, "test", DeviceData(state.splits.test, state.splits, state.device))
    assert m1["per_class"] == m2["per_class"]


def test_method_never_touches_the_global_rng():
    raw = config()
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=[bf])
    method = state.hooks.methods["batchformer"]
    state.training = True
    f = torch.randn(5, module_of(state).layers[0].d_model)
    before_global = torch.get_rng_state()
    before_gen = state.generator("batchformer", "cpu").get_state()
    outputs = {"features": f, "streams": [f]}
    method.transform_features(state=state, outputs=outputs)
    assert torch.equal(torch.get_rng_state(), before_global)
    assert not torch.equal(state.generator("batchformer", "cpu").get_state(), before_gen)
    assert len(outputs["streams"]) == 2
    # evaluation: nothing drawn, nothing added
    state.training = False
    gen_now = state.generator("batchformer", "cpu").get_state()
    outputs = {"features": f, "streams": [f]}
    method.transform_features(state=state, outputs=outputs)
    assert outputs["streams"] == [f]
    assert torch.equal(state.generator("batchformer", "cpu").get_state(), gen_now)


def test_param_group_scales_land_in_the_optimizer():
    raw = config(optim={"lr": 0.2, "weight_decay": 0.01}, batchformer={"lr_scale": 0.1, "weight_decay_scale": 0.0})
    state = prepare(raw, plugins())
    groups = {g["name"]: g for g in state.optimizer.param_groups}
    assert set(groups) == {"default", "batchformer"}
    g = groups["batchformer"]
    assert g["initial_lr"] == pytest.approx(0.02) and g["weight_decay"] == 0.0
    assert groups["default"]["initial_lr"] == pytest.approx(0.2) and groups["default"]["weight_decay"] == 0.01
    module = module_of(state)
    assert {id(p) for p in g["params"]} == {id(p) for p in module.parameters()}
    assert not {id(p) for p in groups["default"]["params"]} & {id(p) for p in module.parameters()}
    # the module is part of the model: in its state dict (checkpoints) and its parameters
    assert any(k.startswith("batchformer.layers.0.self_attn.in_proj_weight") for k in state.model.state_dict())


def test_module_options_reach_the_module():
    raw = config(model={"width": 8}, batchformer={"layers": 2, "heads": 2, "ffn_dim": 12, "dropout": 0.25})
    state = prepare(raw, plugins())
    m = module_of(state)
    assert len(m.layers) == 2
    for layer in m.layers:
        assert layer.d_model == 8 and layer.self_attn.num_heads == 2 and layer.dropout_p == 0.25
        assert layer.linear1.out_features == 12
    auto = module_of(prepare(config(batchformer={"heads": 0}), plugins()))
    assert auto.layers[0].self_attn.num_heads == 1 and auto.layers[0].linear1.out_features == 8


def test_ablation_without_the_shared_classifier():
    raw = config(batchformer={"shared_classifier": False, "dropout": 0.0})
    state, seen = _capture_step(raw, steps=1)
    out = state.outputs
    B = seen["f"].shape[0]
    assert len(out["streams"]) == 1 and out["logits"].shape == (B, state.num_classes)
    assert torch.equal(state.targets(), state.batch["y"])
    # the stream is BF(f), not f: recompute with the weights before the update
    before = prepare(raw, plugins())
    module = module_of(before).train()
    torch.testing.assert_close(out["streams"][0].detach(), module(seen["f"]).detach(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out["streams"][0], seen["f"])
    torch.testing.assert_close(state.loss_terms["ce"].detach(), ce(out["logits"], state.batch["y"]).detach())


def test_composes_with_ce_in_either_order():
    a = run_plugin(["ce", "batchformer"], steps=2, config=config(), plugin_modules=[bf])
    b = run_plugin(["batchformer", "ce"], steps=2, config=config(["batchformer", "ce"]), plugin_modules=[bf])
    torch.testing.assert_close(a.loss_terms["ce"], b.loss_terms["ce"])
    for (ka, va), (kb, vb) in zip(a.unwrapped_model.state_dict().items(), b.unwrapped_model.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb)


def test_needs_a_loss():
    with pytest.raises(ConfigError, match="no enabled method produced a loss term"):
        run_plugin(["batchformer"], steps=1, config=config(["batchformer"]), plugin_modules=[bf])


# ------------------------------------------------------------------------------ bbn


def test_with_bbn_on_the_combined_features():
    raw = bbn_config(batchformer={"dropout": 0.0})
    state, seen = _capture_step(raw, extra_modules=[bbn], steps=1)
    model = state.unwrapped_model
    assert isinstance(model, bbn.BilateralNet)
    module = module_of(state)
    assert module.layers[0].d_model == model.feature_dim == 2 * model.branch_dim == 32
    out = state.outputs
    B = state.batch["y"].shape[0]
    f = seen["f"]
    alpha = out["alpha"]
    # the features BatchFormer saw are BBN's combined features cat(2a f_c, 2(1-a) f_r)
    torch.testing.assert_close(f, bbn.bbn_features(out["f_c"], out["f_r"], alpha).detach())
    # logits: the one Linear(2D, K) on [f; BF(f)], BF recomputed with the weights before the update
    before = prepare(raw, plugins(bbn))
    bf_before, cls_before = module_of(before).train(), before.unwrapped_model.classifier
    torch.testing.assert_close(out["streams"][1].detach(), bf_before(f).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["logits"][B:].detach(), cls_before(bf_before(f)).detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["logits"][:B].detach(), cls_before(f).detach(), rtol=1e-5, atol=1e-5)
    # BBN's loss over both streams, its targets repeated
    y, y_rev = state.batch["y"], state.batch["y_rev"]
    expected = bbn.bbn_loss(out["logits"], y.repeat(2), y_rev.repeat(2), alpha)
    torch.testing.assert_close(state.loss_terms["bbn"], expected)
    for p in module.parameters():
        assert p.grad is not None


def test_with_bbn_evaluation_is_bbns_own():
    raw = bbn_config()
    state = run_plugin(raw["methods"], steps=2, config=raw, plugin_modules=[bf, bbn])
    model = state.unwrapped_model
    model.eval()
    state.training = False
    x = torch.randn(5, 3, 8, 8)
    state.batch = {"x": x, "y": torch.zeros(5, dtype=torch.int64)}
    with torch.no_grad():
        out = state.hooks.forward(state=state)
        f_c, f_r = model.branch_features(x)
        torch.testing.assert_close(out["logits"], model.classifier(torch.cat([f_c, f_r], 1)))
        torch.testing.assert_close(out["logits"], model(x))
        state.batch = {"x": x[:1], "y": torch.zeros(1, dtype=torch.int64)}
        torch.testing.assert_close(state.hooks.forward(state=state)["logits"], out["logits"][:1], rtol=1e-5, atol=1e-6)


def test_bbn_after_batchformer_is_refused():
    with pytest.raises(ConfigError, match="list 'bbn' before 'batchformer'"):
        prepare(bbn_config(["batchformer", "bbn"]), plugins(bbn))


# ------------------------------------------------------------------------------ ssl base


def test_with_moco_the_projector_runs_on_both_streams():
    from batchkin.plugins import moco, ssl

    raw = tiny_config(["moco", "batchformer"], data={"augment": False})
    raw["epochs"] = 1
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=[bf, moco])
    step = state.outputs["ssl"]
    assert isinstance(step, ssl.SSLStep)
    assert all(len(q) == 2 for q in step.q)  # [plain, BF] per view
    assert not hasattr(state.unwrapped_model.momentum["encoder"], "batchformer")
    for p in module_of(state).parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ resume


def _lines(run):
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        r.pop("images_per_s", None)
        out.append(r)
    return out


def test_resume_is_exact_with_dropout(tmp_path):
    raw = config(batchformer={"dropout": 0.5})
    raw["epochs"] = 3
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    full = fit(raw, straight, progress=False, plugins=plugins())
    fit(raw, parted, until=1, progress=False, plugins=plugins())
    ck = load_checkpoint(parted / "checkpoints" / "last.pt")
    assert "batchformer@cpu" in ck["generators"]
    assert any(k.startswith("batchformer.") for k in ck["model"])
    import tomllib

    saved = tomllib.loads((parted / "config.toml").read_text())
    assert saved["batchformer"]["dropout"] == 0.5
    resumed = fit(saved, parted, resume=True, progress=False, plugins=plugins())
    a = load_checkpoint(straight / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(parted / "checkpoints" / "last.pt")["model"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _lines(straight) == _lines(parted)
    assert json.dumps(full.final, sort_keys=True) == json.dumps(resumed.final, sort_keys=True)
    # the dropout draws matter: another seed of the batchformer stream alone changes the weights
    other = tmp_path / "other"
    p = plugins()
    orig = bf.BatchFormerMethod.step_seed
    bf.BatchFormerMethod.step_seed = lambda self, state: derive_key(orig(self, state), 1)
    try:
        fit(raw, other, progress=False, plugins=p)
    finally:
        bf.BatchFormerMethod.step_seed = orig
    c = load_checkpoint(other / "checkpoints" / "last.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


# ------------------------------------------------------------------------------ bad options


@pytest.mark.parametrize("table,match", [
    ({"layers": 0}, r"batchformer\.layers must be >= 1"),
    ({"heads": -1}, r"batchformer\.heads must be >= 0"),
    ({"ffn_dim": -4}, r"batchformer\.ffn_dim must be >= 0"),
    ({"dropout": 1.0}, r"batchformer\.dropout must be < 1"),
    ({"dropout": -0.1}, r"batchformer\.dropout must be >= 0"),
    ({"lr_scale": -1.0}, r"batchformer\.lr_scale must be >= 0"),
    ({"weight_decay_scale": -0.5}, r"batchformer\.weight_decay_scale must be >= 0"),
    ({"shared_classifier": "yes"}, r"batchformer\.shared_classifier must be true or false"),
    ({"layers": 1.5}, r"batchformer\.layers must be an integer"),
    ({"head": 2}, r"batchformer\.head.*did you mean 'heads'"),
])
def test_bad_options(table, match):
    with pytest.raises(ConfigError, match=match):
        prepare(config(batchformer=table), plugins())


def test_heads_must_divide_the_feature_width():
    with pytest.raises(ConfigError, match=r"batchformer\.heads = 3 must divide the feature width 8"):
        prepare(config(batchformer={"heads": 3}), plugins())


def test_a_model_without_feature_dim_is_refused():
    from batchkin.plugin import Method

    class Strip(Method):
        @hookimpl
        def wrap_model(self, state):
            state.model.feature_dim = None

    import types

    mod = types.ModuleType("strip")
    mod.register_methods = hookimpl(lambda register: register("strip", Strip))
    with pytest.raises(ConfigError, match="batchformer needs a model with an integer feature_dim"):
        prepare(config(["strip", "ce", "batchformer"]), plugins(mod))


def test_a_later_wrapper_that_drops_the_module_is_refused():
    from batchkin.models import Classifier
    from batchkin.plugin import Method

    class Wrap(Classifier):
        def __init__(self, inner):
            super().__init__()
            self.body = nn.Sequential(*[m for n, m in inner.named_children() if n not in ("classifier", "batchformer")])
            self.classifier, self.feature_dim, self.num_classes = inner.classifier, inner.feature_dim, inner.num_classes

        def forward_features(self, x):
            return {"features": self.body(x)}

    class Rewrap(Method):
        @hookimpl
        def wrap_model(self, state):
            state.model = Wrap(state.model)

    import types

    mod = types.ModuleType("rewrap")
    mod.register_methods = hookimpl(lambda register: register("rewrap", Rewrap))
    with pytest.raises(ConfigError, match="list batchformer after it"):
        prepare(config(["ce", "batchformer", "rewrap"]), plugins(mod))


# ------------------------------------------------------------------------------ distributed: the global batch


_DIST_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from batchkin.nn import BatchFormer
    from batchkin.plugins.batchformer import all_gather_with_grad, batchformer_features

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    out = {}
    for case, (sizes, p) in {"equal": ((4, 4), 0.0), "unequal": ((3, 5), 0.0), "dropout": ((4, 4), 0.5)}.items():
        torch.manual_seed(0)  # the same module, features and weights on every rank
        module = BatchFormer(8, nhead=2, dropout=p)
        full = torch.randn(sum(sizes), 8)
        w = torch.randn(sum(sizes), 8)
        lo = sum(sizes[:rank])
        f = full[lo : lo + sizes[rank]].clone().requires_grad_(True)
        y = batchformer_features(f, module, seed=99, global_batch=True)
        (y * w[lo : lo + sizes[rank]]).sum().backward()
        g, start = all_gather_with_grad(torch.zeros(sizes[rank], 2))
        out[case] = {"y": y.detach(), "grad": f.grad, "start": start, "gathered_rows": g.shape[0],
                     "param_grads": [q.grad.clone() for q in module.parameters()]}
        # the local batch (no gather): a different result, so the comparison can fail
        module.zero_grad()
        f2 = f.detach().clone().requires_grad_(True)
        y2 = batchformer_features(f2, module, seed=99, global_batch=False)
        (y2 * w[lo : lo + sizes[rank]]).sum().backward()
        out[case]["local_grad"] = f2.grad
    torch.save(out, sys.argv[1] + f"/rank{rank}.pt")
    dist.destroy_process_group()
""")


def _torchrun(script, *args, nproc=2, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.dist
def test_global_batch_gradients_equal_one_process_on_the_whole_batch(tmp_path):
    script = tmp_path / "bf_dist.py"
    script.write_text(_DIST_SCRIPT)
    r = _torchrun(script, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2)]
    for case, (sizes, p) in {"equal": ((4, 4), 0.0), "unequal": ((3, 5), 0.0), "dropout": ((4, 4), 0.5)}.items():
        torch.manual_seed(0)
        module = BatchFormer(8, nhead=2, dropout=p)
        full = torch.randn(sum(sizes), 8).requires_grad_(True)
        w = torch.randn(sum(sizes), 8)
        y = module(full, seed=99)
        (y * w).sum().backward()
        lo = 0
        for rank, res in enumerate(ranks):
            n = sizes[rank]
            rows = slice(lo, lo + n)
            assert res[case]["start"] == lo and res[case]["gathered_rows"] == sum(sizes)
            torch.testing.assert_close(res[case]["y"], y[rows].detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(res[case]["grad"], full.grad[rows], rtol=1e-5, atol=1e-6)
            assert not torch.allclose(res[case]["local_grad"], full.grad[rows], rtol=1e-3, atol=1e-4)
            lo += n
        # each rank's module gradient is that of its own rows' loss: their sum is the whole batch's
        for i, q in enumerate(module.parameters()):
            torch.testing.assert_close(ranks[0][case]["param_grads"][i] + ranks[1][case]["param_grads"][i], q.grad,
                                       rtol=1e-4, atol=1e-5)


def _train_args(out, *extra):
    builtin = "batchformer" in Plugins().registry.methods
    plugin = [] if builtin else ["--plugin", str(bf.__file__)]
    common = ["--set", "data.name=synthetic", "--set", "model.name=tiny", "--set", "epochs=1", "--set", "device=cpu",
              "--set", "data.synthetic_per_class=32", "--set", "optim.lr=0.05", "--set", "train.log_every=1000",
              "--set", 'methods=["ce","batchformer"]', "--set", "batchformer.dropout=0.0"]
    return ["-m", "batchkin", "train", "--quiet", "--out", str(out), *plugin, *common, *extra]


@pytest.mark.dist
def test_two_ranks_global_batch_train_like_one_rank_with_the_whole_batch(tmp_path):
    """DDP, 2 ranks x batch 8 with global_batch = one process x batch 16 (dropout 0, BN-free model)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    # both runs at once (they mostly wait on process start-up)
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *_train_args(two, "--set", "data.batch_size=8", "--set", "batchformer.global_batch=true")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    p1 = subprocess.Popen([sys.executable, *_train_args(one, "--set", "data.batch_size=16")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        _, err2 = p2.communicate(timeout=300)
        _, err1 = p1.communicate(timeout=300)
    finally:
        for proc in (p1, p2):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert p2.returncode == 0, err2[-3000:]
    assert p1.returncode == 0, err1[-3000:]
    w2 = load_checkpoint(two / "checkpoints" / "last.pt")["model"]
    w1 = load_checkpoint(one / "checkpoints" / "last.pt")["model"]
    assert w1.keys() == w2.keys() and any(k.startswith("batchformer.") for k in w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=k)


# ------------------------------------------------------------------------------ the shipped configs


def test_shipped_configs_parse_and_digits_runs(tmp_path):
    import tomllib
    from pathlib import Path

    from batchkin.config import apply_overrides, build_config

    root = Path(__file__).resolve().parents[2] / "configs"
    p = plugins(bbn)
    for name in ("batchformer_digits.toml", "batchformer_fashion_mnist_lt.toml"):
        raw = tomllib.loads((root / name).read_text())
        cfg = build_config(raw, p.registry.methods)
        assert cfg.methods == ["ce", "batchformer"]
        assert cfg.method_options["batchformer"]["dropout"] == 0.5
    # BBN's configs with batchformer appended, as the README commands run them
    raw = apply_overrides(tomllib.loads((root / "bbn_digits.toml").read_text()), ['methods=["bbn","batchformer"]'])
    assert build_config(raw, p.registry.methods).methods == ["bbn", "batchformer"]
    # the quick digits run: one epoch of the real config
    raw = apply_overrides(tomllib.loads((root / "batchformer_digits.toml").read_text()), ["epochs=1"])
    result = fit(raw, tmp_path / "digits", progress=False, plugins=p)
    assert result.final["kind"] == "final" and 0.0 <= result.final["test/top1"] <= 1.0
    epochs = [r for r in _lines(tmp_path / "digits") if r["kind"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["train/ce"] > 0
