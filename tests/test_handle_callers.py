"""Every way users drive a shared UNet, each against its oracle: a fresh DeepCache helper run, or the plain UNet.

Slower, never wrong: an evaluation that cannot be placed in a loop takes the full path, and no loop ever reads a
feature another loop or call wrote.
"""

import contextlib
import functools
import importlib.util
import shutil
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import STEPS, Img2ImgRunner, Runner, deepcache_helper, fastcache_run, helper_run, rel_l2
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.hooks import HookRegistry, ModelHook

import fastcache
from fastcache import compile_pipeline

TIMEOUT_S = 120  # every wait on another thread is bounded


@pytest.mark.parametrize("other_first", [False, True], ids=["main-first", "other-first"])
def test_from_pipe_pipelines_with_their_own_scheduler_alternate_exactly(sd_runner, other_first):
    other = sd_runner.sharing_unet(EulerDiscreteScheduler)
    expected = {id(r): helper_run(r, 3, 0) for r in (sd_runner, other)}
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    calls = [other, sd_runner] * 2 if other_first else [sd_runner, other] * 2
    for runner in calls:
        assert rel_l2(runner(), expected[id(runner)]) < 1e-5
    assert handle.counters.full == 4 * 4 and handle.counters.unplaced == 0


@pytest.mark.parametrize("img2img_first", [False, True], ids=["txt2img-first", "img2img-first"])
def test_hires_fix_img2img_with_its_own_scheduler_alternates_exactly(sd_runner, img2img_first):
    img2img = Img2ImgRunner(sd_runner, DPMSolverMultistepScheduler)
    expected = {id(r): helper_run(r, 3, 2) for r in (sd_runner, img2img)}
    compile_pipeline(sd_runner.pipe, 3, 2, compile=False)
    calls = [img2img, sd_runner] * 2 if img2img_first else [sd_runner, img2img] * 2
    for runner in calls:
        assert rel_l2(runner(), expected[id(runner)]) < 1e-5


def unet_inputs(runner: Runner, timestep) -> dict:
    """A direct call at the shape the pipeline uses (batch 2 for guidance), so it meets the pipeline's buffer."""
    generator = torch.Generator().manual_seed(5)
    return dict(sample=torch.randn(2, 4, 16, 16, generator=generator), timestep=timestep,
                encoder_hidden_states=runner.embeds["prompt_embeds"].repeat(2, 1, 1))


@torch.no_grad()
def test_direct_unet_calls_are_the_plain_unet_before_between_and_after_pipeline_calls(sd_runner):
    unet = sd_runner.pipe.unet
    expected = helper_run(sd_runner, 3, 0)
    timesteps = [torch.tensor(501), 501, torch.tensor([501, 501])]
    plain = [unet(**unet_inputs(sd_runner, t)).sample for t in timesteps]
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)

    def direct_calls_are_plain():
        outputs = [unet(**unet_inputs(sd_runner, t)).sample for t in timesteps]
        return all(torch.equal(out, p) for out, p in zip(outputs, plain, strict=True))

    assert direct_calls_are_plain()
    assert rel_l2(sd_runner(), expected) < 1e-5
    assert direct_calls_are_plain() and direct_calls_are_plain()
    assert rel_l2(sd_runner(), expected) < 1e-5
    assert direct_calls_are_plain()
    assert handle.counters.unplaced == 4 * len(timesteps)


def test_a_direct_call_from_a_callback_inside_the_loop_changes_nothing(sd_runner):
    expected = helper_run(sd_runner, 3, 0)
    unet = sd_runner.pipe.unet

    def direct_call(pipe, step, timestep, kwargs):
        unet(**unet_inputs(sd_runner, torch.tensor(7)))
        return kwargs

    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    assert rel_l2(sd_runner(callback_on_step_end=direct_call), expected) < 1e-5
    assert handle.counters.unplaced == STEPS and handle.counters.restores == 6, "every shallow step got its own back"


@contextlib.contextmanager
def eager_handle(pipe, compile=compile_pipeline):
    handle = compile(pipe, 3, 0, compile=False)
    try:
        yield handle
    finally:
        handle.disable()


