"""Placing evaluations in denoising loops from the timesteps they are called with, unit by unit."""

import threading

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler

from fastcache import loops
from fastcache.loops import LoopTracker, locate, owning_scheduler
from fastcache.models import SD_SCHEDULER
from fastcache.schedule import Schedule


def scheduler_of(n: int, cls=DDIMScheduler):
    """A scheduler whose timesteps are ``n`` fresh values, as ``set_timesteps`` makes them."""
    scheduler = cls.from_config(SD_SCHEDULER)
    scheduler.set_timesteps(n)
    return scheduler


def place(tracker, timestep, schedulers=()):
    """Every evaluation of these tests comes from here: loops are told apart by the function calling the UNet."""
    return tracker.place(timestep, schedulers)


def steps(tracker, timesteps, schedulers=()):
    """The step each evaluation is placed at (``None``: unknown or no loop) for timesteps as a loop hands them out."""
    return [place(tracker, t, schedulers).step for t in timesteps]


def test_locate_reads_the_storage_and_index_of_an_element():
    timesteps = torch.arange(10) * 100
    for t in timesteps[4:]:  # img2img's loop: a slice of the scheduler's tensor
        storage, index = locate(t)
        assert storage.data_ptr() == timesteps.untyped_storage().data_ptr() and index == 4
        break
    assert locate(timesteps[7].expand(2))[1] == 7, "a broadcast of one element, as some pipelines pass it"
    assert [locate(t) for t in (700, 700.0, timesteps[2:4], timesteps[None, 3])] == [None] * 4
    with torch.inference_mode():  # inference tensors keep no _base; their storage still names them
        inference = torch.arange(5)
        assert locate(list(inference)[3])[1] == 3


def test_only_a_schedulers_timesteps_make_a_loop():
    """A tensor of timesteps built by hand (a validation loss over random timesteps) is no denoising loop."""
    tracker = LoopTracker(Schedule("uniform", 3))
    by_hand = torch.randint(0, 1000, (6,))
    assert steps(tracker, by_hand) == [None] * 6
    scheduler = scheduler_of(6)  # found in this frame: a hand loop's scheduler variable
    assert steps(tracker, scheduler.timesteps) == [0, 1, 2, 3, 4, 5]


def test_a_loop_continues_one_index_at_a_time_and_restarts_only_once_finished():
    tracker = LoopTracker(Schedule("uniform", 3))
    scheduler = scheduler_of(5)
    timesteps = scheduler.timesteps
    first = place(tracker, timesteps[0])
    assert first.new_loop and first.step == 0 and first.loop.full_steps == {0, 3}
    assert steps(tracker, timesteps[1:]) == [1, 2, 3, 4]
    again = place(tracker, timesteps[0])  # a second loop over one set_timesteps
    assert again.new_loop and again.loop is not first.loop
    assert steps(tracker, timesteps[1:3]) == [1, 2]


@pytest.mark.parametrize("order, expected", [([0, 1, 1], [0, 1, None, None]), ([0, 2], [0, None, None]),
                                             ([0, 1, 0], [0, 1, None, None])],
                         ids=["repeated index", "skipped index", "restart before the end"])
def test_an_unfinished_loop_that_repeats_or_skips_an_index_is_broken_for_good(order, expected):
    """A second evaluation at one timestep (MultiDiffusion views, a separate unconditional pass) cannot be told
    apart from the first: every later evaluation of that loop is full."""
    tracker = LoopTracker(Schedule("uniform", 5))
    scheduler = scheduler_of(10)
    timesteps = scheduler.timesteps
    placed = steps(tracker, [timesteps[i] for i in order] + [timesteps[order[-1] + 1]])
    assert placed == expected


def test_steps_count_from_the_first_evaluation_in_steps_of_the_scheduler_order():
    scheduler = scheduler_of(4, HeunDiscreteScheduler)
    tracker = LoopTracker(Schedule("uniform", 2))
    assert len(scheduler.timesteps) == 7
    placements = [place(tracker, t) for t in scheduler.timesteps[2:]]
    assert placements[0].loop.order == 2 and placements[0].loop.end == 7
    assert [p.step for p in placements] == [0, 0, 1, 1, 2]


