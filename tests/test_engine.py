"""The serving engine: batching, per-image seeds, padding to warmed batch sizes, queue limits, draining."""

import threading

import numpy as np
import pytest
from conftest import rel_l2, wait_until

from fastcache import compile_pipeline
from fastcache.models import build_pipeline
from fastcache.serving.engine import Engine, EngineConfig, QueueFull, ShuttingDown
from fastcache.serving.request import ImageRequest, InvalidRequest, pipeline_kwargs

SIZE = 32
STEPS = 4


@pytest.fixture(scope="module")
def cached():
    """The tiny pipeline with an eager handle at interval 2 (the server's level)."""
    pipe = build_pipeline("tiny-sd")
    handle = compile_pipeline(pipe, 2, 0, compile=False)
    yield pipe, handle
    handle.disable()


@pytest.fixture(scope="module")
def pipe(cached):
    return cached[0]


def request(prompt="a cat", n=1, seed=0, guidance=7.5, size=SIZE, steps=STEPS, negative="", **fields):
    return ImageRequest(prompt, size, size, steps, guidance, n=n, seed=seed, negative_prompt=negative, **fields)


def direct(pipe, req: ImageRequest) -> np.ndarray:
    """The request as one plain pipeline call of its own (no batching, no padding)."""
    return pipe(**pipeline_kwargs(pipe, [req])).images


def test_a_batch_of_requests_gives_each_its_own_images(pipe):
    batches = []
    engine = Engine(pipe, EngineConfig(batch_sizes=(1, 2, 4), sizes=((SIZE, SIZE),), steps=STEPS),
                    on_batch=lambda images, padded: batches.append((images, padded)))
    first, second = request("a cat", n=1, seed=5), request("a dog", n=2, seed=7, negative="blurry")
    results = engine.run([first, second])
    assert batches == [(3, 4)]  # three images, padded to the warmed batch of four
    assert [len(images) for images in results] == [1, 2]
    for req, images in zip((first, second), results, strict=True):
        expected = direct(pipe, req)
        for got, want in zip(images, expected, strict=True):
            assert rel_l2(got, want) < 1e-4
    # image i of a request is seed + i: the second image is the one-image request with seed 8
    alone = direct(pipe, request("a dog", seed=8, negative="blurry"))[0]
    assert rel_l2(results[1][1], alone) < 1e-4
    assert rel_l2(results[1][0], alone) > 0.01  # and not the first one


def test_same_prompt_and_seed_same_image_different_seed_different_image(pipe):
    engine = Engine(pipe, EngineConfig(batch_sizes=(2,), sizes=((SIZE, SIZE),), steps=STEPS))
    a, b, c = engine.run([request(seed=1), request(seed=1)])[0][0], *(
        images[0] for images in engine.run([request(seed=1), request(seed=2)]))
    assert rel_l2(a, b) < 1e-5 and rel_l2(a, c) > 0.01


def test_concurrent_submissions_are_batched_and_exact(pipe):
    batches = []
    config = EngineConfig(batch_sizes=(1, 2, 4), sizes=((SIZE, SIZE),), steps=STEPS, max_delay_ms=1000)
    engine = Engine(pipe, config, on_batch=lambda images, padded: batches.append(images)).start()
    requests = [request(f"prompt {i}", seed=100 + i) for i in range(8)]
    try:
        threads = [threading.Thread(target=engine.submit, args=(r,)) for r in requests]
        for thread in threads:
            thread.start()
        images = [r.future.result(timeout=120)[0] for r in requests]
    finally:
        engine.stop(timeout=60)
    assert sum(batches) == 8 and max(batches) > 1  # batching happened
    for req, got in zip(requests, images, strict=True):
        assert rel_l2(got, direct(pipe, req)[0]) < 1e-4


def test_only_requests_with_the_same_size_steps_guidance_and_negative_kind_share_a_call(pipe):
    calls = []
    config = EngineConfig(batch_sizes=(1, 4), sizes=((SIZE, SIZE),), steps=STEPS, max_delay_ms=500)
    engine = Engine(pipe, config, on_batch=lambda images, padded: calls.append((images, padded)))
    for req in (request(seed=1), request(steps=3), request(guidance=5.0), request(seed=2), request(negative="x"),
                request(negative="y")):
        engine.submit(req)
    engine.start().stop(timeout=120)
    assert sorted(calls) == [(1, 1), (1, 1), (2, 4), (2, 4)]