def run_with_look_ahead(runner: Runner, attach=eager_handle, steps: int = STEPS):
    """The pipeline, with ``attach(pipe)`` entered, and a callback that evaluates the UNet at the next timestep of the
    pipeline's own schedule (a view): a loop of the callback's own, not the pipeline's next step. Each loop displaces
    the other's feature in this one thread, so every step is full: the pipeline gives the plain result, and each
    look-ahead call is the plain UNet. Slower, never wrong."""
    unet, scheduler = runner.pipe.unet, runner.pipe.scheduler
    plain, looked_ahead = runner(steps=steps), []

    def look_ahead(pipe, step, timestep, kwargs):
        if step + 1 < len(scheduler.timesteps):
            inputs = unet_inputs(runner, scheduler.timesteps[step + 1])
            looked_ahead.append((unet(**inputs).sample, inputs))
        return kwargs

    with attach(runner.pipe) as handle:
        assert torch.equal(runner(steps=steps, callback_on_step_end=look_ahead), plain)
    assert handle.counters.shallow == 0 and len(looked_ahead) == steps - 1
    assert all(torch.equal(out, unet(**inputs).sample) for out, inputs in looked_ahead)


@torch.no_grad()
def test_a_look_ahead_call_from_a_callback_is_the_plain_unet_and_never_feeds_the_pipeline(sd_runner):
    run_with_look_ahead(sd_runner)


def relocated_fastcache(folder: Path):
    """This fastcache, loaded under another name from two folders: its package path spans both, the loop tracker and
    the dispatcher in one, the rest in the other. Files moved, code unchanged."""
    source = Path(fastcache.__file__).parent
    name = f"fastcache_relocated_{folder.name}"
    first, second = folder / "site" / name, folder / "elsewhere" / "parts"
    for part in (first, second):
        part.mkdir(parents=True)
    for path in source.glob("*.py"):
        shutil.copy(path, (second if path.name in ("loops.py", "dispatch.py") else first) / path.name)
    spec = importlib.util.spec_from_file_location(name, first / "__init__.py",
                                                  submodule_search_locations=[str(first), str(second)])
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    spec.loader.exec_module(package)
    loops, handle = (importlib.import_module(f"{name}.{module}") for module in ("loops", "handle"))  # a lazy package
    assert Path(loops.__file__).parent != Path(handle.__file__).parent
    return package


class PassThrough(ModelHook):
    """A hook of the user's own, in the user's own file, around the UNet's forward (diffusers' hooks chain)."""

    def new_forward(self, module, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)


@contextlib.contextmanager
def with_a_users_hook_inside(pipe):
    """fastcache, then a hook of the user's registered after it: its frames lie between the UNet call and fastcache's
    hook. (It is removed first: diffusers' remove_hook does not rewire a later hook's ``original_forward``.)"""
    with eager_handle(pipe) as handle:
        registry = HookRegistry.check_if_exists_or_initialize(pipe.unet)
        registry.register_hook(PassThrough(), "users-own")
        try:
            yield handle
        finally:
            registry.remove_hook("users-own", recurse=False)


@contextlib.contextmanager
def with_a_torch_hook(pipe):
    """fastcache with a torch forward hook on the UNet, which sends torch's module call down another path."""
    hook = pipe.unet.register_forward_hook(lambda module, args, output: None)
    try:
        with eager_handle(pipe) as handle:
            yield handle
    finally:
        hook.remove()


@torch.no_grad()
@pytest.mark.parametrize("layout", ["fastcache-in-two-folders", "a-users-hook-on-the-unet", "a-torch-hook"])
def test_calls_are_placed_the_same_whatever_the_file_layout_and_the_other_hooks(sd_runner, layout, tmp_path):
    """Which loop an evaluation joins is read from the function that calls the UNet, never from file paths or from
    what else hooks the UNet: the pipeline's own evaluations cache exactly, a callback's look-ahead does not join."""
    steps = 4
    expected = helper_run(sd_runner, 3, 0, steps=steps)
    attach = {"a-users-hook-on-the-unet": with_a_users_hook_inside, "a-torch-hook": with_a_torch_hook}.get(layout)
    if layout == "fastcache-in-two-folders":
        attach = functools.partial(eager_handle, compile=relocated_fastcache(tmp_path).compile_pipeline)
    with attach(sd_runner.pipe) as handle:
        assert rel_l2(sd_runner(steps=steps), expected) < 1e-5
    assert (handle.counters.full, handle.counters.shallow, handle.counters.unplaced) == (2, 2, 0)
    run_with_look_ahead(sd_runner, attach, steps)


