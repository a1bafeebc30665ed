"""Every method under DDP: 2 torchrun processes, gloo, CPU, tiny shapes.

Each 2-rank run loads a small test plugin (``RECORDER`` below) that saves what every
rank saw and computed at every step (batch indices, loss terms, the gradients after
DDP's all-reduce, the SSL keys, DINO's centre, SDMP's mixing, the torch.distributed
collectives the plugins called) and every rank's weights at the end of every epoch. The
tests compare those records with what a single process computes on the whole global
batch (in this process, through the same engine code), which pins down exactly what each
method shards, gathers and keeps local:

* bbn: both index streams are cut from one global draw per (seed, epoch);
* drloc: pairs are drawn per rank (the rank is folded into the key): the 2-rank
  gradient is the mean of the per-rank single-process gradients;
* moco: keys are all-gathered, so the loss and the gradients equal one process on the
  global batch (BatchNorm removed: see ``test_moco_...``);
* dino: the teacher outputs stay on their rank; the centre all-reduces their [K] sum (the
  only collective a DINO step issues besides DDP's), so it equals one process's;
* sdmp: ``flip = "global"`` pairs global row g with W*B-1-g, ``"local"`` pairs within
  each rank;
* resume: every rank restores the same checkpoint (2 epochs == 1 epoch + resume).
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import pytest
import torch

from batchkin.plugin import Plugins
from batchkin.testing import run_plugin
from batchkin.trainer import prepare, train_step

pytestmark = pytest.mark.dist

RECORDER = '''
"""Test plugin: a recorder method, a BatchNorm remover and a BatchNorm-free token-grid model."""
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from batchkin.hookspecs import hookimpl
from batchkin.models import Classifier
from batchkin.plugin import Method


#: The Python-level collectives of torch.distributed the recorder logs (DDP's own gradient
#: all-reduce and buffer broadcast run in C++ and are not seen).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter",
               "reduce")
#: the argument that holds the tensor a rank sends: all_gather(parts, tensor) etc.
SENT_ARG = {"all_gather": 1, "all_gather_into_tensor": 1, "reduce_scatter": 1, "reduce_scatter_tensor": 1,
            "all_to_all": 1, "all_to_all_single": 1}


class Record(Method):
    """Saves, per rank, one file per step and the weights at the end of every epoch."""

    @dataclass
    class Options:
        # where records go, not what the run computes: --resume may point it elsewhere
        dir: str = field(default="", metadata={"resume": True, "help": "folder of the records"})

    def __init__(self, options=None):
        super().__init__(options)
        self.view_state = None
        self.calls = []

    def _base(self, state):
        return next((n for n in ("moco", "dino") if n in state.hooks.methods), None)

    @hookimpl
    def on_fit_start(self, state):
        """Wrap torch.distributed's collectives: every call appends (name, dtype, shape of the
        tensor this rank sends) to the current step's log."""
        import torch.distributed as dist

        def wrap(name, fn):
            def logged(*args, **kwargs):
                sent = args[SENT_ARG.get(name, 0)] if args else None
                if isinstance(sent, (list, tuple)):
                    sent = sent[0] if sent else None
                if isinstance(sent, torch.Tensor):
                    self.calls.append((name, str(sent.dtype), list(sent.shape), sent.numel() * sent.element_size()))
                else:
                    self.calls.append((name, type(sent).__name__, [], 0))
                return fn(*args, **kwargs)
            return logged

        if state.world_size > 1:
            for name in COLLECTIVES:
                if hasattr(dist, name):
                    setattr(dist, name, wrap(name, getattr(dist, name)))

    @hookimpl
    def transform_batch(self, state):
        self.calls = []  # the step's collectives from here (an evaluation's all-reduces come before)
        base = self._base(state)
        if base is not None:  # the view generator before the forward pass draws from it
            self.view_state = state.generator(base + "_views").get_state()

    @hookimpl
    def after_step(self, state):
        net = state.unwrapped_model
        rec = {
            "rank": state.rank, "world": state.world_size, "epoch": state.epoch, "step": state.step,
            "idx": {k: v.tolist() for k, v in state.batch.items() if k.startswith("idx")},
            "terms": {k: float(v.detach()) for k, v in state.loss_terms.items()},
            "grads": {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None},
            "collectives": list(self.calls),  # this step's so far: the methods listed before "record" ran
        }
        ssl = state.outputs.get("ssl") if isinstance(state.outputs, dict) else None
        if ssl is not None:
            rec["keys"], rec["labels"] = ssl.keys.clone(), ssl.labels.clone()
            if hasattr(net, "dino_center"):
                rec["center"] = net.dino_center.clone()  # after this step's update
            base = self._base(state)
            opts = state.hooks.methods[base].options.views
            gen = torch.Generator()
            gen.set_state(self.view_state)
            from batchkin.plugins.ssl import make_views

            raw = state.train_data.x[state.batch["idx"]]
            hflip = state.splits.hflip if opts.hflip is None else opts.hflip
            rec["views"] = make_views(raw, gen, opts, hflip=hflip, shard=(state.rank, state.world_size))
            if ssl.mix is not None:
                m = ssl.mix
                rec["mix"] = {"mixed": m.mixed.clone(), "lam": m.lam.clone(), "partner": m.partner.clone(),
                              "lam_partner": m.lam_partner.clone(), "op": m.op}
        torch.save(rec, os.path.join(self.options.dir, f"step_r{state.rank}_{state.step:04d}.pt"))

    @hookimpl
    def on_epoch_end(self, state):
        net = state.unwrapped_model
        torch.save({"params": {n: p.detach().clone() for n, p in net.named_parameters()},
                    "buffers": {n: b.clone() for n, b in net.named_buffers()}},
                   os.path.join(self.options.dir, f"weights_r{state.rank}_e{state.epoch}.pt"))


