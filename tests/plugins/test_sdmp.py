"""The ``sdmp`` plugin: mixing through the batch_mix op, the soft-positive losses, composition."""

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
from scipy import stats

from batchkin.errors import ConfigError
from batchkin.kernels.batch_mix import CUTMIX, MIXUP, RESIZEMIX, batch_mix_reference, sample_mix_params
from batchkin.plugin import Plugins
from batchkin.plugins import dino, moco, sdmp
from batchkin.plugins.moco import moco_infonce, moco_loss
from batchkin.plugins.sdmp import (
    SDMP,
    mixture_nll,
    sdmp_dino_loss,
    sdmp_lam_eff,
    sdmp_mix,
    sdmp_mm_loss,
    sdmp_mm_weights,
    sdmp_moco_loss,
    sdmp_ms_loss,
    soft_cross_entropy,
)
from batchkin.state import State
from batchkin.testing import run_plugin, tiny_config
from batchkin.trainer import fit, prepare

MODULES = [moco, dino, sdmp]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def random_views(V=2, B=8, C=2, H=8, W=8, seed=0):
    return torch.randint(0, 256, (V, B, C, H, W), dtype=torch.uint8, generator=gen(seed))


def split_views(V=2, B=8, C=2, H=8, W=9, seed=0):
    """Views whose first half lies in [0, 100] and second half in [150, 255]: every pixel of a
    sample differs from every pixel of its partner (B - 1 - i), also after bilinear resizing."""
    g = gen(seed)
    low = torch.randint(0, 101, (V, B // 2, C, H, W), generator=g)
    high = torch.randint(150, 256, (V, B - B // 2, C, H, W), generator=g)
    return torch.cat([low, high], 1).to(torch.uint8)


def fake_state(rank=0, world=1, seed=0):
    return State(config=types.SimpleNamespace(seed=seed), device=torch.device("cpu"), rank=rank, world_size=world)


def sdmp_method(**options):
    return SDMP(SDMP.Options(**options))


# ------------------------------------------------------------------------------ mixing


@pytest.mark.parametrize("op", ["mixup", "cutmix", "resizemix"])
def test_mixing_really_changes_pixels(op):
    views = random_views()
    mixed, lam_eff, params = sdmp_mix(views, gen(1), ops=(op,))
    assert mixed.shape == views.shape and mixed.dtype == torch.uint8
    assert bool((params.op == {"mixup": MIXUP, "cutmix": CUTMIX, "resizemix": RESIZEMIX}[op]).all())
    changed = (mixed != views).flatten(2).any(-1)
    assert bool(changed.all()), "every sample of every view must be mixed"
    assert bool((lam_eff < 1).all())


@pytest.mark.parametrize("op", ["cutmix", "resizemix"])
@pytest.mark.parametrize("shape", [(8, 9), (7, 7), (16, 5)])
def test_lam_eff_equals_the_unchanged_pixel_fraction_exactly(op, shape):
    H, W = shape
    for seed in range(4):
        views = split_views(H=H, W=W, seed=seed)
        mixed, lam_eff, _ = sdmp_mix(views, gen(seed), ops=(op,))
        unchanged = (mixed == views).all(dim=2).flatten(2).sum(-1)  # [V, B] pixels with every channel untouched
        frac = (unchanged.double() / (H * W)).float()
        assert torch.equal(frac, lam_eff), (seed, frac, lam_eff)


def test_resizemix_pastes_a_bilinear_resize_of_the_partner():
    g = gen(2)
    views = torch.rand(2, 6, 3, 10, 8, generator=g)
    mixed, _, params = sdmp_mix(views, gen(3), ops=("resizemix",))
    for v in range(2):
        for i in range(6):
            y0, x0, h, w = params.boxes[v, i].tolist()
            partner = views[v, 5 - i]
            box = mixed[v, i, :, y0 : y0 + h, x0 : x0 + w]
            ref = F.interpolate(partner[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(box, ref, atol=1e-6, rtol=0)
            outside = torch.ones(10, 8, dtype=torch.bool)
            outside[y0 : y0 + h, x0 : x0 + w] = False
            assert torch.equal(mixed[v, i][:, outside], views[v, i][:, outside])
    # uint8 views: the same, rounded half up
    u8 = (views * 255).round().to(torch.uint8)
    mixed8, _, params = sdmp_mix(u8, gen(3), ops=("resizemix",))
    y0, x0, h, w = params.boxes[0, 0].tolist()
    ref = F.interpolate(u8[0, 5][None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
    diff = (mixed8[0, 0, :, y0 : y0 + h, x0 : x0 + w].float() - torch.floor(ref + 0.5)).abs()
    assert float(diff.max()) <= 1.0 and float((diff == 0).float().mean()) > 0.95


def test_mixup_partner_is_the_flipped_batch_and_the_middle_sample_pairs_with_itself():
    views = torch.rand(2, 5, 1, 4, 4, generator=gen(0))
    mixed, lam_eff, params = sdmp_mix(views, gen(1), ops=("mixup",))
    lam = params.lam.view(1, 5, 1, 1, 1)
    expect = lam * views + (1 - lam) * views.flip(1)
    torch.testing.assert_close(mixed, expect)
    torch.testing.assert_close(mixed[:, 2], views[:, 2])
    assert torch.equal(lam_eff[0], params.lam) and torch.equal(lam_eff[1], params.lam)


def test_plugin_mixing_goes_through_the_op_with_the_run_generator():
    state = fake_state()
    views = random_views(B=6)
    batch = sdmp_method().transform_views(state, views)
    params = sample_mix_params(6, 8, 8, generator=fake_state().generator("sdmp", "cpu"), num_views=2)
    ref, lam_ref = batch_mix_reference(views, *params)
    assert torch.equal(batch.mixed, ref) and torch.equal(batch.lam, lam_ref)
    assert batch.partner.tolist() == [5, 4, 3, 2, 1, 0]
    assert torch.equal(batch.lam_partner, batch.lam.flip(1))
    assert "sdmp@cpu" in state.generators


def test_lambda_distribution_same_for_both_views_and_operator_per_batch():
    state = fake_state(seed=3)
    method = sdmp_method(ops=["cutmix", "resizemix"])
    method.on_epoch_start(state)
    lams, ops = [], []
    views = random_views(B=16, C=1)
    for _ in range(200):
        b = method.transform_views(state, views)
        assert torch.equal(b.lam[0], b.lam[1])  # the same lam (and box size) for both views
        ops.append(b.op)
        # lam_eff = 1 - h w / 64 with h = w = round(8 sqrt(1 - lam)) in 3..8 for lam in [0.1, 0.9]
        assert float(b.lam.min()) >= 0.0 and float(b.lam.max()) <= 1 - 9 / 64
    counts = [ops.count(CUTMIX), ops.count(RESIZEMIX)]
    assert ops.count(MIXUP) == 0 and stats.chisquare(counts).pvalue > 1e-4
    assert state.epoch_metrics == {}
    method.on_epoch_end(state)
    assert state.epoch_metrics["sdmp/cutmix_batches"] + state.epoch_metrics["sdmp/resizemix_batches"] == 200
    # lam itself: 0.8 Beta(1, 1) + 0.1, one per sample
    for _ in range(50):
        lams.append(sample_mix_params(64, 8, 8, generator=state.generator("sdmp", "cpu")).lam)
    lam = torch.cat(lams).double()
    assert float(lam.min()) >= 0.1 and float(lam.max()) <= 0.9
    assert stats.kstest(((lam - 0.1) / 0.8).numpy(), "uniform").pvalue > 1e-4


def test_local_flip_under_several_ranks_uses_the_global_draws_slice():
    views = random_views(B=4, seed=5)
    full = sample_mix_params(8, 8, 8, generator=fake_state().generator("sdmp", "cpu"), num_views=2)
    for rank in range(2):
        b = sdmp_method().transform_views(fake_state(rank, 2), views)
        sl = slice(rank * 4, (rank + 1) * 4)
        ref, lam = batch_mix_reference(views, full.op[sl], full.lam[sl], full.boxes[:, sl])
        assert torch.equal(b.mixed, ref) and torch.equal(b.lam, lam)
        assert b.partner.tolist() == [rank * 4 + 3 - i for i in range(4)]


def test_global_flip_on_one_process_equals_local():
    views = random_views(B=6)
    a = sdmp_method(flip="local").transform_views(fake_state(), views)
    b = sdmp_method(flip="global").transform_views(fake_state(), views)
    assert torch.equal(a.mixed, b.mixed) and torch.equal(a.lam, b.lam) and torch.equal(a.partner, b.partner)


def test_global_flip_across_two_ranks_equals_one_process(tmp_path):
    script = tmp_path / "global_flip.py"
    script.write_text(textwrap.dedent(f"""
        import json, types, torch, torch.distributed as dist, torch.multiprocessing as mp
        from batchkin.plugins.sdmp import SDMP
        from batchkin.state import State

        def worker(rank, world):
            torch.set_num_threads(1)
            dist.init_process_group("gloo", init_method="file://{tmp_path / 'rdv'}", rank=rank, world_size=world)
            views = torch.randint(0, 256, (2, 8, 1, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
            state = State(config=types.SimpleNamespace(seed=0), device=torch.device("cpu"), rank=rank, world_size=world)
            b = SDMP(SDMP.Options(flip="global")).transform_views(state, views[:, rank * 4 : (rank + 1) * 4].contiguous())
            with open(f"{tmp_path}/rank{{rank}}.json", "w") as fh:
                json.dump({{"mixed": b.mixed.tolist(), "lam": b.lam.tolist(), "partner": b.partner.tolist(),
                           "lam_partner": b.lam_partner.tolist()}}, fh)
            dist.destroy_process_group()

        if __name__ == "__main__":
            mp.start_processes(worker, args=(2,), nprocs=2, start_method="fork")
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    views = torch.randint(0, 256, (2, 8, 1, 6, 6), dtype=torch.uint8, generator=gen(0))
    one = sdmp_method().transform_views(fake_state(), views)
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        sl = slice(rank * 4, (rank + 1) * 4)
        assert torch.equal(torch.tensor(got["mixed"], dtype=torch.uint8), one.mixed[:, sl])
        assert torch.equal(torch.tensor(got["lam"]), one.lam[:, sl])
        assert got["partner"] == one.partner[sl].tolist()  # global rows: 7 - g
        assert torch.equal(torch.tensor(got["lam_partner"]), one.lam_partner[:, sl])


# ------------------------------------------------------------------------------ losses


def test_c_weights_worked_example():
    c, w_self, w_partner = sdmp_mm_weights(torch.tensor([0.7]), torch.tensor([0.4]))
    assert float(c) == pytest.approx(0.9)
    assert float(w_self) == pytest.approx(1 / 1.9) and float(w_partner) == pytest.approx(0.9 / 1.9)
    assert round(float(w_self), 3) == 0.526 and round(float(w_partner), 3) == 0.474
    c, w_self, w_partner = sdmp_mm_weights(torch.tensor([0.3, 1.0, 0.5]), torch.tensor([0.3, 1.0, 0.5]))
    assert c.tolist() == pytest.approx([0.6, 0.0, 1.0])
    torch.testing.assert_close(w_self + w_partner, torch.ones(3, dtype=torch.float64))


def test_mm_loss_takes_the_key_views_lam_per_sample_and_reads_the_partners_row():
    """METHODS.md's worked example inside the loss: lam_i = 0.7 and lam_i' = 0.4 give c = 0.9,
    weights 0.526 / 0.474. Two samples, partners 1 and 0; the key view's lam per sample is
    [0.2, 0.4] (not permuted): row 0 reads lam_0' = 0.4 at its partner's row 1."""
    T = 0.5
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    lam = torch.tensor([0.7, 0.3])  # the query view, per sample
    lam_keys = torch.tensor([0.2, 0.4])  # the key view, per sample
    e2 = math.exp(2.0)
    p_own, p_partner = e2 / (e2 + 1), 1 / (e2 + 1)  # logits (2, 0) / (0, 2): each query matches its own key
    # row 0: c = min(0.7, 1 - 0.4) + min(0.3, 0.4) = 0.6 + 0.3 = 0.9
    w0 = (1 / 1.9, 0.9 / 1.9)
    assert (round(w0[0], 3), round(w0[1], 3)) == (0.526, 0.474)
    # row 1: lam = 0.3, its partner is row 0: lam' = 0.2, c = min(0.3, 0.8) + min(0.7, 0.2) = 0.5
    w1 = (1 / 1.5, 0.5 / 1.5)
    expect = 2 * T * (-math.log(w0[0] * p_own + w0[1] * p_partner) - math.log(w1[0] * p_own + w1[1] * p_partner)) / 2
    assert float(sdmp_mm_loss(q, k, lam, T, lam_keys=lam_keys)) == pytest.approx(expect, rel=1e-6)
    # the partner's value is read inside: handing in lam_keys already permuted is a different loss
    assert float(sdmp_mm_loss(q, k, lam, T, lam_keys=lam_keys.flip(0))) != pytest.approx(expect, rel=1e-3)
    # keys gathered over two ranks, this rank's rows 2 and 3: lam' is read at rows 3 and 2, never
    # at the other rank's rows (their lam 0.9 / 0.1 would give other weights)
    others = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    rows = sdmp_mm_loss(q, torch.cat([others, k]), lam, T, lam_keys=torch.tensor([0.9, 0.1, 0.2, 0.4]),
                        labels=torch.tensor([2, 3]), partner=torch.tensor([3, 2]))
    z = math.exp(-2.0) + 1 + e2 + 1  # logits (-2, 0, 2, 0) and (0, -2, 0, 2)
    p_own, p_partner = e2 / z, 1 / z
    expect = 2 * T * (-math.log(w0[0] * p_own + w0[1] * p_partner) - math.log(w1[0] * p_own + w1[1] * p_partner)) / 2
    assert float(rows) == pytest.approx(expect, rel=1e-6)


def test_mm_loss_refuses_lam_of_the_wrong_shape():
    q = k = torch.eye(4)
    lam = torch.full((4,), 0.5)
    with pytest.raises(ValueError, match=r"lam_keys must hold the key view's lam_eff of every key row, shape \(4,\)"):
        sdmp_mm_loss(q, k, lam, 0.2, lam_keys=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"lam must hold one lam_eff per query, shape \(4,\)"):
        sdmp_mm_loss(q, k, torch.full((2, 4), 0.5), 0.2)
    with pytest.raises(ValueError, match="with 8 key rows for 4 queries, pass lam_keys"):
        sdmp_mm_loss(q, torch.cat([k, k]), lam, 0.2)
    with pytest.raises(TypeError):
        sdmp_mm_loss(q, k, lam, lam, 0.2)  # the old positional lam_partner is gone, loudly
    with pytest.raises(ValueError, match="sdmp_dino_loss: lam_keys must hold"):
        p = torch.full((2, 4, 3), 1 / 3)
        sdmp_dino_loss(torch.zeros(2, 4, 3), p, p, torch.full((2, 4), 0.5), lam_keys=torch.full((2, 5), 0.5))


@pytest.mark.parametrize("op", ["mixup", "cutmix", "resizemix"])
def test_lam_eff_from_the_parameters_equals_the_ops(op):
    for seed, (B, H, W) in enumerate([(8, 8, 9), (5, 7, 7), (16, 28, 28)]):
        params = sample_mix_params(B, H, W, generator=gen(seed), ops=(op,), num_views=2)
        _, lam_eff = batch_mix_reference(random_views(B=B, H=H, W=W, seed=seed), *params)
        assert torch.equal(sdmp_lam_eff(params, H, W), lam_eff)


def _explicit(q, k, w_self, w_partner, T):
    """-log(w_self p(i) + w_partner p(i')) * 2T from softmax probabilities, float64."""
    qn, kn = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    p = torch.softmax(qn @ kn.T / T, dim=1)
    B = q.shape[0]
    i = torch.arange(B)
    return (-torch.log(w_self.double() * p[i, i] + w_partner.double() * p[i, B - 1 - i])).mean() * 2 * T


def test_ms_and_mm_losses_match_the_explicit_formulas():
    g = gen(0)
    q, k = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    lam = 0.1 + 0.8 * torch.rand(6, generator=g)
    assert float(sdmp_ms_loss(q, k, lam, 0.2)) == pytest.approx(float(_explicit(q, k, lam, 1 - lam, 0.2)), rel=1e-5)
    lam_p = lam.flip(0)
    c = torch.minimum(lam, 1 - lam_p) + torch.minimum(1 - lam, lam_p)
    expect = _explicit(q, k, 1 / (1 + c), c / (1 + c), 0.2)
    # the key view's lam per sample (here the same as the query view's); the partner's is read inside
    assert float(sdmp_mm_loss(q, k, lam, 0.2, lam_keys=lam)) == pytest.approx(float(expect), rel=1e-5)
    assert float(sdmp_mm_loss(q, k, lam, 0.2)) == pytest.approx(float(expect), rel=1e-5)


def test_ms_reduces_to_infonce_at_lambda_one_and_mm_at_c_zero():
    g = gen(1)
    q = torch.randn(5, 4, generator=g, requires_grad=True)
    k = torch.randn(5, 4, generator=g)
    ones = torch.ones(5)
    ms = sdmp_ms_loss(q, k, ones, 0.2)
    torch.testing.assert_close(ms, moco_infonce(q, k, 0.2))
    mm = sdmp_mm_loss(q, k, ones, 0.2, lam_keys=ones)  # lam = lam' = 1 -> c = 0
    assert sdmp_mm_weights(ones, ones)[0].tolist() == [0.0] * 5
    torch.testing.assert_close(mm, moco_infonce(q, k, 0.2))
    (ms + mm).backward()  # log 0 of the zero weight must not poison the gradient
    assert bool(torch.isfinite(q.grad).all())
    q2 = q.detach().clone().requires_grad_(True)
    (2 * moco_infonce(q2, k, 0.2)).backward()
    torch.testing.assert_close(q.grad, q2.grad)


def test_mixture_nll_odd_batch_middle_sample():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    out = mixture_nll(logits, torch.tensor([1]), torch.tensor([1]), torch.tensor([0.3]), torch.tensor([0.7]))
    torch.testing.assert_close(out, -torch.log_softmax(logits, 1)[:, 1])


def test_sdmp_moco_loss_total_and_terms():
    g = gen(2)
    q, k, qm, km = (torch.randn(2, 6, 4, generator=g) for _ in range(4))
    lam = 0.1 + 0.8 * torch.rand(2, 6, generator=g)
    out = sdmp_moco_loss(q, k, qm, km, lam, 0.2)
    torch.testing.assert_close(out["src"], moco_loss(q[0], q[1], k[0], k[1], 0.2))
    flip = torch.arange(5, -1, -1)
    ms = sdmp_ms_loss(qm[0], k[1], lam[0], 0.2) + sdmp_ms_loss(qm[1], k[0], lam[1], 0.2)
    mm = sdmp_mm_loss(qm[0], km[1], lam[0], 0.2, lam_keys=lam[1]) + sdmp_mm_loss(qm[1], km[0], lam[1], 0.2, lam_keys=lam[0])
    c = torch.minimum(lam[0], 1 - lam[1][flip]) + torch.minimum(1 - lam[0], lam[1][flip])
    explicit = _explicit(qm[0], km[1], 1 / (1 + c), c / (1 + c), 0.2)
    assert float(sdmp_mm_loss(qm[0], km[1], lam[0], 0.2, lam_keys=lam[1])) == pytest.approx(float(explicit), rel=1e-5)
    torch.testing.assert_close(out["ms"], ms)
    torch.testing.assert_close(out["mm"], mm)
    torch.testing.assert_close(out["loss"], out["src"] + 0.5 * ms + 0.5 * mm)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_losses_and_gradients_in_half_precision_at_t_0_1(dtype):
    g = gen(3)
    q, k, qm, km = (torch.randn(2, 16, 8, generator=g).to(dtype).requires_grad_(True) for _ in range(4))
    lam = (0.1 + 0.8 * torch.rand(2, 16, generator=g)).to(dtype)
    out = sdmp_moco_loss(q, k, qm, km, lam, 0.1)
    assert all(bool(torch.isfinite(v)) for v in out.values())
    out["loss"].backward()
    for t in (q, qm):
        assert t.grad.dtype == dtype and bool(torch.isfinite(t.grad).all())
    ref = sdmp_moco_loss(q.double(), k.double(), qm.double(), km.double(), lam.double(), 0.1)
    assert float(out["loss"].detach()) == pytest.approx(float(ref["loss"].detach()), rel=2e-2)


def test_logsumexp_form_survives_where_softmax_then_log_underflows_in_fp16():
    # the query matches neither its own key nor its partner's, but 6 others: in fp16 both
    # probabilities underflow to 0 and softmax-then-log gives inf; the logsumexp form does not
    B, d = 8, 4
    q = torch.zeros(B, d)
    q[:, 0] = 1
    k = torch.zeros(B, d)
    k[:, 0] = 1
    k[0, 0], k[B - 1, 0] = -1, -1
    T = 0.1
    logits = (q @ k.T / T).half()
    p = torch.softmax(logits, 1)
    naive = -torch.log(0.5 * p[0, 0] + 0.5 * p[0, B - 1])
    assert bool(torch.isinf(naive))
    ours = mixture_nll(logits[:1], torch.tensor([0]), torch.tensor([B - 1]), torch.tensor([0.5]), torch.tensor([0.5]))
    # -log p(0) = logsumexp(logits) + 10 = log(6 e^20 + 2)
    assert float(ours) == pytest.approx(math.log(6 * math.exp(20) + 2), rel=1e-4)


def test_dino_form_targets():
    g = gen(4)
    B, K = 6, 5
    student = torch.randn(2, B, K, generator=g)
    p = torch.softmax(torch.randn(2, B, K, generator=g), -1)
    pm = torch.softmax(torch.randn(2, B, K, generator=g), -1)
    lam = 0.1 + 0.8 * torch.rand(2, B, generator=g)
    out = sdmp_dino_loss(student, p, pm, lam, 0.1)
    flip = torch.arange(B - 1, -1, -1)
    ms = mm = 0
    for a, b in ((0, 1), (1, 0)):
        target = lam[a][:, None] * p[b] + (1 - lam[a][:, None]) * p[b][flip]
        assert torch.allclose(target.sum(1), torch.ones(B))
        ms += float(-(target * F.log_softmax(student[a] / 0.1, 1)).sum(1).mean())
        c = torch.minimum(lam[a], 1 - lam[b][flip]) + torch.minimum(1 - lam[a], lam[b][flip])
        target = (pm[b] + c[:, None] * pm[b][flip]) / (1 + c[:, None])
        mm += float(-(target * F.log_softmax(student[a] / 0.1, 1)).sum(1).mean())
    assert float(out["ms"]) == pytest.approx(ms / 2, rel=1e-5)
    assert float(out["mm"]) == pytest.approx(mm / 2, rel=1e-5)
    # lam = 1: source-mix is DINO's cross-entropy with the own sample's teacher distribution
    ones = torch.ones(2, B)
    out1 = sdmp_dino_loss(student, p, pm, ones, 0.1)
    expect = (soft_cross_entropy(student[0], p[1], 0.1) + soft_cross_entropy(student[1], p[0], 0.1)) / 2
    torch.testing.assert_close(out1["ms"], expect)


# ------------------------------------------------------------------------------ the plugin in a run


def ssl_config(methods, epochs=1, **tables):
    raw = tiny_config(list(methods), data={"augment": False}, **tables)
    raw["epochs"] = epochs
    return raw


def test_plugin_terms_equal_the_functional_twin():
    state = run_plugin(["moco", "sdmp"], steps=2, config=ssl_config(["moco", "sdmp"]), plugin_modules=MODULES)
    s = state.outputs["ssl"]
    q = torch.stack([s.q[0][0], s.q[1][0]])
    qm = torch.stack([s.q_mix[0][0], s.q_mix[1][0]])
    twin = sdmp_moco_loss(q, s.keys, qm, s.keys_mix, s.mix.lam, 0.2)
    terms = state.loss_terms
    torch.testing.assert_close(terms["moco"], twin["src"])
    torch.testing.assert_close(terms["sdmp_ms"], 0.5 * twin["ms"])
    torch.testing.assert_close(terms["sdmp_mm"], 0.5 * twin["mm"])
    assert s.mix.mixed.dtype == torch.uint8 and bool((s.mix.mixed != 0).any())


@pytest.mark.parametrize("base", ["moco", "dino"])
def test_fit_with_sdmp(tmp_path, base):
    over = {"dino": {"out_dim": 32}} if base == "dino" else {}
    fit(ssl_config([base, "sdmp"], **over), tmp_path / "run", plugins=Plugins(extra_modules=MODULES), progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    ep = lines[0]
    assert math.isfinite(ep[f"train/{base}"]) and math.isfinite(ep["train/sdmp_ms"]) and math.isfinite(ep["train/sdmp_mm"])
    assert 0.1 <= ep["sdmp/lam_eff_mean"] <= 1.0
    assert "test/top1" in lines[-1]


@pytest.mark.parametrize("over,message", [
    ({"ops": ["mixup", "cutout"]}, "sdmp.ops: unknown operator 'cutout'"),
    ({"ops": []}, "sdmp.ops must name at least one operator"),
    ({"ops": ["mixup", "mixup"]}, "sdmp.ops lists an operator twice"),
    ({"flip": "world"}, "sdmp.flip must be one of 'local', 'global'"),
    ({"weight_ms": -1.0}, "sdmp.weight_ms must be >= 0.0"),
])
def test_bad_options_name_the_key(over, message):
    with pytest.raises(ConfigError) as exc:
        prepare(ssl_config(["moco", "sdmp"], sdmp=over), Plugins(extra_modules=MODULES))
    assert message in str(exc.value)


# ------------------------------------------------------------------------------ the shipped configs


@pytest.mark.parametrize("data", ["digits", "fashion_mnist"])
def test_shipped_configs_differ_from_their_baseline_only_in_the_method(data):
    import tomllib
    from pathlib import Path

    from batchkin.config import build_config

    root = Path(__file__).resolve().parents[2] / "configs"
    base = tomllib.loads((root / f"moco_{data}.toml").read_text())
    with_sdmp = tomllib.loads((root / f"sdmp_{data}.toml").read_text())
    assert base["methods"] == ["moco"] and with_sdmp["methods"] == ["moco", "sdmp"]
    assert set(with_sdmp["sdmp"]) == {"ops", "flip", "weight_ms", "weight_mm"}
    strip = lambda d: {k: v for k, v in d.items() if k not in ("methods", "sdmp")}  # noqa: E731
    assert strip(base) == strip(with_sdmp)
    plugins = Plugins(extra_modules=MODULES)
    for raw in (base, with_sdmp):
        cfg = build_config(raw, plugins.registry.methods)
        for name in cfg.methods:
            from batchkin.schema import parse

            parse(plugins.method(name).options, cfg.method_options.get(name, {}), name)


def test_digits_config_trains_a_step():
    import tomllib
    from pathlib import Path

    raw = tomllib.loads((Path(__file__).resolve().parents[2] / "configs" / "sdmp_digits.toml").read_text())
    raw["device"] = "cpu"
    state = run_plugin(raw["methods"], steps=1, config=raw, plugin_modules=MODULES)
    assert set(state.loss_terms) == {"moco", "sdmp_ms", "sdmp_mm"}
