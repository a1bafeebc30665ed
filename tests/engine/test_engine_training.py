"""The training loop: reproducibility, exact resume, checkpoints, evaluation, schedules, non-finite losses."""

from __future__ import annotations

import json
import math
import shutil
import tomllib

import pytest
import torch

from batchkin.cli import main
from batchkin.config import build_config
from batchkin.errors import NonFiniteError
from batchkin.plugin import Plugins
from batchkin.rundir import load_checkpoint
from batchkin.trainer import fit, lr_factor, prepare, resolved_config


def weights(run, name: str = "last.pt") -> dict:
    return torch.load(run / "checkpoints" / name, weights_only=True)["model"]


def final_weights(result) -> dict:
    """The model's state after ``fit`` returned (independent of the checkpoint files)."""
    return {k: v.detach().clone() for k, v in result.state.unwrapped_model.state_dict().items()}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def saved_config(run) -> dict:
    return tomllib.loads((run / "config.toml").read_text())


# ------------------------------------------------------------------------------ a shared run


@pytest.fixture(scope="module")
def shared(tmp_path_factory, tiny):
    run = tmp_path_factory.mktemp("shared") / "run"
    result = fit(tiny(epochs=4, optim={"lr": 0.1}), run, progress=False)
    return run, result


def test_run_folder_contents(shared, metrics_lines):
    run, result = shared
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "run.json", "metrics.jsonl", "checkpoints", "report.md", "curves.png", "per_class.png"} <= names
    assert ".lock" not in names
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"last.pt", "best.pt"}
    info = json.loads((run / "run.json").read_text())
    assert info["methods"] == ["ce"] and info["seed"] == 0 and info["device"] == "cpu" and info["world_size"] == 1
    assert info["plugins"] == {"ce": "builtin"}
    lines = metrics_lines(run)
    assert [r["kind"] for r in lines] == ["epoch"] * 4 + ["final"]
    assert [r["epoch"] for r in lines[:4]] == [1, 2, 3, 4]
    assert [r["step"] for r in lines[:4]] == [3, 6, 9, 12]  # 27 training images, batches of 8
    assert result.final == lines[-1] or json.dumps(result.final, sort_keys=True) == json.dumps(lines[-1], sort_keys=True)
    assert result.state.steps_per_epoch == 3
    cfg = saved_config(run)
    assert cfg == resolved_config(result.state)  # config.toml is the resolved config, read back exactly
    assert cfg["epochs"] == 4 and cfg["data"]["batch_size"] == 8 and cfg["model"] == {
        "name": "resnet8", "width": 4, "blocks": [], "shortcut": "projection", "weights": "", "weights_prefix": ""}
    assert "| 4 |" in (run / "report.md").read_text()


def test_checkpoints_load_with_weights_only(shared):
    run, _ = shared
    for name in ("last.pt", "best.pt"):
        ckpt = torch.load(run / "checkpoints" / name, weights_only=True)
        assert ckpt["format"] == 1
        assert ckpt["method_order"] == ["ce"]
        assert {"model", "optimizer", "scheduler", "sampler", "rng", "generators", "methods", "best"} <= ckpt.keys()
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 4
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 12


def test_best_checkpoint_is_chosen_by_validation_only(shared, metrics_lines):
    run, result = shared
    lines = metrics_lines(run)
    epochs = [r for r in lines if r["kind"] == "epoch"]
    for r in epochs:
        assert not any(k.startswith("test/") for k in r), r
        assert "val/top1" in r
    vals = [r["val/top1"] for r in epochs]
    best_epoch = vals.index(max(vals)) + 1  # the first epoch reaching the best validation top-1
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == best_epoch
    assert best["best"] == {"epoch": best_epoch, "top1": max(vals)}
    assert lines[-1]["best_val_epoch"] == best_epoch


