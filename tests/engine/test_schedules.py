"""batchkin.schedules: the one epoch validation and the ramp every method's schedule is built on."""

import pytest

from batchkin.schedules import check_epoch, ramp


def test_ramp_by_hand():
    # the default line 0 -> 1 over a span of 4: t / 4, clamped
    assert [ramp(t, 4) for t in (-1, 0, 1, 2, 3, 4, 5)] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    # from 0.04 to 0.07 over 2: the three points of linspace(0.04, 0.07, 3), then 0.07
    assert [ramp(t, 2, 0.04, 0.07) for t in range(4)] == pytest.approx([0.04, 0.055, 0.07, 0.07], abs=1e-15)
    # a falling line: 1 -> 0 over 10
    assert ramp(3, 10, 1.0, 0.0) == pytest.approx(0.7)
    # evaluated as start + (end - start) * position / span: exactly t / d on the default line
    assert ramp(1, 3) == 1 / 3 and ramp(7, 10, 0.0, 0.1) == 0.1 * 7 / 10
    # an empty span is a step after position 0
    assert (ramp(0, 0), ramp(1, 0), ramp(0, -1, 2.0, 5.0), ramp(1, -1, 2.0, 5.0)) == (0.0, 1.0, 2.0, 5.0)
    # always a float, also from int end points
    assert [type(ramp(t, 2, 0, 3)) for t in (0, 1, 3)] == [float, float, float]


def test_check_epoch_accepts_the_run():
    for epoch in (1, 5, 10):
        assert check_epoch(epoch, 10) is None
    assert check_epoch(1, 1, warmup_epochs=0) is None
    assert check_epoch(3, 4, minimum=1, alpha_epochs=1) is None


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((0, 10), {}, ValueError, r"epoch must lie in 1\.\.epochs \(epochs >= 1\); got epoch=0, epochs=10"),
    ((11, 10), {}, ValueError, "got epoch=11, epochs=10"),
    ((1, 0), {}, ValueError, "got epoch=1, epochs=0"),
    ((1.0, 10), {}, TypeError, "epoch must be an int, got float"),
    ((1, True), {}, TypeError, "epochs must be an int, got bool"),
    ((1, 10), {"warmup_epochs": -1}, ValueError, "warmup_epochs must be >= 0; got -1"),
    ((1, 10), {"minimum": 1, "alpha_epochs": 0}, ValueError, "alpha_epochs must be >= 1; got 0"),
    ((1, 10), {"alpha_epochs": 2.5}, TypeError, "alpha_epochs must be an int, got float"),
])
def test_check_epoch_refuses(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        check_epoch(*args, **kwargs)


def test_every_epoch_schedule_refuses_an_epoch_outside_the_run_in_the_same_words():
    from batchkin.plugins.bbn import bbn_alpha
    from batchkin.plugins.dino import teacher_temperature
    from batchkin.plugins.drloc import drloc_lambda

    for schedule in (bbn_alpha, drloc_lambda, teacher_temperature):
        with pytest.raises(ValueError, match=r"^epoch must lie in 1\.\.epochs \(epochs >= 1\); got epoch=6, epochs=5$"):
            schedule(6, 5)
        with pytest.raises(TypeError, match="^epoch must be an int, got float$"):
            schedule(2.0, 5)
