"""Per-epoch (and per-step) weights of the methods: one validation and one ramp.

The methods weight a term by the run's position: BBN's ``alpha``
(:func:`~batchkin.plugins.bbn.bbn_alpha`), DRLoc's ``lambda``
(:func:`~batchkin.plugins.drloc.drloc_lambda`), DINO's teacher temperature
(:func:`~batchkin.plugins.dino.teacher_temperature`) and the SSL bases' momentum
(:func:`~batchkin.plugins.ssl.cosine_momentum`). Each is a shape applied to
:func:`ramp`, a straight line clamped to its span; the epoch schedules check
their arguments with :func:`check_epoch`, so a bad epoch reads the same everywhere.

Epochs count from 1, as in the run's logs and ``state.epoch``: epoch ``e`` of a run
sits at position ``e - 1`` (the first epoch trains with the schedule's start value).
"""

from __future__ import annotations


def check_epoch(epoch: int, epochs: int, *, minimum: int = 0, **counts: int) -> None:
    """Raise unless ``epoch`` (from 1) lies in ``1..epochs`` and every named count is an int ``>= minimum``.

    ``TypeError`` for a value that is not an int (``bool`` is refused too); ``ValueError``
    for an epoch outside the run (or ``epochs < 1``) and for a count below ``minimum``.
    ``counts`` are a schedule's epoch spans by their option names (``alpha_epochs=100``),
    so the message names the option a user set.
    """
    for name, value in (("epoch", epoch), ("epochs", epochs), *counts.items()):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if epochs < 1 or not 1 <= epoch <= epochs:
        raise ValueError(f"epoch must lie in 1..epochs (epochs >= 1); got epoch={epoch}, epochs={epochs}")
    for name, value in counts.items():
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}; got {value}")


def ramp(position: float, span: float, start: float = 0.0, end: float = 1.0) -> float:
    """The value at ``position`` of a straight line from ``start`` (position 0) to ``end`` (position ``span``).

    ``start`` at or before position 0, ``end`` past ``span``, and in between
    ``start + (end - start) * position / span``, evaluated in that order (so that
    ``ramp(t, d)`` is exactly ``t / d``). An empty span (``span <= 0``) is a step:
    ``start`` at or before position 0, ``end`` after it.
    """
    if position <= 0:
        return float(start)
    if position > span:
        return float(end)
    return start + (end - start) * position / span


__all__ = ["check_epoch", "ramp"]