@torch.no_grad()
def test_direct_calls_at_random_timesteps_of_a_hand_made_tensor_are_the_plain_unet(sd_runner):
    """A validation loss over random timesteps: one tensor of them, but no scheduler's, so no denoising loop."""
    unet = sd_runner.pipe.unet
    timesteps = torch.randint(0, 1000, (6,), generator=torch.Generator().manual_seed(0))
    plain = [unet(**unet_inputs(sd_runner, t)).sample for t in timesteps]
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    assert all(torch.equal(unet(**unet_inputs(sd_runner, t)).sample, p) for t, p in zip(timesteps, plain,
                                                                                          strict=True))
    assert handle.counters.unplaced == 6


def test_inference_mode_caches_like_no_grad(sd_runner):
    expected = helper_run(sd_runner, 3, 0)
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    with torch.inference_mode():
        assert rel_l2(sd_runner(), expected) < 1e-5
    assert handle.counters.shallow == 6


def hand_loop(runner: Runner, timesteps_of=lambda scheduler: scheduler.timesteps, samples: int = 1, seed: int = 0,
              forward: bool = False):
    """A hand-written denoising loop with guidance, ``samples`` latents stepped per timestep (MultiDiffusion-style
    views when more than one); ``forward``: it calls ``unet.forward`` directly, not the module."""
    pipe, embeds = runner.pipe, runner.embeds
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(seed)
    latents = [torch.randn(1, 4, 16, 16, generator=generator) * scheduler.init_noise_sigma for _ in range(samples)]
    context = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    with torch.no_grad():
        for t in timesteps_of(scheduler):
            for i, x in enumerate(latents):
                model_input = scheduler.scale_model_input(torch.cat([x] * 2), t)
                unet = pipe.unet.forward if forward else pipe.unet
                uncond, cond = unet(model_input, t, encoder_hidden_states=context).sample.chunk(2)
                latents[i] = scheduler.step(uncond + 7.5 * (cond - uncond), t, x).prev_sample
    return torch.cat(latents)


def test_a_hand_written_loop_equals_the_helper_and_can_loop_twice(sd_runner):
    with deepcache_helper(sd_runner.pipe, 3, 1):
        expected = hand_loop(sd_runner)
    handle = compile_pipeline(sd_runner.pipe, 3, 1, compile=False)
    first = hand_loop(sd_runner)
    assert rel_l2(first, expected) < 1e-5

    def twice(scheduler):  # two loops over one set_timesteps: the second starts afresh
        yield from scheduler.timesteps
        yield from scheduler.timesteps

    doubled = hand_loop(sd_runner, twice)
    assert handle.counters.full == 3 * 4
    handle.disable()
    with deepcache_helper(sd_runner.pipe, 3, 1):  # its index lookup restarts at step 0 with the second loop too
        expected_twice = hand_loop(sd_runner, twice)
    assert rel_l2(doubled, expected_twice) < 1e-5


def test_a_hand_written_loop_calling_forward_directly_equals_the_helper(sd_runner):
    """No module call on the way: the caller is the first function outside fastcache and diffusers' hook registry."""
    with deepcache_helper(sd_runner.pipe, 3, 1):
        expected = hand_loop(sd_runner, forward=True)
    handle = compile_pipeline(sd_runner.pipe, 3, 1, compile=False)
    assert rel_l2(hand_loop(sd_runner, forward=True), expected) < 1e-5
    assert (handle.counters.shallow, handle.counters.unplaced) == (6, 0)


