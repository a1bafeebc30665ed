"""The ``moco`` base plugin: MoCo v3's loss, momentum encoder, kNN evaluation, resume, composition."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from batchkin.data import DeviceData
from batchkin.errors import ConfigError, PluginError
from batchkin.hookspecs import hookimpl
from batchkin.plugin import Method, Plugins
from batchkin.plugins import dino, moco, sdmp
from batchkin.plugins.moco import moco_infonce, moco_loss
from batchkin.plugins.ssl import cosine_momentum, knn_scores
from batchkin.rundir import load_checkpoint
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import evaluate, fit, prepare, train_step

from _common import read_metrics

MODULES = [moco, dino, sdmp]


def plugins(*extra):
    return Plugins(extra_modules=[*MODULES, *extra])


def ssl_config(methods=("moco",), epochs=1, **tables):
    raw = tiny_config(list(methods), data={"augment": False, **tables.pop("data", {})}, **tables)
    raw["epochs"] = epochs
    return raw


def untimed_metrics(run):
    """metrics.jsonl without the timing field, so that two runs' records compare."""
    lines = read_metrics(run)
    for r in lines:
        r.pop("images_per_s", None)
    return lines


# ------------------------------------------------------------------------------ the loss


def test_infonce_hand_worked_example():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    k = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    # normalised: q = k = I; logits = I / 0.5 = diag(2); CE = log(1 + e^-2) per row; times 2T = 1
    assert float(moco_infonce(q, k, 0.5)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    # keys swapped: the positives are now orthogonal, CE = log(1 + e^2)
    assert float(moco_infonce(q, k.flip(0), 0.5)) == pytest.approx(math.log(1 + math.exp(2)), rel=1e-6)
    # symmetric loss: L(q1, k2) + L(q2, k1)
    sym = moco_loss(q, q.flip(0), k.flip(0), k, 0.5)
    assert float(sym) == pytest.approx(2 * math.log(1 + math.exp(-2)), rel=1e-6)


def test_infonce_parity_with_explicit_float64():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(7, 5, generator=g), torch.randn(7, 5, generator=g)
    T = 0.2
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    kn = k.double() / k.double().norm(dim=1, keepdim=True)
    logits = qn @ kn.T / T
    expect = sum(-logits[i, i] + torch.log(torch.exp(logits[i]).sum()) for i in range(7)) / 7 * 2 * T
    assert float(moco_infonce(q, k, T)) == pytest.approx(float(expect), rel=1e-5)


def test_infonce_with_a_gathered_key_bank_and_offset_labels():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, generator=g), torch.randn(9, 4, generator=g)
    labels = torch.tensor([3, 4, 5])  # rank 1 of 3, B = 3
    logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
    expect = F.cross_entropy(logits, labels) * 0.4
    torch.testing.assert_close(moco_infonce(q, k, 0.2, labels), expect)