@pytest.mark.parametrize("bad, param", [
    (dict(n=5), "n"), (dict(n=0), "n"), (dict(steps=0), "num_inference_steps"), (dict(steps=51), "num_inference_steps"),
    (dict(size=64), "size"), (dict(size=36), "size"), (dict(guidance=1.0), "guidance_scale"),
])
def test_requests_outside_the_warmed_buckets_are_refused_naming_what_is_served(pipe, bad, param):
    engine = Engine(pipe, EngineConfig(batch_sizes=(1, 4), sizes=((SIZE, SIZE),), steps=STEPS, max_steps=50))
    with pytest.raises(InvalidRequest) as error:
        engine.submit(request(**bad))
    assert error.value.param == param
    assert engine.queue_depth == 0


def test_on_demand_serves_unwarmed_sizes_within_bounds(pipe):
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=STEPS, on_demand=True, max_size=64))
    engine.check(request(size=48))
    for size in (0, 36, 72):
        with pytest.raises(InvalidRequest, match="multiples of 8 pixels, from 8 to 64"):
            engine.check(request(size=size))


def test_a_request_cancelled_while_queued_is_dropped_and_the_engine_keeps_serving(pipe):
    served = []
    engine = Engine(pipe, EngineConfig(batch_sizes=(1, 2), sizes=((SIZE, SIZE),), steps=STEPS),
                    on_batch=lambda images, padded: served.append(images))
    gone, kept = engine.submit(request(seed=1)), engine.submit(request(seed=2))
    assert gone.cancel()  # its client disconnected
    engine.start()
    try:
        assert len(kept.result(timeout=120)) == 1
        assert served == [1] and engine.alive
        assert len(engine.submit(request(seed=3)).result(timeout=120)) == 1
    finally:
        engine.stop(timeout=60)


def test_a_request_that_breaks_its_batch_fails_alone(pipe):
    engine = Engine(pipe, EngineConfig(batch_sizes=(1, 4), sizes=((SIZE, SIZE),), steps=STEPS, max_delay_ms=1000))
    good = [request("fine", seed=i) for i in range(2)]
    bad = request("fails")
    bad.prompt = "\ud800"  # a lone surrogate, put past the request's own check: no text encoding takes it
    futures = [engine.submit(r) for r in (good[0], bad, good[1])]
    engine.start()
    try:
        with pytest.raises(UnicodeEncodeError):
            futures[1].result(timeout=120)
        images = [future.result(timeout=120)[0] for future in (futures[0], futures[2])]
        assert engine.alive
    finally:
        engine.stop(timeout=60)
    # direct calls only now: a pipeline object's scheduler is per call, so one thread at a time drives it
    for req, image in zip(good, images, strict=True):
        assert rel_l2(image, direct(pipe, req)[0]) < 1e-4


def test_a_full_queue_refuses_and_a_stopping_engine_drains(pipe):
    engine = Engine(pipe, EngineConfig(batch_sizes=(1, 2), sizes=((SIZE, SIZE),), steps=STEPS, max_queue=3))
    queued = [request(seed=1, n=2), request(seed=2)]
    for req in queued:
        engine.submit(req)
    with pytest.raises(QueueFull):
        engine.submit(request(seed=3))
    assert engine.queue_depth == 3  # images
    engine.start().stop(timeout=120)  # drains: both answered before the thread ends
    assert [len(req.future.result(timeout=0)) for req in queued] == [2, 1]
    with pytest.raises(ShuttingDown):
        engine.submit(request())


