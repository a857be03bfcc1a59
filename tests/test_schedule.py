import pytest

from fastcache.schedule import Schedule, make_schedule, quad_center_steps, step_count


def test_uniform_is_every_interval_from_zero():
    assert sorted(Schedule("uniform", 3).full_steps(10)) == [0, 3, 6, 9]
    assert sorted(Schedule("uniform", 1).full_steps(4)) == [0, 1, 2, 3]


def test_quad_center_matches_the_published_list():
    assert quad_center_steps(50, 10, 15, 1.4) == [0, 5, 9, 13, 17, 21, 26, 31, 37, 43]
    assert sorted(make_schedule("quad-center", 5, center=15, pow=1.4).full_steps(50)) == [
        0, 5, 9, 13, 17, 21, 26, 31, 37, 43]


def test_quad_center_lowers_pow_until_the_count_fits():
    steps = quad_center_steps(25, 8, 15, 1.4)
    assert len(steps) == 8 and steps[0] == 0 and steps == sorted(set(steps))


def test_explicit_list():
    assert sorted(make_schedule([0, 4, 7], 3).full_steps(6)) == [0, 4]


@pytest.mark.parametrize("bad", [dict(kind="nope"), dict(interval=0), dict(interval=2.0),
                                 dict(kind="explicit", steps=()), dict(kind="explicit", steps=(1, 2)),
                                 dict(kind="quad-center", pow=1.0)])
def test_invalid_schedules_name_what_is_valid(bad):
    with pytest.raises(ValueError, match="must|needs"):
        Schedule(**bad)


def test_step_count_follows_scheduler_order():
    assert step_count(50, 1) == 50
    assert step_count(19, 2) == 10  # Heun: 2N-1 evaluations for N steps