class NoBN(Method):
    """Replaces every BatchNorm of the model (listed after the method that builds it) by Identity."""

    @hookimpl
    def wrap_model(self, state):
        def strip(module):
            for name, child in module.named_children():
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    setattr(module, name, nn.Identity())
                else:
                    strip(child)

        strip(state.model)


@dataclass
class GridOptions:
    width: int = field(default=8, metadata={"ge": 1, "help": "token width"})


class GridNet(Classifier):
    """A BatchNorm-free model with a token grid: 3x3 conv, ReLU, 1x1 conv; features = mean token."""

    def __init__(self, o, num_classes, in_channels):
        super().__init__()
        self.embed = nn.Conv2d(in_channels, o.width, 3, 1, 1)
        self.mix = nn.Conv2d(o.width, o.width, 1)
        self.feature_dim, self.num_classes = o.width, num_classes
        self.classifier = nn.Linear(o.width, num_classes)

    def forward_features(self, x):
        grid = self.mix(F.relu(self.embed(x)))
        return {"features": grid.mean(dim=(2, 3)), "grid": grid, "grids": [grid]}


@hookimpl
def register_methods(register):
    register("record", Record)
    register("nobn", NoBN)


@hookimpl
def register_models(register):
    register("gridnet", lambda o, *, num_classes, in_channels, image_size: GridNet(o, num_classes, in_channels),
             options=GridOptions)