def test_final_line_has_test_metrics(shared, metrics_lines):
    run, _ = shared
    final = metrics_lines(run)[-1]
    assert final["kind"] == "final" and final["epoch"] == 4
    for key in ("test/top1", "test/balanced_acc", "test/many_acc", "test/medium_acc", "test/few_acc"):
        assert key in final
    assert 0.0 <= final["test/top1"] <= 1.0
    assert len(final["test/per_class"]) == 3
    assert final["test/shot_split"] == "relative"  # 9 images per class: the absolute 100/20 split has no "many"
    # 12 test images, 4 per class: every class is present, so balanced accuracy is the mean per-class accuracy
    assert final["test/balanced_acc"] == pytest.approx(sum(final["test/per_class"]) / 3, abs=1e-6)
    assert final["test/top1"] == pytest.approx(final["test/balanced_acc"], abs=1e-6)


def test_eval_prints_the_final_test_metrics(shared, capsys, metrics_lines):
    run, _ = shared
    final = metrics_lines(run)[-1]
    assert main(["eval", str(run)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["split"] == "test" and out["epoch"] == 4
    assert out["top1"] == final["test/top1"]
    assert out["per_class"] == final["test/per_class"]
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["best"]
    assert main(["eval", str(run), "--best", "--split", "val"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["epoch"] == best["epoch"] and out["top1"] == best["top1"]


def test_resume_of_a_finished_run_through_the_cli(shared, tmp_path, capsys, comparable):
    run, _ = shared
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert main(["train", "--quiet", "--resume", str(copy)]) == 0, capsys.readouterr().err
    assert comparable(copy) == comparable(run)


# ------------------------------------------------------------------------------ reproducibility


def test_same_config_gives_identical_runs(tmp_path, tiny, comparable):
    raw = tiny(epochs=2)
    a = fit(raw, tmp_path / "a", progress=False)
    b = fit(raw, tmp_path / "b", progress=False)
    c = fit(tiny(epochs=2, seed=1), tmp_path / "c", progress=False)
    assert comparable(tmp_path / "a") == comparable(tmp_path / "b")
    assert_same_tensors(final_weights(a), final_weights(b))
    assert comparable(tmp_path / "a") != comparable(tmp_path / "c")
    assert differs(final_weights(a), final_weights(c))


def test_fit_leaves_the_callers_rng_and_settings_alone(tmp_path, tiny):
    torch.manual_seed(42)
    before = torch.get_rng_state()
    deterministic = torch.are_deterministic_algorithms_enabled()
    fit(tiny(epochs=1), tmp_path / "run", progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.are_deterministic_algorithms_enabled() == deterministic


RESUME_MODELS = {
    "resnet8": {"name": "resnet8", "width": 4},
    # drop_path draws from the global RNG during training: the checkpoint must carry it
    "vit": {"name": "vit", "dim": 16, "depth": 2, "heads": 2, "mlp_ratio": 1.0, "stem_channels": 4, "drop_path": 0.5},
}


@pytest.mark.parametrize("model", sorted(RESUME_MODELS))
def test_resume_is_exact(tmp_path, tiny, comparable, model):
    raw = tiny(
        epochs=4,
        model=RESUME_MODELS[model],
        data={"augment": True, "crop_padding": 1},
        schedule={"name": "cosine", "warmup_epochs": 1.5, "warmup_start": 0.2, "min_lr": 0.05},
    )
    straight, parted = tmp_path / "straight", tmp_path / "parted"
    full = fit(raw, straight, progress=False)
    half = fit(raw, parted, until=2, progress=False)
    assert half.final == {}
    assert torch.load(parted / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    assert len(comparable(parted)) == 2
    resumed = fit(saved_config(parted), parted, resume=True, progress=False)

    assert_same_tensors(final_weights(full), final_weights(resumed))
    assert_same_tensors(weights(straight), weights(parted))
    assert comparable(straight) == comparable(parted)
    assert json.dumps(full.final, sort_keys=True) == json.dumps(resumed.final, sort_keys=True)
    # the learning rates logged follow the schedule
    factor = lr_factor(full.state.config, full.state.steps_per_epoch)
    lrs = [json.loads(line)["lr"] for line in comparable(straight)[:4]]
    assert lrs == pytest.approx([0.05 * factor(e * 3) for e in range(1, 5)], rel=1e-9)


def test_resume_needs_a_checkpoint(tmp_path, tiny):
    from batchkin.errors import RunError

    with pytest.raises(RunError, match="nothing to resume"):
        fit(tiny(), tmp_path / "empty", resume=True, progress=False)


# ------------------------------------------------------------------------------ optimizers and schedules


def test_adamw_with_step_schedule_and_grad_clip(tmp_path, tiny, metrics_lines):
    run = tmp_path / "run"
    result = fit(tiny(epochs=2, optim={"name": "adamw", "lr": 0.01, "weight_decay": 0.05},
                      schedule={"name": "step", "milestones": [1, 2], "gamma": 0.5},
                      train={"grad_clip": 0.5}), run, progress=False)
    lines = metrics_lines(run)
    assert [r["lr"] for r in lines[:2]] == pytest.approx([0.005, 0.0025])
    assert all(math.isfinite(r["loss"]) for r in lines[:2])
    assert isinstance(result.state.optimizer, torch.optim.AdamW)
    opt = result.state.optimizer.state_dict()
    assert {"exp_avg", "exp_avg_sq"} <= set(next(iter(opt["state"].values())))
    assert opt["param_groups"][0]["weight_decay"] == 0.05


def _parameter_distance(a: torch.nn.Module, b: dict) -> float:
    return math.sqrt(sum(float((p.detach() - b[n]).pow(2).sum()) for n, p in a.named_parameters()))


def test_grad_clip_bounds_every_update(tmp_path, tiny):
    clip, lr = 1e-3, 0.1
    raw = tiny(epochs=1, optim={"lr": lr, "momentum": 0.0, "weight_decay": 0.0}, schedule={"name": "constant"})
    initial = prepare(raw).model
    clipped = fit({**raw, "train": {"grad_clip": clip}}, tmp_path / "clipped", progress=False)
    free = fit(raw, tmp_path / "free", progress=False)
    steps = clipped.state.step
    assert steps == 3
    moved = _parameter_distance(initial, final_weights(clipped))
    assert 0 < moved <= steps * lr * clip * (1 + 1e-4)
    assert _parameter_distance(initial, final_weights(free)) > 10 * steps * lr * clip


def test_lr_factor_by_hand():
    methods = Plugins().registry.methods
    spe = 10

    def factor(**schedule):
        return lr_factor(build_config({"epochs": 10, "schedule": schedule}, methods), spe)

    f = factor(name="cosine", warmup_epochs=2, warmup_start=0.1)  # 20 warm-up steps of 100
    assert f(0) == pytest.approx(0.1)
    assert f(10) == pytest.approx(0.55)
    assert f(19) == pytest.approx(0.1 + 0.9 * 19 / 20)
    assert f(20) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)  # the cosine's midpoint
    assert f(100) == pytest.approx(0.0, abs=1e-12)
    g = factor(name="cosine", min_lr=0.2)
    assert g(0) == pytest.approx(1.0) and g(50) == pytest.approx(0.6) and g(100) == pytest.approx(0.2)
    assert g(25) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi / 4)))
    s = factor(name="step", milestones=[3, 6], gamma=0.1)
    assert [s(t) for t in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    w = factor(name="step", milestones=[3], gamma=0.5, warmup_epochs=1, warmup_start=0.0)
    assert [w(t) for t in (0, 5, 10, 29, 30)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.5])
    c = factor(name="constant", warmup_epochs=0.5, warmup_start=0.5)
    assert [c(t) for t in (0, 1, 4, 5, 99)] == pytest.approx([0.5, 0.6, 0.9, 1.0, 1.0])


# ------------------------------------------------------------------------------ non-finite losses


NAN_PLUGIN = """
    from dataclasses import dataclass

    import torch

    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class NanFrom(Method):
        @dataclass
        class Options:
            epoch: int = 2

        @hookimpl
        def loss_terms(self, state, outputs):
            return {"bad": torch.tensor(float("nan") if state.epoch >= self.options.epoch else 0.0)}


    @hookimpl
    def register_methods(register):
        register("nan_from", NanFrom)
"""


@pytest.fixture(scope="module")
def nan_setup(tmp_path_factory, tiny):
    """The plugin, the config, and the weights after epoch 1 of a run with it (no NaN yet)."""
    import textwrap

    folder = tmp_path_factory.mktemp("nan")
    path = folder / "nan_plugin.py"
    path.write_text(textwrap.dedent(NAN_PLUGIN))
    raw = tiny(epochs=2, methods=["ce", "nan_from"])
    reference = fit(raw, folder / "reference", until=1, plugins=Plugins(extra_files=[path]), progress=False)
    return path, raw, final_weights(reference)


def test_non_finite_loss_stops_the_run(nan_setup, tmp_path):
    path, raw, after_epoch_1 = nan_setup
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError) as info:
        fit(raw, run, plugins=Plugins(extra_files=[path]), progress=False)
    message = str(info.value)
    assert message.startswith("epoch 2 step 4: non-finite loss term(s) 'bad' from method 'nan_from' (loss_terms)")
    assert "train.on_nonfinite = 'stop'" in message
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and last["step"] == 3
    assert_same_tensors(last["model"], after_epoch_1)
    assert not (run / ".lock").exists()


def test_non_finite_loss_skips_steps_when_asked(nan_setup, tmp_path, capfd, metrics_lines):
    path, raw, after_epoch_1 = nan_setup
    run = tmp_path / "run"
    result = fit({**raw, "train": {"on_nonfinite": "skip"}}, run, plugins=Plugins(extra_files=[path]), progress=False)
    assert result.final["kind"] == "final"
    assert result.state.step == 6
    err = capfd.readouterr().err
    assert err.count("batchkin: skipping epoch 2 step") == 3
    final = final_weights(result)
    # every step of epoch 2 was skipped: the parameters are those after epoch 1
    # (batch-norm statistics still move, as the forward passes ran)
    params = {n for n, _ in result.state.model.named_parameters()}
    assert_same_tensors({k: final[k] for k in params}, {k: after_epoch_1[k] for k in params})
    assert math.isnan(metrics_lines(run)[1]["train/bad"])


NAN_GRAD_PLUGIN = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class NanGrad(Method):
        @hookimpl
        def loss_terms(self, state, outputs):
            # sqrt at 0: the term is 0, its gradient is inf * 0 = nan
            return {"root": (outputs["logits"].float() * 0).sum().sqrt()}


    @hookimpl
    def register_methods(register):
        register("nan_grad", NanGrad)
"""


@pytest.mark.filterwarnings("ignore:Detected call of:UserWarning")  # a skipped first step: the scheduler steps alone
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_non_finite_gradients_of_finite_terms(plugin_file, capfd, mode):
    from batchkin.testing import tiny_config
    from batchkin.trainer import train_step

    plugins = Plugins(extra_files=[plugin_file("nan_grad", NAN_GRAD_PLUGIN)])
    state = prepare(tiny_config(["ce", "nan_grad"], train={"on_nonfinite": mode}), plugins)
    state.epoch = 1
    state.sampler.set_epoch(1)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    indices = next(iter(state.sampler))
    if mode == "stop":
        with pytest.raises(NonFiniteError) as info:
            train_step(state, indices)
        message = str(info.value)
    else:
        loss = train_step(state, indices)
        assert state.step_skipped and state.step == 1
        assert loss == float(state.loss_terms["ce"].detach()) and math.isfinite(loss)
        message = capfd.readouterr().err
        assert message.startswith("batchkin: skipping ")
    assert "epoch 1 step 1: non-finite gradients; loss terms: ce=" in message
    assert "root=0 (from nan_grad)" in message
    assert_same_tensors({n: p.detach() for n, p in state.model.named_parameters()}, before)


FREEZE_PLUGIN = """
    import torch

    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class FreezeClassifier(Method):
        calls = 0

        @hookimpl
        def before_optimizer_step(self, state):
            classifier = state.unwrapped_model.classifier
            assert classifier.weight.grad is not None  # after the backward pass
            self.seen = {n: p.grad.detach().clone() for n, p in state.unwrapped_model.named_parameters()
                         if p.grad is not None}
            classifier.weight.grad = None  # left out of this step
            type(self).calls += 1


    @hookimpl
    def register_methods(register):
        register("freeze_classifier", FreezeClassifier)
"""


def test_before_optimizer_step_sees_the_gradients_and_may_drop_them(plugin_file):
    """The hook fires once per step after backward and before the engine's clip and the
    optimizer: a dropped gradient leaves its parameter untouched (no decay, no momentum),
    and train.grad_clip then clips what is left."""
    from batchkin.testing import tiny_config
    from batchkin.trainer import train_step

    plugins = Plugins(extra_files=[plugin_file("freeze_classifier", FREEZE_PLUGIN)])
    raw = tiny_config(["ce", "freeze_classifier"], train={"grad_clip": 1e-3}, optim={"weight_decay": 0.1})
    state = prepare(raw, plugins)
    state.epoch = 1
    state.sampler.set_epoch(1)
    net = state.unwrapped_model
    method = state.hooks.methods["freeze_classifier"]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    for i, indices in enumerate(list(state.sampler)[:2], 1):
        train_step(state, indices)
        assert type(method).calls == i
    assert torch.equal(net.classifier.weight, before["classifier.weight"])
    assert net.classifier.weight not in state.optimizer.state
    assert not torch.equal(net.classifier.bias, before["classifier.bias"])
    # the gradients the hook saw are the unclipped ones; the engine clipped the rest afterwards
    seen = torch.linalg.vector_norm(torch.stack([g.norm() for n, g in method.seen.items() if n != "classifier.weight"]))
    left = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in net.parameters() if p.grad is not None]))
    assert float(seen) > 1e-2 and float(left) <= 1e-3 * (1 + 1e-4)


# ------------------------------------------------------------------------------ device synchronisation

# the ways a tensor's value reaches the host (each one waits for the device on CUDA)
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")

EXTRA_TERMS_PLUGIN = """
    from batchkin.hookspecs import hookimpl
    from batchkin.plugin import Method


    class ExtraTerms(Method):
        @hookimpl
        def loss_terms(self, state, outputs):
            logits = outputs["logits"].float()
            return {"l2": 1e-3 * logits.pow(2).mean(), "l1": 1e-3 * logits.abs().mean()}


    @hookimpl
    def register_methods(register):
        register("extra_terms", ExtraTerms)
"""


@pytest.mark.parametrize(("methods", "grad_clip"), [(["ce"], 0.0), (["ce"], 0.5), (["ce", "extra_terms"], 0.0)])
def test_train_step_reads_the_device_twice(monkeypatch, plugin_file, methods, grad_clip):
    """A finite step reads one small tensor before backward (the loss and every term's
    finiteness, which decides whether backward runs) and one after it (the gradient
    norm's finiteness, which decides whether the optimizer steps): two waits for the
    device per step, whatever the number of loss terms."""
    from batchkin.testing import run_plugin, tiny_config
    from batchkin.trainer import train_step

    # a first step outside the count (lazy initialisation)
    state = run_plugin(methods, steps=1, config=tiny_config(methods, train={"grad_clip": grad_clip}),
                       plugin_files=[plugin_file("extra_terms", EXTRA_TERMS_PLUGIN)])
    batches = iter(state.sampler)
    with torch.random.fork_rng(devices=[]):
        reads = []

        def counting(name):
            original = getattr(torch.Tensor, name)

            def read(self, *args, **kwargs):
                reads.append(name)
                return original(self, *args, **kwargs)

            return read

        with monkeypatch.context() as patch:
            for name in HOST_READS:
                patch.setattr(torch.Tensor, name, counting(name))
            losses, counts = [], []
            for _ in range(2):
                before = len(reads)
                losses.append(train_step(state, next(batches)))
                counts.append(len(reads) - before)
    assert len(state.loss_terms) == (3 if "extra_terms" in methods else 1)
    assert counts == [2, 2], reads
    assert not state.step_skipped and state.step == 3
    for loss in losses:
        assert type(loss) is float and math.isfinite(loss)
    # the value returned is the float32 sum of the terms, as logged
    assert losses[-1] == float(sum(t.detach().float() for t in state.loss_terms.values()))