def test_a_failing_batch_fails_its_requests_and_the_engine_keeps_serving(pipe, monkeypatch):
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=STEPS, max_delay_ms=0)).start()
    try:
        original = engine.run
        monkeypatch.setattr(engine, "run", lambda requests: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            engine.submit(request()).result(timeout=60)
        monkeypatch.setattr(engine, "run", original)
        assert len(engine.submit(request()).result(timeout=120)) == 1
    finally:
        engine.stop(timeout=60)


def test_warm_up_runs_every_bucket_and_serves_a_failed_compile_eagerly(monkeypatch):
    pipe = build_pipeline("tiny-sd")
    handle = compile_pipeline(pipe, 2, 0, compile=True)

    def fail_at_batch_four(**inputs):  # stands in for the compiled full path: inductor fails at one shape
        if inputs["sample"].shape[0] == 4:
            raise RuntimeError("compilation failed")
        return handle.paths.eager(True, inputs)

    monkeypatch.setattr(handle.paths, "full", fail_at_batch_four)
    monkeypatch.setattr(handle.paths, "shallow", lambda **inputs: handle.paths.eager(False, inputs))
    config = EngineConfig(batch_sizes=(1, 2), sizes=((SIZE, SIZE),), guidance=(True, False), steps=3, edits=())
    engine = Engine(pipe, config, handle)
    try:
        seconds = engine.warm_up(progress=False)
        assert list(seconds) == config.buckets() and len(seconds) == 4
        # batch 2 with guidance is 4 UNet samples, whose full path failed to compile: served eagerly
        assert [str(b) for b in engine.eager_buckets] == ["batch 2, 32x32, guidance on"]
        assert handle.counters.compile_failures == 1
        got = np.stack(engine.run([request(n=2, seed=9)])[0])
    finally:
        handle.disable()
    eager = compile_pipeline(pipe, 2, 0, compile=False)
    try:
        expected = pipe(**pipeline_kwargs(pipe, [request(n=2, seed=9)])).images
    finally:
        eager.disable()
    assert rel_l2(got, expected) < 1e-5


@pytest.mark.parametrize("fields, message", [
    (dict(batch_sizes=()), "batch_sizes must be integers >= 1"),
    (dict(batch_sizes=(1, 0)), "batch_sizes must be integers >= 1"),
    (dict(sizes=((30, 32),)), "sizes must be multiples of 8 pixels for this model; got 30x32"),
    (dict(sizes=((32, 32),), pixel_multiple=64), "sizes must be multiples of 64 pixels for this model; got 32x32"),
    (dict(sizes=((32, 32),), max_size=16), "max_size must be at least 8 and the largest of sizes"),
    (dict(sizes=((4096, 4096),)), "max_size must be at least 8 and the largest of sizes"),
    (dict(guidance=(True, True)), "guidance must be True, False or both"),
    (dict(guidance=("on",)), "guidance must be True, False or both"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(steps=30, max_steps=20), "max_steps must be >= steps (30)"),
    (dict(batch_sizes=(1, 8), max_queue=4), "max_queue must be at least the largest batch size (8)"),
    (dict(max_delay_ms=float("nan")), "max_delay_ms must be a finite number from 0 to 60000"),
    (dict(max_delay_ms=-1), "max_delay_ms must be a finite number from 0 to 60000"),
    (dict(edits=("outpaint",)), "edits must be some of ('img2img', 'inpaint')"),
    (dict(edits=("inpaint", "inpaint")), "edits must be some of"),
    (dict(intervals=(1, 0)), "intervals must be integers >= 1"),
    (dict(intervals=(2.0,)), "intervals must be integers >= 1"),
])
def test_an_engine_config_checks_itself_naming_the_field(fields, message):
    with pytest.raises(ValueError) as error:
        EngineConfig(**fields)
    assert str(error.value).startswith(message), error.value


def test_an_engine_config_normalises_what_it_holds():
    config = EngineConfig(batch_sizes=[4, 1, 4], sizes=[[32, 32], (32, 32)], guidance=[True, False])
    assert (config.batch_sizes, config.sizes, config.guidance) == ((1, 4), ((32, 32),), (True, False))
    assert hash(config) == hash(EngineConfig(batch_sizes=(1, 4), sizes=((32, 32),), guidance=(True, False)))


def test_cache_levels_batch_apart_and_each_image_equals_a_direct_call_at_its_interval(cached):
    pipe, handle = cached
    calls = []
    config = EngineConfig(batch_sizes=(1, 4), sizes=((SIZE, SIZE),), steps=STEPS, max_delay_ms=500,
                          intervals=(1, 2, 3), edits=())
    engine = Engine(pipe, config, handle, on_batch=lambda images, padded: calls.append(images))
    assert engine.levels == (1, 2, 3) and engine.default_interval == 2
    levels = [None, 2, 1, 3]  # None: the server's level, which batches with requests that name it
    futures = [engine.submit(request(seed=3, interval=level)) for level in levels]
    with pytest.raises(InvalidRequest) as error:
        engine.submit(request(interval=5))
    assert error.value.param == "cache" and "this server serves 3 levels (1, 2, 3)" in str(error.value)
    engine.start().stop(timeout=120)
    assert sorted(calls) == [1, 1, 2]
    images = {level: future.result(timeout=0)[0] for level, future in zip(levels, futures, strict=True)}
    assert handle.config.interval == 2, "a request's level does not outlive its call"
    assert rel_l2(images[None], direct(pipe, request(seed=3))[0]) < 1e-4
    handle.disable()
    try:
        assert rel_l2(images[1], direct(pipe, request(seed=3))[0]) < 1e-4, "interval 1: the plain pipeline"
        other = compile_pipeline(pipe, 3, 0, compile=False)
        assert rel_l2(images[3], direct(pipe, request(seed=3))[0]) < 1e-4
        other.disable()
    finally:
        handle.enable()
    assert rel_l2(images[3], images[2]) > 1e-3 and rel_l2(images[1], images[2]) > 1e-3  # the level mattered


def test_cache_levels_and_edit_strengths_run_on_the_warm_graphs_without_compiling():
    """The interval decides which steps are full and the strength how many run: neither changes a graph."""
    import torch
    from torch._dynamo.utils import counters as dynamo

    from fastcache.serving.edits import warmup_inputs

    pipe = build_pipeline("tiny-sd")
    handle = compile_pipeline(pipe, 2, 0)
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=STEPS, intervals=(1, 2, 3)), handle)
    try:
        before = dynamo["stats"]["unique_graphs"]
        engine.warm_up(progress=False)  # text-to-image, img2img and inpainting share the UNet's one shape
        compiles, graphs, shallow = handle.counters.compiles, dynamo["stats"]["unique_graphs"], handle.counters.shallow
        assert compiles == graphs - before == 2 and not engine.eager_buckets, "img2img's latents compiled again"
        image, mask = warmup_inputs(SIZE, SIZE)
        plain = engine.run([request(seed=4, interval=1)])[0][0]
        for level in (1, 2, 3):
            engine.run([request(seed=5, interval=level)])
            for strength in (0.3, 1.0):
                engine.run([request(seed=5, interval=level, image=image, strength=strength)])
                engine.run([request(seed=5, interval=level, image=image, mask=mask, strength=strength)])
        assert (handle.counters.compiles, dynamo["stats"]["unique_graphs"]) == (compiles, graphs)
        assert handle.counters.compile_failures == handle.counters.fallbacks == 0
        assert handle.counters.shallow > shallow, "cached levels still take the shallow path"
    finally:
        handle.disable()
    with torch.no_grad():
        assert rel_l2(plain, direct(pipe, request(seed=4))[0]) < 1e-4, "compiled interval 1: the plain pipeline"