@pytest.mark.parametrize("case", ["python-int timesteps", "two samples per timestep"])
def test_loops_that_cannot_be_followed_run_every_step_full(sd_runner, case):
    """Timesteps as numbers place nothing; two evaluations per timestep break the loop after the first step."""
    kwargs = dict(timesteps_of=lambda s: s.timesteps.tolist()) if case.startswith("python") else dict(samples=2)
    plain = hand_loop(sd_runner, **kwargs)
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    assert torch.equal(hand_loop(sd_runner, **kwargs), plain)
    assert handle.counters.shallow == 0


def run_in_lockstep(runners, staggered: bool = False, **kwargs) -> list[torch.Tensor]:
    """Call each runner in its own thread, all advancing one denoising step at a time, so their UNet evaluations
    interleave; every wait is bounded. ``staggered``: each runner starts once the one before it finished its first
    step (runners sharing one scheduler object: the next call's ``set_timesteps`` replaces its ``timesteps``)."""
    barrier = threading.Barrier(len(runners), timeout=TIMEOUT_S)
    results, errors = [None] * len(runners), []
    first_step = [threading.Event() for _ in runners]

    def step_together(i, pipe, step, timestep, callback_kwargs):
        first_step[i].set()
        barrier.wait()
        return callback_kwargs

    def work(i):
        try:
            if staggered and i > 0 and not first_step[i - 1].wait(TIMEOUT_S):
                raise TimeoutError(f"runner {i - 1} did not finish its first step in time")
            results[i] = runners[i](callback_on_step_end=functools.partial(step_together, i), **kwargs)
        except Exception as error:  # noqa: BLE001 - reported below, in the test's thread
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(runners))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish in time"
    assert not errors, errors
    return results


def test_threads_sharing_the_unet_through_from_pipe_get_exactly_their_own_results(sd_runner):
    other = sd_runner.sharing_unet(DDIMScheduler)  # int timesteps like the first one's: both use one buffer
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    alone = [sd_runner(seed=1), other(seed=2)]
    together = run_in_lockstep([lambda **kw: sd_runner(seed=1, **kw), lambda **kw: other(seed=2, **kw)])
    assert all(torch.equal(t, a) for t, a in zip(together, alone, strict=True))
    # in each of the 6 shallow steps at least the second thread to evaluate found the other's feature in the buffer
    assert handle.counters.restores >= 6


def test_two_threads_calling_one_pipeline_get_exactly_their_own_results(sd_runner):
    """One pipeline object (its scheduler shared) from two threads: diffusers' DDIM keeps no per-call state that
    differs between two calls of the same settings, so only fastcache's state could mix them up."""
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    alone = [sd_runner(seed=1), sd_runner(seed=2)]
    # staggered: otherwise the second call's set_timesteps may replace the shared scheduler's timesteps before the
    # first call's first UNet evaluation, whose loop then has no owning scheduler and runs full (slower, not wrong)
    together = run_in_lockstep([lambda **kw: sd_runner(seed=1, **kw), lambda **kw: sd_runner(seed=2, **kw)],
                               staggered=True)
    assert all(torch.equal(t, a) for t, a in zip(together, alone, strict=True))
    assert handle.counters.restores >= 6


def test_separate_pipelines_in_separate_threads_stay_exact():
    runners = [Runner("tiny-sd"), Runner("tiny-sdxl")]
    expected = [fastcache_run(r, 3, 0) for r in runners]
    for r in runners:
        compile_pipeline(r.pipe, 3, 0, compile=False)
    together = run_in_lockstep(runners)
    assert all(torch.equal(t, e) for t, e in zip(together, expected, strict=True))


def test_quad_center_interval_one_is_the_plain_pipeline_and_a_missing_schedule_fails_before_the_unet(sd_runner):
    plain = sd_runner(steps=30)
    handle = compile_pipeline(sd_runner.pipe, 1, 0, schedule="quad-center", compile=False)
    assert torch.equal(sd_runner(steps=30), plain)
    handle.disable()
    handle = compile_pipeline(sd_runner.pipe, 2, 0, schedule="quad-center", center=15, compile=False)
    with pytest.raises(ValueError, match=r"no schedule for 30 steps at interval 2 .* valid intervals .*\[1, 3, 4"):
        sd_runner(steps=30)
    assert handle.counters.full + handle.counters.shallow == 0, "raised before any UNet work"
    sd_runner(steps=50)
    assert handle.counters.full == 25