def test_keys_gathered_across_two_ranks_equal_one_rank(tmp_path):
    """Two gloo processes with B rows each, keys all-gathered and labels offset by rank * B:
    the mean of the ranks' losses and the gradients equal one process with 2B rows."""
    script = tmp_path / "gather.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, torch, torch.distributed as dist, torch.multiprocessing as mp
        from batchkin.plugins.moco import moco_loss
        from batchkin.plugins.ssl import gather_rows

        def data():
            g = torch.Generator().manual_seed(0)
            return [torch.randn(8, 5, generator=g) for _ in range(4)]  # q1, q2, k1, k2

        def worker(rank, world):
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method="file://{tmp_path / 'rdv'}", rank=rank, world_size=world)
            q1, q2, k1, k2 = [t[rank * 4 : (rank + 1) * 4] for t in data()]
            q1.requires_grad_(True); q2.requires_grad_(True)
            labels = torch.arange(4) + rank * 4
            loss = moco_loss(q1, q2, gather_rows(k1, world), gather_rows(k2, world), 0.2, labels)
            (loss / world).backward()
            out = torch.stack([loss.detach()])
            dist.all_reduce(out)
            grads = gather_rows(torch.cat([q1.grad, q2.grad], 1), world)
            if rank == 0:
                with open("{tmp_path / 'out.json'}", "w") as fh:
                    json.dump({{"loss": float(out[0]) / world, "grad": grads.tolist()}}, fh)
            dist.destroy_process_group()

        if __name__ == "__main__":
            # fork: the children inherit the imported modules (spawn would import torch twice more)
            mp.start_processes(worker, args=(2,), nprocs=2, start_method="fork")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    g = torch.Generator().manual_seed(0)
    q1, q2, k1, k2 = [torch.randn(8, 5, generator=g) for _ in range(4)]
    q1.requires_grad_(True)
    q2.requires_grad_(True)
    loss = moco_loss(q1, q2, k1, k2, 0.2)
    loss.backward()
    assert got["loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    torch.testing.assert_close(torch.tensor(got["grad"]), torch.cat([q1.grad, q2.grad], 1), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------ the method in a run


def test_momentum_update_in_a_training_step():
    state = run_plugin(["moco"], steps=1, config=ssl_config(), plugin_modules=MODULES)
    net = state.unwrapped_model
    before = [p.detach().clone() for p in net.momentum_pairs()[0]]
    indices = next(iter(state.sampler))
    train_step(state, indices)
    m = cosine_momentum(state.step, state.epochs * state.steps_per_epoch, 0.99)
    assert 0.99 < m < 1
    target, online = net.momentum_pairs()
    for t, b, o in zip(target, before, online):
        torch.testing.assert_close(t, m * b + (1 - m) * o)
    assert not any(p.requires_grad for p in target)
    assert "moco" in state.loss_terms and torch.isfinite(state.loss_terms["moco"])


def test_labels_are_not_used_in_training():
    def losses(permute):
        with torch.random.fork_rng():
            state = prepare(ssl_config(epochs=2), plugins())
            if permute:
                y = state.train_data.y
                state.train_data.y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
            state.epoch = 1
            state.sampler.set_epoch(1)
            out = [train_step(state, idx) for idx in state.sampler]
            return out, [p.detach().clone() for p in state.unwrapped_model.parameters()]

    (l1, p1), (l2, p2) = losses(False), losses(True)
    assert l1 == l2 and len(l1) >= 3
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_fit_moco_logs_knn_metrics_and_checkpoints_the_momentum_encoder(tmp_path):
    res = fit(ssl_config(epochs=1), tmp_path / "run", plugins=plugins(), progress=False)
    lines = untimed_metrics(tmp_path / "run")
    epoch, final = lines[0], lines[-1]
    assert 0.99 < epoch["moco/momentum"] <= 1.0
    assert "train/moco" in epoch and 0.0 <= epoch["val/top1"] <= 1.0 and 0.0 <= final["test/top1"] <= 1.0
    model = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert any(k.startswith("momentum.encoder.") for k in model) and any(k.startswith("momentum.head.") for k in model)
    assert any(k.startswith("predictor.") for k in model)

    # the engine's test metrics are kNN metrics: recompute them by hand from the encoder
    state = res.state
    enc = state.unwrapped_model.encoder.eval()
    with torch.no_grad():
        bank = enc.forward_features(state.train_data.normalize(state.train_data.x))["features"]
        test = DeviceData(state.splits.test, state.splits, state.device)
        feats = enc.forward_features(test.normalize(test.x))["features"]
    pred = knn_scores(feats, bank, state.train_data.y, state.num_classes, 20, 0.07).argmax(1)
    assert final["test/top1"] == pytest.approx(float((pred == test.y).double().mean()), abs=1e-12)
    again = evaluate(state, "test", test)
    assert again["top1"] == final["test/top1"]


def test_resume_equals_straight_run(tmp_path):
    raw = ssl_config(epochs=2)
    fit(raw, tmp_path / "straight", plugins=plugins(), progress=False)
    fit(raw, tmp_path / "stopped", plugins=plugins(), progress=False, until=1)
    from batchkin.config import load_raw

    fit(load_raw(tmp_path / "stopped" / "config.toml"), tmp_path / "stopped", resume=True, plugins=plugins(),
        progress=False)
    assert untimed_metrics(tmp_path / "straight") == untimed_metrics(tmp_path / "stopped")
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "stopped" / "checkpoints" / "last.pt")
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert any(k.startswith("momentum.") for k in a["model"])
    assert a["generators"].keys() == b["generators"].keys() and "moco_views@cpu" in a["generators"]


