"""Placing evaluations in denoising loops from the timesteps they are called with, unit by unit."""

import threading

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler

from fastcache.loops import LoopTracker, locate, scheduler_order
from fastcache.models import SD_SCHEDULER
from fastcache.schedule import Schedule


def steps(tracker, timesteps):
    """The step each evaluation is placed at (``None``: unknown) for timesteps as a loop hands them out."""
    return [tracker.place(t).step for t in timesteps]


def test_locate_reads_the_tensor_and_index_from_a_view():
    timesteps = torch.arange(10) * 100
    for t in timesteps[4:]:  # img2img's loop: a slice of the scheduler's tensor
        assert locate(t)[0] is timesteps and locate(t)[1] == 4
        break
    assert locate(timesteps[7].expand(2))[1] == 7, "a broadcast of one element, as some pipelines pass it"
    assert [locate(t) for t in (700, timesteps[7].clone(), torch.tensor(700), timesteps[2:4])] == [None] * 4
    assert locate(timesteps.float()[7])[0] is not timesteps, "a copy names its own tensor, never the scheduler's"


def test_a_loop_continues_one_index_at_a_time_and_restarts_only_once_finished():
    tracker = LoopTracker(Schedule("uniform", 3))
    timesteps = torch.arange(5)
    first = tracker.place(timesteps[0])
    assert first.new_loop and first.step == 0 and first.loop.full_steps == {0, 3}
    assert steps(tracker, timesteps[1:]) == [1, 2, 3, 4]
    again = tracker.place(timesteps[0])  # a second loop over one set_timesteps
    assert again.new_loop and again.loop is not first.loop
    assert steps(tracker, timesteps[1:3]) == [1, 2]


@pytest.mark.parametrize("order, expected", [([0, 1, 1], [0, 1, None, None]), ([0, 2], [0, None, None]),
                                             ([0, 1, 0], [0, 1, None, None])],
                         ids=["repeated index", "skipped index", "restart before the end"])
def test_an_unfinished_loop_that_repeats_or_skips_an_index_is_broken_for_good(order, expected):
    """A second evaluation at one timestep (MultiDiffusion views, a separate unconditional pass) cannot be told
    apart from the first: every later evaluation of that loop is full."""
    tracker = LoopTracker(Schedule("uniform", 5))
    timesteps = torch.arange(10)
    placed = [tracker.place(timesteps[i]).step for i in order] + [tracker.place(timesteps[order[-1] + 1]).step]
    assert placed == expected


def test_steps_count_from_the_first_evaluation_in_steps_of_the_scheduler_order():
    scheduler = HeunDiscreteScheduler.from_config(SD_SCHEDULER)
    scheduler.set_timesteps(4)
    tracker = LoopTracker(Schedule("uniform", 2))
    assert len(scheduler.timesteps) == 7
    placements = [tracker.place(t) for t in scheduler.timesteps[2:]]  # found through this frame's `scheduler`
    assert placements[0].loop.order == 2
    assert [p.step for p in placements] == [0, 0, 1, 1, 2]


def test_the_scheduler_order_is_found_among_known_schedulers_or_in_callers_frames():
    heun = HeunDiscreteScheduler.from_config(SD_SCHEDULER)
    heun.set_timesteps(3)
    timesteps = heun.timesteps

    def deep_inside_a_loop(depth):
        return scheduler_order(timesteps) if depth == 0 else deep_inside_a_loop(depth - 1)

    assert deep_inside_a_loop(3) == 2
    del heun
    assert scheduler_order(timesteps) == 1, "no scheduler owns it any more: one evaluation per step"
    ddim = DDIMScheduler.from_config(SD_SCHEDULER)
    ddim.set_timesteps(3)
    assert scheduler_order(ddim.timesteps, (ddim,)) == 1


def test_a_thread_resumes_the_loops_it_left_where_it_left_them():
    tracker = LoopTracker(Schedule("uniform", 3))
    a, b = torch.arange(6), torch.arange(6)
    assert steps(tracker, [a[0], a[1], b[0], a[2], b[1], a[3]]) == [0, 1, 0, 2, 1, 3]


def test_a_view_evaluated_again_after_another_loop_ran_in_between_breaks_the_loop():
    """MultiDiffusion-style views of one loop, with another loop's evaluation between two views of one step."""
    tracker = LoopTracker(Schedule("uniform", 3))
    a, b = torch.arange(6), torch.arange(6)
    assert steps(tracker, [a[0], a[1], b[0], a[1], a[2]]) == [0, 1, 0, None, None]


def test_threads_have_loops_of_their_own_over_one_tensor():
    tracker = LoopTracker(Schedule("uniform", 3))
    timesteps = torch.arange(4)
    assert steps(tracker, timesteps[:2]) == [0, 1]
    seen = []
    thread = threading.Thread(target=lambda: seen.extend(steps(tracker, timesteps)))
    thread.start()
    thread.join(timeout=30)
    assert seen == [0, 1, 2, 3]
    assert steps(tracker, timesteps[2:]) == [2, 3], "the other thread's walk did not disturb this one"


def test_a_loop_without_a_schedule_raises_before_anything_changes():
    tracker = LoopTracker(Schedule("quad-center", 2, center=15))
    timesteps = torch.arange(30)
    with pytest.raises(ValueError, match="valid intervals for 30 steps: \\[1, 3, 4"):
        tracker.place(timesteps[0])
    assert tracker.place(timesteps[20]).new_loop, "the failed evaluation started nothing"