def test_the_owning_scheduler_is_found_among_known_schedulers_or_in_callers_frames():
    heun = scheduler_of(3, HeunDiscreteScheduler)
    timestep = heun.timesteps[1]
    address = (timestep.device, timestep.untyped_storage().data_ptr())

    def deep_inside_a_loop(depth):
        return owning_scheduler(timestep, address) if depth == 0 else deep_inside_a_loop(depth - 1)

    assert deep_inside_a_loop(3) == (2, 5)
    ddim = scheduler_of(3)
    assert owning_scheduler(ddim.timesteps[0], address, (ddim,)) is None, "another tensor's address"
    del heun
    assert owning_scheduler(timestep, address) is None, "no scheduler owns it any more"


def test_a_thread_resumes_the_loops_it_left_where_it_left_them():
    tracker = LoopTracker(Schedule("uniform", 3))
    schedulers = scheduler_of(6), scheduler_of(6)
    a, b = (s.timesteps for s in schedulers)
    assert steps(tracker, [a[0], a[1], b[0], a[2], b[1], a[3]], schedulers) == [0, 1, 0, 2, 1, 3]


def test_a_view_evaluated_again_after_another_loop_ran_in_between_breaks_the_loop():
    """MultiDiffusion-style views of one loop, with another loop's evaluation between two views of one step."""
    tracker = LoopTracker(Schedule("uniform", 3))
    schedulers = scheduler_of(6), scheduler_of(6)
    a, b = (s.timesteps for s in schedulers)
    assert steps(tracker, [a[0], a[1], b[0], a[1], a[2]], schedulers) == [0, 1, 0, None, None]


def test_another_function_calling_at_the_next_index_does_not_continue_the_loop():
    """A look-ahead direct call from a pipeline's callback, or a second hand loop starting where the first stopped:
    its own loop, which starts with a full step; the first loop goes on where it was."""
    tracker = LoopTracker(Schedule("uniform", 3))
    scheduler = scheduler_of(6)
    timesteps = scheduler.timesteps

    def callback_calls(t):
        return tracker.place(t)

    assert steps(tracker, timesteps[:2]) == [0, 1]
    look_ahead = callback_calls(timesteps[2])
    assert look_ahead.new_loop and look_ahead.step == 0
    assert steps(tracker, timesteps[2:4]) == [2, 3]


def test_threads_have_loops_of_their_own_over_one_tensor():
    tracker = LoopTracker(Schedule("uniform", 3))
    scheduler = scheduler_of(4)
    timesteps = scheduler.timesteps
    assert steps(tracker, timesteps[:2]) == [0, 1]
    seen = []
    thread = threading.Thread(target=lambda: seen.extend(steps(tracker, timesteps, (scheduler,))))
    thread.start()
    thread.join(timeout=30)
    assert seen == [0, 1, 2, 3]
    assert steps(tracker, timesteps[2:]) == [2, 3], "the other thread's walk did not disturb this one"


def test_a_loop_without_a_schedule_raises_before_anything_changes():
    tracker = LoopTracker(Schedule("quad-center", 2, center=15))
    scheduler = scheduler_of(30)
    timesteps = scheduler.timesteps
    with pytest.raises(ValueError, match="valid intervals for 30 steps: \\[1, 3, 4"):
        place(tracker, timesteps[0])
    assert place(tracker, timesteps[20]).new_loop, "the failed evaluation started nothing"


def test_no_evaluation_is_placed_when_the_calling_function_cannot_be_told(monkeypatch, caplog):
    """A torch or diffusers whose module calls do not reach a hook as fastcache expects (simulated: the throwaway
    module's calls never do): every evaluation runs full, and a warning says why."""
    loops._module_call_machinery.cache_clear()
    monkeypatch.setattr(loops, "_probe_calls", lambda module: module.forward("forward"))
    try:
        tracker = LoopTracker(Schedule("uniform", 3))
        scheduler = scheduler_of(4)
        assert steps(tracker, scheduler.timesteps, (scheduler,)) == [None] * 4
        assert tracker.peek(scheduler.timesteps[0]) == (None, None)
        assert "cannot tell which function calls the UNet" in caplog.text
    finally:
        loops._module_call_machinery.cache_clear()
