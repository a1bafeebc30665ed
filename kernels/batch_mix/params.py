"""The random parameters of one mixing step: operator, ``lam`` and boxes, drawn on the host."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import checks

MIXUP = 0
CUTMIX = 1
RESIZEMIX = 2
OPERATORS = {"mixup": MIXUP, "cutmix": CUTMIX, "resizemix": RESIZEMIX}
OPERATOR_NAMES = {code: name for name, code in OPERATORS.items()}


@dataclass(frozen=True)
class MixParams:
    """The random parameters of one mixing step.

    ``op`` ``[B]`` int64 operator codes, ``lam`` ``[B]`` float32 (the same for every
    view), ``boxes`` ``[V, B, 4]`` int64 ``(y0, x0, h, w)``. Iterating yields
    ``op, lam, boxes`` so that ``batch_mix(x, *params)`` works.
    """

    op: torch.Tensor
    lam: torch.Tensor
    boxes: torch.Tensor

    def __iter__(self):
        yield self.op
        yield self.lam
        yield self.boxes

    def to(self, device) -> MixParams:
        return MixParams(self.op.to(device), self.lam.to(device), self.boxes.to(device))


def partner_index(batch_size: int, device=None) -> torch.Tensor:
    """Index of every sample's partner: ``B-1-i`` (the batch flipped)."""
    checks.check_int("batch_size", batch_size, min_value=1)
    return torch.arange(batch_size - 1, -1, -1, device=device)


def operator_codes(ops) -> list[int]:
    """Operator names or codes (one, or a sequence without repeats) as codes."""
    if isinstance(ops, (str, int)):
        ops = (ops,)
    if not isinstance(ops, Sequence) or len(ops) == 0:
        raise ValueError("ops must be a non-empty sequence of operator names or codes")
    codes = []
    for item in ops:
        if isinstance(item, str):
            if item.lower() not in OPERATORS:
                raise ValueError(f"ops: unknown operator {item!r}; expected one of {', '.join(OPERATORS)}")
            code = OPERATORS[item.lower()]
        elif isinstance(item, int) and not isinstance(item, bool):
            if item not in OPERATOR_NAMES:
                raise ValueError(f"ops: unknown operator code {item}; expected 0 (mixup), 1 (cutmix) or 2 (resizemix)")
            code = item
        else:
            raise TypeError(f"ops entries must be str or int, got {type(item).__name__}")
        if code in codes:
            raise ValueError(f"ops: operator {OPERATOR_NAMES[code]!r} is listed twice")
        codes.append(code)
    return codes


def sample_mix_params(
    B: int,
    H: int,
    W: int,
    *,
    generator: torch.Generator,
    ops=("mixup", "cutmix", "resizemix"),
    per_sample_op: bool = False,
    num_views: int = 1,
    device=None,
) -> MixParams:
    """Draw SDMP's mixing parameters for a batch of ``B`` images of size ``H x W``.

    * ``lam_raw ~ Beta(1, 1)`` (= Uniform(0, 1)) per sample, ``lam = 0.8 * lam_raw + 0.1``
      (so ``lam`` is in ``[0.1, 0.9]``), the same for every view;
    * the operator is chosen uniformly from ``ops`` once for the batch, or per sample
      when ``per_sample_op``;
    * one box per view and sample, side ratio ``sqrt(1 - lam)``:
      ``h = round(H * sqrt(1 - lam))``, ``w = round(W * sqrt(1 - lam))`` (round half to
      even, as ``torch.round``; clamped to ``[0, H]`` / ``[0, W]``), its top-left corner
      uniform among the positions that keep it inside the image, independently per view.
      Boxes are drawn whatever the operator (mixup ignores them), so the generator is
      consumed the same way for every operator.

    Everything is drawn on the CPU from ``generator`` (which must be a CPU generator)
    in this order: ``lam_raw`` [B], the operator, then for each view the row and column
    positions [B] each; the results are moved to ``device``.
    """
    checks.check_int("B", B, min_value=1)
    checks.check_int("H", H, min_value=1)
    checks.check_int("W", W, min_value=1)
    checks.check_int("num_views", num_views, min_value=1)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(
            f"generator must be a CPU generator (the parameters are drawn on the host); got {generator.device}"
        )
    codes = operator_codes(ops)

    lam_raw = torch.rand(B, generator=generator, dtype=torch.float64)
    lam = (0.8 * lam_raw + 0.1).to(torch.float32)
    choice = torch.randint(len(codes), (B if per_sample_op else 1,), generator=generator)
    op = torch.tensor(codes, dtype=torch.int64)[choice].expand(B).contiguous()

    side = torch.sqrt(1.0 - lam.to(torch.float64))
    h = torch.round(H * side).to(torch.int64).clamp_(0, H)
    w = torch.round(W * side).to(torch.int64).clamp_(0, W)
    boxes = torch.empty(num_views, B, 4, dtype=torch.int64)
    for v in range(num_views):
        uy = torch.rand(B, generator=generator, dtype=torch.float64)
        ux = torch.rand(B, generator=generator, dtype=torch.float64)
        # uniform over the H-h+1 (W-w+1) valid positions; the min guards u*(n) rounding up to n
        y0 = torch.minimum(torch.floor(uy * (H - h + 1)).to(torch.int64), H - h)
        x0 = torch.minimum(torch.floor(ux * (W - w + 1)).to(torch.int64), W - w)
        boxes[v] = torch.stack((y0, x0, h, w), dim=-1)
    params = MixParams(op, lam, boxes)
    return params.to(device) if device is not None else params