'''


# ------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def recorder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plugin") / "ddp_record.py"
    path.write_text(textwrap.dedent(RECORDER))
    return path


def sets(*pairs: str) -> list[str]:
    """``["--set", p1, "--set", p2, ...]``."""
    return [a for p in pairs for a in ("--set", p)]


def record_to(folder: Path, recorder: Path) -> list[str]:
    """The arguments that load the recorder and point it at ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    return [*sets(f'record.dir="{folder}"'), "--plugin", str(recorder)]


def records(folder: Path) -> dict[int, list[dict]]:
    """Per rank, the step records in step order."""
    out: dict[int, list[dict]] = {}
    for f in sorted(folder.glob("step_r*_*.pt")):
        rec = torch.load(f, weights_only=False)
        out.setdefault(rec["rank"], []).append(rec)
    return out


def weights(folder: Path, rank: int, epoch: int) -> dict:
    return torch.load(folder / f"weights_r{rank}_e{epoch}.pt", weights_only=False)


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def single_process(config, recorder: Path, args: list[str], folder: Path, steps: int) -> list[dict]:
    """The step records of ``steps`` steps of the same run in this process (world size 1)."""
    raw = config(*args, *sets(f'record.dir="{folder}"'))
    folder.mkdir(parents=True, exist_ok=True)
    run_plugin(raw["methods"], steps=steps, config=raw, plugin_files=[recorder])
    return records(folder)[0]


def step_state(config, recorder: Path, args: list[str], methods: list[str]):
    """A prepared world-size-1 state of the run at the start of epoch 1, as ``fit`` leaves it."""
    raw = config(*args)
    raw["methods"] = methods
    state = prepare(raw, Plugins(extra_files=[recorder]))
    state.hooks.on_fit_start(state=state)
    state.epoch = 1
    state.sampler.set_epoch(1)
    state.hooks.on_epoch_start(state=state)
    state.model.train()
    return state


def grads_of(state) -> dict:
    return {n: p.grad.detach().clone() for n, p in state.unwrapped_model.named_parameters() if p.grad is not None}


def assert_dicts_close(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=k, **tol)


# ------------------------------------------------------------------------------ bbn and resume

B_BBN = 6
BBN_ARGS = sets('methods=["bbn","record"]', "model.name=resnet8", "model.width=4", "data.imbalance_factor=4",
                f"data.batch_size={B_BBN}")


@pytest.fixture(scope="module")
def bbn_runs(tmp_path_factory, torchrun, single, recorder):
    """A straight 2-epoch 2-rank bbn run, and the same run stopped after epoch 1 (launched
    through ``batchkin train --nproc 2``) then resumed for epoch 2 (through torchrun)."""
    base = tmp_path_factory.mktemp("bbn")
    runs = {name: base / name for name in ("straight", "split")}
    recs = {name: base / f"rec_{name}" for name in ("straight", "split", "resumed")}
    ok(torchrun(2, runs["straight"], *BBN_ARGS, *record_to(recs["straight"], recorder)))
    ok(single(runs["split"], "--nproc", "2", *BBN_ARGS, *record_to(recs["split"], recorder), "--until", "1"))
    ok(torchrun(2, runs["split"], "--resume", str(runs["split"]), *BBN_ARGS,
                *record_to(recs["resumed"], recorder)))
    return runs, recs


def test_bbn_two_ranks_shard_one_common_draw_per_epoch(bbn_runs, config, recorder):
    """Both streams: at every step the two ranks' index lists, rank 0 then rank 1, are exactly
    the single-process (batch 2b) step of the same epoch, over 2 epochs and after a resume."""
    _, recs = bbn_runs
    one = prepare(config(*BBN_ARGS, *sets(f"data.batch_size={2 * B_BBN}"), 'methods=["bbn"]'),
                  Plugins(extra_files=[recorder])).sampler
    reference = {}
    for epoch in (1, 2):
        one.set_epoch(epoch)
        reference[epoch] = [{k: v.tolist() for k, v in item.items()} for item in one]
    assert len(reference[1]) >= 3
    straight = records(recs["straight"])
    resumed = records(recs["resumed"])
    split = records(recs["split"])
    for r in (0, 1):
        assert [x["epoch"] for x in straight[r]] == [1] * len(reference[1]) + [2] * len(reference[2])
        # stopped after epoch 1, resumed at epoch 2: the same draws as straight through
        assert [x["idx"] for x in split[r]] == [x["idx"] for x in straight[r] if x["epoch"] == 1]
        assert [x["idx"] for x in resumed[r]] == [x["idx"] for x in straight[r] if x["epoch"] == 2]
    for rank_steps in (straight, resumed):
        for i in range(len(rank_steps[0])):
            epoch = rank_steps[0][i]["epoch"]
            s = i if rank_steps is resumed or epoch == 1 else i - len(reference[1])
            for stream, key in (("", "idx"), ("rev", "idx_rev")):
                parts = [rank_steps[r][i]["idx"][key] for r in (0, 1)]
                assert [len(p) for p in parts] == [B_BBN, B_BBN]
                # shards are disjoint slices of one global draw and their union is that draw
                assert parts[0] + parts[1] == reference[epoch][s][stream]
            u0, u1 = (set(rank_steps[r][i]["idx"]["idx"]) for r in (0, 1))
            assert not u0 & u1  # the uniform stream is a permutation: disjoint as sets too
    # the uniform stream of each epoch covers every sample at most once across both ranks
    for epoch in (1, 2):
        seen = [j for r in (0, 1) for x in straight[r] if x["epoch"] == epoch for j in x["idx"]["idx"]]
        assert len(seen) == len(set(seen))


def test_bbn_two_ranks_train_and_write_one_set_of_rank0_outputs(bbn_runs, metrics):
    runs, _ = bbn_runs
    run = runs["straight"]
    m = metrics(run)
    assert [r["kind"] for r in m] == ["epoch", "epoch", "final"]
    assert all(math.isfinite(r["loss"]) for r in m[:2])
    assert [r["bbn/alpha"] for r in m[:2]] == [1.0, 0.75]  # parabolic decay, E = 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
    assert (run / "config.toml").is_file() and (run / "run.json").is_file() and (run / "report.md").is_file()
    assert not (run / ".lock").exists()


def test_every_rank_resumes_from_the_same_checkpoint(bbn_runs, metrics):
    """2 ranks x 2 epochs == 2 ranks x (1 epoch, stop, --resume, 1 epoch): on both ranks the
    weights after epoch 2 are equal, and equal across the ranks (rank 1 restored the
    optimizer's momentum too, or its SGD steps would drift from rank 0's)."""
    runs, recs = bbn_runs
    for r in (0, 1):
        straight = weights(recs["straight"], r, 2)["params"]
        assert_dicts_close(weights(recs["resumed"], r, 2)["params"], straight, rtol=0, atol=0)
        assert_dicts_close(straight, weights(recs["straight"], 0, 2)["params"], rtol=0, atol=0)
    a, b = metrics(runs["straight"]), metrics(runs["split"])
    assert [r["kind"] for r in b] == ["epoch", "epoch", "final"]
    assert b[1]["loss"] == a[1]["loss"]
    assert b[2]["test/top1"] == a[2]["test/top1"]


# ------------------------------------------------------------------------------ drloc

B_DRLOC = 8
DRLOC_ARGS = sets('methods=["ce","drloc","record"]', "model.name=gridnet", "model.width=8", "epochs=1",
                  "data.augment=false", f"data.batch_size={B_DRLOC}", "drloc.m=8", "drloc.hidden=16",
                  'drloc.schedule="constant"', "drloc.lambda0=0.5")


def test_drloc_two_ranks_draw_pairs_per_rank(tmp_path, torchrun, metrics, config, recorder):
    """DRLoc draws its pairs locally: rank r's key folds in r. So the 2-rank gradient (DDP's
    mean) equals the mean of the two single-process gradients, each on that rank's shard
    with that rank's key; with rank 0's key on rank 1's shard it does not."""
    run, rec = tmp_path / "run", tmp_path / "rec"
    ok(torchrun(2, run, *DRLOC_ARGS, *record_to(rec, recorder)))
    m = metrics(run)
    assert [r["kind"] for r in m] == ["epoch", "final"]
    assert math.isfinite(m[0]["loss"]) and math.isfinite(m[0]["drloc/loss"]) and m[0]["drloc/loss"] > 0
    steps = records(rec)
    assert len(steps[0]) == len(steps[1]) >= 2
    for r in (0, 1):
        assert all(math.isfinite(v) for x in steps[r] for v in x["terms"].values())
    first = [steps[r][0] for r in (0, 1)]
    assert_dicts_close(first[0]["grads"], first[1]["grads"], rtol=0, atol=0)  # all-reduced

    def shard_grads(shard_rank, key_rank):
        state = step_state(config, recorder, DRLOC_ARGS, ["ce", "drloc"])
        state.rank = key_rank  # the rank folded into the pair key (augmentation is off)
        train_step(state, {"": torch.tensor(first[shard_rank]["idx"]["idx"])})
        return grads_of(state)

    g0, g1 = shard_grads(0, 0), shard_grads(1, 1)
    mean = {k: (g0[k] + g1[k]) / 2 for k in g0}
    assert any(k.startswith("drloc.") for k in mean)
    assert_dicts_close(first[0]["grads"], mean, rtol=1e-5, atol=1e-7)
    wrong = shard_grads(1, 0)
    head = [k for k in mean if k.startswith("drloc.")]
    assert any(not torch.allclose(first[0]["grads"][k], (g0[k] + wrong[k]) / 2, rtol=1e-4, atol=1e-6)
               for k in head)


# ------------------------------------------------------------------------------ moco (+ sdmp global flip)

B_SSL = 8
SSL_COMMON = sets("epochs=1", f"data.batch_size={B_SSL}", "model.width=8")
MOCO_ARGS = SSL_COMMON + sets('methods=["moco","sdmp","nobn","record"]', "moco.proj_hidden=32", "moco.proj_dim=16",
                              "moco.pred_hidden=32", 'sdmp.flip="global"')


def two_ranks_and_one_process(base, torchrun, config, recorder, args, steps=None):
    """The records of a 2-rank run of ``args`` and of one process on the 2x batch (``steps``
    steps, by default as many as the 2-rank run made)."""
    ok(torchrun(2, base / "run", *args, *record_to(base / "rec", recorder)))
    two = records(base / "rec")
    one = single_process(config, recorder, args + sets(f"data.batch_size={2 * B_SSL}"), base / "rec1",
                         steps=steps or len(two[0]))
    return two, one


@pytest.fixture(scope="module")
def moco_runs(tmp_path_factory, torchrun, config, recorder):
    return two_ranks_and_one_process(tmp_path_factory.mktemp("moco"), torchrun, config, recorder, MOCO_ARGS)


def test_moco_two_ranks_loss_and_gradients_equal_one_process_on_the_global_batch(moco_runs):
    """Keys all-gathered, labels offset by rank * B: the mean of the ranks' losses and DDP's
    gradient equal one process's on the 2B batch, at every step of the epoch.

    The projector and predictor are MLPs with BatchNorm, which normalises each rank's batch on
    its own (the engine does not convert to SyncBatchNorm, which PyTorch supports on GPUs
    only), so the run removes BatchNorm (``nobn``) to make the comparison exact."""
    two, one = moco_runs
    assert len(one) == len(two[0]) == len(two[1]) >= 2
    for i, ref in enumerate(one):
        ranks = [two[r][i] for r in (0, 1)]
        assert ranks[0]["idx"]["idx"] + ranks[1]["idx"]["idx"] == ref["idx"]["idx"]
        for r, rec in enumerate(ranks):
            # the gathered keys hold the global batch in rank order: one process's keys
            torch.testing.assert_close(rec["keys"], ref["keys"], rtol=1e-4, atol=1e-5)
            assert rec["labels"].tolist() == list(range(r * B_SSL, (r + 1) * B_SSL))
        for term in ("moco", "sdmp_ms", "sdmp_mm"):
            assert (ranks[0]["terms"][term] + ranks[1]["terms"][term]) / 2 == pytest.approx(ref["terms"][term],
                                                                                           rel=1e-4), (i, term)
        assert_dicts_close(ranks[0]["grads"], ref["grads"], rtol=1e-3, atol=1e-5)


def test_sdmp_global_flip_pairs_row_g_with_the_global_partner(moco_runs):
    """``flip = "global"``: global row g = r*B + i mixes with row 2B-1-g, which lives on the
    other rank; the mixed bytes and lam_eff of rank r are rows rB..rB+B-1 of one process's."""
    two, one = moco_runs
    for i, ref in enumerate(one):
        for r in (0, 1):
            mix, full = two[r][i]["mix"], ref["mix"]
            g = torch.arange(r * B_SSL, (r + 1) * B_SSL)
            assert mix["partner"].tolist() == (2 * B_SSL - 1 - g).tolist()
            assert torch.equal(mix["mixed"], full["mixed"][:, g])
            assert torch.equal(mix["lam"], full["lam"][:, g])
            assert torch.equal(mix["lam_partner"], full["lam"][:, 2 * B_SSL - 1 - g])
            assert mix["op"] == full["op"]
            assert torch.equal(two[r][i]["views"], ref["views"][:, g])  # views: a slice of the global draw


# ------------------------------------------------------------------------------ dino (+ sdmp local and global flip)

K_DINO = 32
DINO_ARGS = SSL_COMMON + sets('methods=["dino","sdmp","record"]', f"dino.out_dim={K_DINO}", "dino.hidden_dim=32",
                              "dino.bottleneck_dim=16", 'sdmp.flip="local"', 'sdmp.ops=["mixup"]')
DINO_GLOBAL_ARGS = DINO_ARGS + sets('sdmp.flip="global"')


@pytest.fixture(scope="module")
def dino_runs(tmp_path_factory, torchrun, config, recorder):
    return two_ranks_and_one_process(tmp_path_factory.mktemp("dino"), torchrun, config, recorder, DINO_ARGS, steps=1)


@pytest.fixture(scope="module")
def dino_global_runs(tmp_path_factory, torchrun, config, recorder):
    return two_ranks_and_one_process(tmp_path_factory.mktemp("dino_global"), torchrun, config, recorder,
                                     DINO_GLOBAL_ARGS)


def global_centre(center_before: torch.Tensor, per_rank_keys: list[torch.Tensor], m: float = 0.9) -> torch.Tensor:
    """The centre update over the concatenated rows of every rank, in float64."""
    rows = torch.cat([k.double().reshape(-1, k.shape[-1]) for k in per_rank_keys])
    return (m * center_before.double() + (1 - m) * rows.mean(0, keepdim=True)).float()


def test_dino_centre_after_a_step_equals_one_process_on_the_global_batch(dino_runs):
    """Each rank keeps its own teacher outputs ([V, B, K], not gathered) and the centre update
    all-reduces their [K] sum, so after the first step both ranks hold one process's centre
    (2B rows, both views); a centre from rank-local rows would differ. The DINO term (mean
    over ranks) equals one process's too. (Later steps differ: the local SDMP flip pairs
    other samples than one process's 2B flip.)"""
    two, one = dino_runs
    ref = one[0]
    assert torch.count_nonzero(ref["center"]) > 0
    for r in (0, 1):
        rec = two[r][0]
        g = torch.arange(r * B_SSL, (r + 1) * B_SSL)
        assert rec["keys"].shape == (2, B_SSL, K_DINO)  # this rank's rows only
        assert rec["labels"].tolist() == list(range(B_SSL))
        torch.testing.assert_close(rec["keys"], ref["keys"][:, g], rtol=1e-5, atol=1e-6)
        # the reduction itself: the 2-rank centre is the mean over both ranks' own rows ...
        exact = global_centre(torch.zeros(1, K_DINO), [two[0][0]["keys"], two[1][0]["keys"]])
        torch.testing.assert_close(rec["center"], exact, rtol=1e-6, atol=1e-8)
        # ... which is one process's centre up to the forward pass's rounding on B vs 2B rows
        torch.testing.assert_close(rec["center"], ref["center"], rtol=1e-5, atol=1e-8)
        local = 0.1 * rec["keys"].reshape(-1, K_DINO).mean(0, keepdim=True)
        assert not torch.allclose(rec["center"], local, rtol=1e-3, atol=1e-6)
    assert (two[0][0]["terms"]["dino"] + two[1][0]["terms"]["dino"]) / 2 == pytest.approx(ref["terms"]["dino"],
                                                                                       rel=1e-6)
    for i, (a, b) in enumerate(zip(two[0], two[1])):  # every step: the same centre on both ranks, the mean of both
        torch.testing.assert_close(a["center"], b["center"], rtol=0, atol=0)
        before = two[0][i - 1]["center"] if i else torch.zeros(1, K_DINO)
        torch.testing.assert_close(a["center"], global_centre(before, [a["keys"], b["keys"]]), rtol=1e-6, atol=1e-8)


def test_dino_step_all_reduces_k_floats_for_the_centre_and_gathers_nothing(dino_runs):
    """The only Python-level collective of a DINO step (with SDMP's local flip, which needs no
    partner rows from other ranks) is the centre's all-reduce of one float32 [1, K] sum:
    4 K bytes, where the all-gather of the teacher outputs sent 4 V B K (V B = 16 times more
    here). DDP's gradient all-reduce and buffer broadcast are C++ and not in the log."""
    two, _ = dino_runs
    for r in (0, 1):
        assert len(two[r]) >= 2
        for rec in two[r]:
            assert rec["collectives"] == [("all_reduce", "torch.float32", [1, K_DINO], 4 * K_DINO)], rec["step"]


def test_the_collective_log_sees_moco_key_gather(moco_runs):
    """The control of the log above: MoCo's all-gather of its keys [V, B, d] (V = 4 with SDMP)
    and SDMP's global flip's gather of the uint8 views are seen."""
    two, _ = moco_runs
    for rec in two[0]:
        names = [c[:3] for c in rec["collectives"]]
        assert ("all_gather", "torch.float32", [4, B_SSL, 16]) in names
        assert ("all_gather", "torch.uint8", [2, B_SSL, 1, 8, 8]) in names


def test_dino_with_sdmp_global_flip_keeps_the_gather_and_equals_one_process(dino_global_runs):
    """SDMP's global flip pairs row g with 2B-1-g on the other rank, so the teacher outputs are
    still gathered ([V, 2B, K]: SDMP's targets read partner rows); the DINO loss reads the
    rank's own rows and the centre all-reduces their sum all the same. Without BatchNorm
    (the tiny model, DINO's head) every step equals one process on the 2B batch."""
    two, one = dino_global_runs
    K = K_DINO
    assert len(one) == len(two[0]) == len(two[1]) >= 2
    for i, ref in enumerate(one):
        ranks = [two[r][i] for r in (0, 1)]
        for r, rec in enumerate(ranks):
            assert rec["keys"].shape == (2, 2 * B_SSL, K)
            assert rec["labels"].tolist() == list(range(r * B_SSL, (r + 1) * B_SSL))
            assert rec["mix"]["partner"].tolist() == list(range(2 * B_SSL - 1 - r * B_SSL, B_SSL - 1 - r * B_SSL, -1))
            torch.testing.assert_close(rec["keys"], ref["keys"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(rec["center"], ref["center"], rtol=1e-4, atol=1e-6)
            names = [c[0] for c in rec["collectives"]]
            assert names.count("all_gather") == 2  # the uint8 views (SDMP) and the momentum outputs (the base)
            assert rec["collectives"][-1] == ("all_reduce", "torch.float32", [1, K], 4 * K)  # the centre
        before = two[0][i - 1]["center"] if i else torch.zeros(1, K)
        own = [rec["keys"][:, rec["labels"]] for rec in ranks]
        torch.testing.assert_close(ranks[0]["center"], global_centre(before, own), rtol=1e-6, atol=1e-8)
        for term in ("dino", "sdmp_ms", "sdmp_mm"):
            assert (ranks[0]["terms"][term] + ranks[1]["terms"][term]) / 2 == pytest.approx(ref["terms"][term],
                                                                                           rel=1e-4), (i, term)


def test_sdmp_local_flip_pairs_within_each_rank(dino_runs):
    """``flip = "local"``: sample i of rank r mixes with sample B-1-i of the same rank; DINO keeps
    its teacher outputs local, so the partner is row B-1-i of the rank's own keys (SDMP's
    global row rB + B-1-i, re-based by the base); with mixup the mixed bytes are
    round(lam x_i + (1 - lam) x_(B-1-i)) of the rank's own clean views."""
    two, _ = dino_runs
    ar = torch.arange(B_SSL)
    for r in (0, 1):
        for rec in two[r]:
            mix, views = rec["mix"], rec["views"].float()
            assert rec["keys"].shape[1] == B_SSL
            assert mix["partner"].tolist() == (B_SSL - 1 - ar).tolist()
            assert torch.equal(mix["lam_partner"], mix["lam"][:, B_SSL - 1 - ar])
            lam = mix["lam"].float().view(2, B_SSL, 1, 1, 1)
            expected = lam * views + (1 - lam) * views[:, B_SSL - 1 - ar]
            assert (mix["mixed"].float() - expected).abs().max() <= 1.0
            assert (mix["mixed"].float() - views).abs().max() > 1.0  # the pixels did change
