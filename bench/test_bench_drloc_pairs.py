"""DRLoc pair sampling + first head layer, forward and backward: ours vs the original style.

Every implementation runs the same step on the same inputs in the same process: draw
``m = 64`` pairs per image, gather both embeddings from a ViT token grid (a permuted
view of ``[B, H*W, C]`` tokens), compute the targets, apply the head's first layer
``Linear(2C, 512)``, and backpropagate to the tokens, the weight and the bias.

* ``original`` -- the released code's style: positions drawn on the CPU with
  ``torch.randint`` and copied to the device, the whole grid permuted to ``[C, B*H*W]``
  and made contiguous, ``index_select`` of the flat indices ``row * W + col`` (the
  correct index; upstream's ``row * H + col`` is wrong for H != W), concatenation into
  ``[B*m, 2C]``, ``nn.Linear``;
* ``reference`` -- this op's pure-PyTorch reference path (device draw, advanced-index
  gather, ``Linear(cat(e_a, e_b))``);
* ``ours`` -- ``drloc_positions`` + ``drloc_first_layer`` (C++ on CPU, Triton on CUDA;
  strategy ``auto``: the cost model picks ``gather``, ``project`` or, on CPU, ``unique``)
  + ``drloc_targets``.

All three return the same values: the ``[B*m, 512]`` output, the targets, and the gradients
w.r.t. the tokens, the weight and the bias (``test_bench_sides_agree`` checks this on the
quick size, with both sides drawing the same positions).

Sizes: B = 256, C in {192, 384, 768}, grids 7x7, 14x14, 8x16, plus a small ``quick``
size (select it with ``-k quick``). Run::

    pytest bench/test_bench_drloc_pairs.py --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

from batchkin.kernels import drloc_pairs as dp
from batchkin.kernels import rng

M = 64
HIDDEN = 512
SIZES = [pytest.param((8, 32, 7, 7), id="quick-B8-C32-7x7")] + [
    pytest.param((256, C, H, W), id=f"B256-C{C}-{H}x{W}")
    for (H, W) in ((7, 7), (14, 14), (8, 16))
    for C in (192, 384, 768)
]
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")),
]
IMPLS = ("original", "reference", "ours")


def _original_step(tokens, H, W, linear, gen, device):
    B, _, C = tokens.shape
    grid = tokens.transpose(1, 2).unflatten(2, (H, W))
    # CPU draw, then a host -> device copy
    pos_a = torch.stack([torch.randint(H, (B, M), generator=gen), torch.randint(W, (B, M), generator=gen)], -1)
    pos_b = torch.stack([torch.randint(H, (B, M), generator=gen), torch.randint(W, (B, M), generator=gen)], -1)
    pos_a, pos_b = pos_a.to(device), pos_b.to(device)
    targets = (pos_a - pos_b).abs().float()
    # full-map permute and copy, then gather 2m columns per image
    flat = grid.permute(1, 0, 2, 3).reshape(C, -1)
    base = (torch.arange(B, device=device) * H * W).view(B, 1)
    idx_a = (base + pos_a[..., 0] * W + pos_a[..., 1]).view(-1)
    idx_b = (base + pos_b[..., 0] * W + pos_b[..., 1]).view(-1)
    e_a = flat.index_select(1, idx_a).view(C, B, M).permute(1, 2, 0)
    e_b = flat.index_select(1, idx_b).view(C, B, M).permute(1, 2, 0)
    feats = torch.cat([e_a, e_b], dim=-1).reshape(B * M, 2 * C)
    return linear(feats), targets


def _reference_step(tokens, H, W, linear, key):
    B = tokens.shape[0]
    grid = tokens.transpose(1, 2).unflatten(2, (H, W))
    pos = dp.drloc_positions_reference(B, M, H, W, key, tokens.device)
    out = dp.drloc_first_layer_reference(grid, pos, linear.weight, linear.bias)
    return out, dp.drloc_targets_reference(pos, H, W)


def _ours_step(tokens, H, W, linear, key):
    B = tokens.shape[0]
    grid = tokens.transpose(1, 2).unflatten(2, (H, W))
    pos = dp.drloc_positions(B, M, H, W, key, tokens.device)
    out = dp.drloc_first_layer(grid, pos, linear.weight, linear.bias)
    return out, dp.drloc_targets(pos, H, W)


def _steps(size, device="cpu"):
    """One no-argument step per implementation on shared inputs (the benchmark's step)."""
    B, C, H, W = size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, H * W, C, generator=g).to(device).requires_grad_(True)
    linear = torch.nn.Linear(2 * C, HIDDEN).to(device)
    grad_out = torch.randn(B * M, HIDDEN, generator=g).to(device)
    params = [tokens, linear.weight, linear.bias]
    draw_gen = torch.Generator().manual_seed(1)
    step = [0]

    def make(impl):
        def run():
            step[0] += 1
            if impl == "original":
                out, _ = _original_step(tokens, H, W, linear, draw_gen, device)
            elif impl == "reference":
                out, _ = _reference_step(tokens, H, W, linear, rng.derive_key(1, step[0]))
            else:
                out, _ = _ours_step(tokens, H, W, linear, rng.derive_key(1, step[0]))
            torch.autograd.grad(out.reshape(B * M, HIDDEN), params, grad_out)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    return {impl: make(impl) for impl in IMPLS}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_bench_drloc_pairs(benchmark, device, size, impl):
    B, C, H, W = size
    run = _steps(size, device)[impl]
    run()  # compile/load the kernels outside the timing
    benchmark.group = f"drloc_pairs {device} B{B} C{C} {H}x{W} m{M}"
    benchmark.extra_info.update(
        {"impl": impl, "device": device, "B": B, "C": C, "H": H, "W": W, "m": M, "hidden": HIDDEN,
         "baseline": "original", "threads": torch.get_num_threads()}
    )
    small = B * C * H * W <= 1 << 20
    # the large sizes run 11 rounds: their medians must stand against a shared machine's noise
    benchmark.pedantic(run, rounds=20 if small else 11, iterations=1, warmup_rounds=1)