def test_an_explicit_schedule_serves_no_cache_level_and_runs_as_it_is():
    pipe = build_pipeline("tiny-sd")
    handle = compile_pipeline(pipe, 3, 0, schedule=[0, 2], compile=False)
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=STEPS, edits=()), handle)
    try:
        assert engine.levels == ()
        with pytest.raises(InvalidRequest, match=r"serves no level \(no cache here\)"):
            engine.check(request(interval=3))
        engine.submit(request())
        engine.start().stop(timeout=120)
        assert (handle.counters.full, handle.counters.shallow) == (2, 2)
    finally:
        handle.disable()


def test_jobs_and_batches_take_turns_on_the_worker_thread(pipe):
    order = []
    engine = Engine(pipe, EngineConfig(batch_sizes=(1,), sizes=((SIZE, SIZE),), steps=2, max_delay_ms=0),
                    on_batch=lambda images, padded: order.append("batch"))
    gate = threading.Event()
    engine.start()
    try:
        blocker = engine.run_on_worker(lambda: (gate.wait(60), order.append("job 0")))
        wait_until(blocker.running, 30, "the first job's start")
        jobs = [engine.run_on_worker(lambda i=i: order.append(f"job {i}") or i) for i in (1, 2)]
        images = [engine.submit(request(steps=2 + i)) for i in range(2)]  # two steps counts: two batches
        gate.set()
        assert [job.result(60) for job in jobs] == [1, 2] and all(len(f.result(60)) == 1 for f in images)
        assert order == ["job 0", "batch", "job 1", "batch", "job 2"]  # neither waits for all of the other kind
        failing = engine.run_on_worker(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failing.result(60)
        assert engine.run_on_worker(lambda: "still serving").result(60) == "still serving"
    finally:
        gate.set()
        engine.stop(60)


def test_jobs_not_started_when_the_engine_stops_are_cancelled(pipe):
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=2))  # never started: nothing runs the job
    waiting = engine.run_on_worker(lambda: "never")
    engine.stop(1)
    assert waiting.cancelled()
    with pytest.raises(ShuttingDown):
        engine.run_on_worker(lambda: None)


def test_the_engine_of_a_video_model_refuses_images_and_warms_none(pipe):
    engine = Engine(pipe, EngineConfig(sizes=((SIZE, SIZE),), steps=2, edits=("img2img",)), images=False)
    with pytest.raises(InvalidRequest, match="this server's model makes video, not images: POST /v1/videos"):
        engine.submit(request())
    assert engine.warm_up(progress=False) == {} and set(engine.targets) == {"generate"}