# ------------------------------------------------------------------------------ configuration


def test_two_ssl_bases_are_refused():
    with pytest.raises(PluginError) as exc:
        prepare(ssl_config(["moco", "dino"]), plugins())
    assert "'moco'" in str(exc.value) and "'dino'" in str(exc.value)


def test_sdmp_alone_is_refused():
    with pytest.raises(PluginError, match="method 'sdmp' needs one of 'moco', 'dino'"):
        prepare(ssl_config(["sdmp"]), plugins())


@pytest.mark.parametrize("over,message", [
    ({"moco": {"temperature": 0.0}}, "moco.temperature must be > 0.0"),
    ({"moco": {"momentum": 1.5}}, "moco.momentum must be <= 1.0"),
    ({"moco": {"proj_layers": 0}}, "moco.proj_layers must be >= 1"),
    ({"moco": {"temprature": 0.2}}, "unknown config key moco.temprature (did you mean 'temperature'?)"),
    ({"data": {"batch_size": 1}}, "data.batch_size must be >= 2 for moco"),
])
def test_bad_options_name_the_key(over, message):
    with pytest.raises(ConfigError) as exc:
        prepare(ssl_config(**over), plugins())
    assert message in str(exc.value)


def test_a_last_batch_of_one_image_is_refused():
    n = len(prepare(ssl_config(), plugins()).train_data)
    with pytest.raises(ConfigError, match="data.drop_last = false leaves a last batch of 1 image"):
        prepare(ssl_config(data={"drop_last": False, "batch_size": n - 1}), plugins())
    prepare(ssl_config(data={"drop_last": False, "batch_size": n - 2}), plugins())  # a last batch of 2 is fine


def test_moco_with_ce_is_refused():
    with pytest.raises(ConfigError, match="remove 'ce'"):
        prepare(ssl_config(["moco", "ce"]), plugins())


# ------------------------------------------------------------------------------ composition with a stream-adding method


class _ExtraStream(Method):
    """A stand-in for BatchFormer: appends a second feature stream in training."""

    @hookimpl
    def transform_features(self, state, outputs):
        if state.training:
            f = outputs["streams"][0]
            outputs["streams"].append(f.flip(0) * 0.5 + f * 0.5)


@hookimpl
def _register(register):
    register("extrastream", _ExtraStream)


EXTRA = types.ModuleType("extrastream")
EXTRA.register_methods = _register


@pytest.mark.parametrize("methods", [("moco", "extrastream"), ("moco", "extrastream", "sdmp"),
                                     ("moco", "batchformer", "sdmp")])
def test_feature_streams_each_get_queries_and_the_loss_averages_them(methods):
    state = run_plugin(list(methods), steps=2, config=ssl_config(list(methods)), plugin_modules=[*MODULES, EXTRA])
    step = state.outputs["ssl"]
    assert len(step.q) == 2 and all(len(q) == 2 for q in step.q)
    expect = sum(moco_loss(step.q[0][s], step.q[1][s], step.keys[0], step.keys[1], 0.2, step.labels)
                 for s in range(2)) / 2
    torch.testing.assert_close(state.loss_terms["moco"], expect)
    if "sdmp" in methods:
        assert all(len(q) == 2 for q in step.q_mix)
        assert set(state.loss_terms) == {"moco", "sdmp_ms", "sdmp_mm"}
    if "batchformer" in methods:
        net = state.unwrapped_model
        assert not any(n.startswith("momentum.") and "batchformer" in n for n, _ in net.named_parameters())
        bf = [p for n, p in net.named_parameters() if n.startswith("batchformer.")]
        assert bf and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in bf[:2])
