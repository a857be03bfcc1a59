import math
import warnings

import numpy as np
import pytest
from conftest import deepcache_function

from fastcache.schedule import Schedule, make_schedule, quad_center_steps, step_count


def test_uniform_is_every_interval_from_zero():
    assert sorted(Schedule("uniform", 3).full_steps(10)) == [0, 3, 6, 9]
    assert sorted(Schedule("uniform", 1).full_steps(4)) == [0, 1, 2, 3]


def test_quad_center_matches_the_published_list():
    assert quad_center_steps(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert sorted(make_schedule("quad-center", 5, center=15, pow=1.4).full_steps(50)) == [
        0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


def deepcache_quad_center(num_steps, interval, center, pow):
    """What DeepCache's SD pipeline computes: every step at interval 1, else ceil(steps / interval) full steps."""
    if interval == 1:
        return list(range(num_steps))
    reference = deepcache_function("sd.pipeline_stable_diffusion", "sample_from_quad_center")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference casts complex numbers to int32 on purpose
        try:
            return sorted(set(reference(num_steps, math.ceil(num_steps / interval), center=center, pow=pow)[0]))
        except ValueError:
            return None


@pytest.mark.parametrize("center", [0, 5, 15, 30])
def test_quad_center_equals_deepcache_for_every_steps_and_interval(center):
    undefined = 0
    for num_steps in range(1, 81):
        for interval in range(1, 11):
            expected = deepcache_quad_center(num_steps, interval, center, 1.4)
            schedule = Schedule("quad-center", interval, center, 1.4)
            if expected is None:
                undefined += 1
                with pytest.raises(ValueError, match=f"valid intervals for {num_steps} steps: \\[1, "):
                    schedule.full_steps(num_steps)
            else:
                assert sorted(schedule.full_steps(num_steps)) == expected, (num_steps, interval)
    assert center != 15 or undefined > 0, "the grid must reach cases the reference cannot schedule"


def test_explicit_list():
    assert sorted(make_schedule([0, 4, 7], 3).full_steps(6)) == [0, 4]
    assert sorted(make_schedule(np.array([0, 2]), 3).full_steps(6)) == [0, 2]


def test_numpy_integers_are_ints():
    assert Schedule("uniform", np.int64(3)).interval == 3 and type(Schedule("uniform", np.int64(3)).interval) is int


@pytest.mark.parametrize("bad, error", [
    (dict(schedule="nope"), ValueError), (dict(schedule="explicit"), ValueError), (dict(interval=0), ValueError),
    (dict(interval=2.0), TypeError), (dict(interval=True), TypeError), (dict(schedule=[]), TypeError),
    (dict(schedule=[1, 2]), ValueError), (dict(schedule=[0, True]), TypeError), (dict(schedule=[0, 1.5]), TypeError),
    (dict(schedule=[0, -1]), ValueError), (dict(schedule=None), TypeError), (dict(schedule=3), TypeError),
    (dict(schedule="quad-center", pow=1.0), ValueError), (dict(schedule="quad-center", center=-1), ValueError),
])
def test_invalid_schedules_name_what_is_valid(bad, error):
    arguments = dict(dict(schedule="uniform", interval=3), **bad)
    with pytest.raises(error, match="must|needs"):
        make_schedule(**arguments)


def test_step_count_follows_scheduler_order():
    assert step_count(50, 1) == 50
    assert step_count(19, 2) == 10  # Heun: 2N-1 evaluations for N steps
