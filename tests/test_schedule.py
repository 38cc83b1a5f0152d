"""Learning-rate schedule and the optimizer's hyperparameters."""

from __future__ import annotations

import pytest

from cifar_speedrun.errors import UserError
from cifar_speedrun.recipe.schedule import PiecewiseLinear, check_schedule


def test_page_baseline_schedule_values_at_the_points() -> None:
    steps = 97  # 50,000 // 512
    schedule = PiecewiseLinear([0, 5, 24], [0.0, 1.0, 0.0], steps)
    assert schedule.at_epoch(0) == 0.0
    assert schedule.at_epoch(5) == pytest.approx(1.0)
    assert schedule.at_epoch(24) == pytest.approx(0.0)
    assert schedule.at_epoch(2.5) == pytest.approx(0.5)
    assert schedule.at_epoch(14.5) == pytest.approx(0.5)
    # step k uses the schedule at (k + 1) / steps_per_epoch epochs
    assert schedule(5 * steps - 1) == pytest.approx(1.0)
    assert schedule(0) == pytest.approx(1 / (5 * steps))
    assert schedule(24 * steps - 1) == pytest.approx(0.0)


def test_schedule_is_held_after_its_last_point() -> None:
    final = PiecewiseLinear([0, 2, 8], [0.0, 1.0, 0.1], 97)  # Page's final: flat at 0.1 for epochs 8-10
    assert final.at_epoch(9.5) == pytest.approx(0.1)


@pytest.mark.parametrize("epochs,factors", [([0, 5, 3], [0, 1, 0]), ([0, 5], [0, 1, 0]), ([0, 5], [0, -1])])
def test_bad_schedules_are_refused(epochs, factors) -> None:
    with pytest.raises(UserError):
        check_schedule(epochs, factors)