def test_bench_sides_agree():
    """The compared implementations compute the same step: outputs, targets and all gradients."""
    B, C, H, W = 8, 32, 7, 7
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(B, H * W, C, generator=g).requires_grad_(True)
    linear = torch.nn.Linear(2 * C, HIDDEN)
    grad_out = torch.randn(B * M, HIDDEN, generator=g)
    params = [tokens, linear.weight, linear.bias]
    # the original draws on the CPU: replay its positions through the op's gather
    gen = torch.Generator().manual_seed(1)
    out_o, tgt_o = _original_step(tokens, H, W, linear, gen, "cpu")
    gen = torch.Generator().manual_seed(1)
    rows = [torch.randint(n, (B, M), generator=gen) for n in (H, W, H, W)]
    pos = torch.stack(rows, -1)
    grid = tokens.transpose(1, 2).unflatten(2, (H, W))
    out_u = dp.drloc_first_layer(grid, pos, linear.weight, linear.bias)  # auto
    torch.testing.assert_close(out_u.reshape(B * M, HIDDEN), out_o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dp.drloc_targets(pos, H, W), tgt_o)
    for a, b in zip(torch.autograd.grad(out_u.reshape(B * M, HIDDEN), params, grad_out),
                    torch.autograd.grad(out_o, params, grad_out)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def interleaved(rounds: int, device: str = "cpu", quick: bool = False) -> list[dict]:
    """Every benchmark size, the three implementations alternating round by round
    (:func:`harness.interleave`): the median per-round ratio original / ours is the
    figure a drifting shared machine cannot bias."""
    from harness import interleave

    rows = []
    for p in SIZES[:1] if quick else SIZES[1:]:
        B, C, H, W = p.values[0]
        fns = _steps(p.values[0], device)
        for fn in fns.values():  # warm-up: load the kernels, fill the block cache
            fn()
        res = interleave(fns, rounds, baseline="original")
        rows.append({"size": f"B{B} C{C} {H}x{W}", **{f"{k}_ms": round(v * 1e3, 1) for k, v in res["median_s"].items()},
                     "ours_vs_original": round(res["median_ratio"]["ours"], 2),
                     "ratios": res["ratios"]["ours"]})
    return rows


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(description="DRLoc pairs + first layer: original / reference / ours, interleaved; "
                                 "prints a table, then the rows as JSON on the last line")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="the smallest benchmark size only")
    args = ap.parse_args()
    rows = interleaved(args.rounds, args.device, args.quick)
    print(f"threads {torch.get_num_threads()}, rounds {args.rounds}")
    print("| size | original (ms) | reference (ms) | ours (ms) | ours vs original (median of per-round ratios) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['original_ms']} | {r['reference_ms']} | {r['ours_ms']} | "
              f"{r['ours_vs_original']:.2f}x |")
    print(json.dumps(rows))
