"""``/v1/videos`` over HTTP: real uvicorn servers on loopback ports (tiny AnimateDiff and SVD with random weights,
lossless MP4s so that a video's pixels can be compared exactly), every wait bounded.

Both run fastcache eagerly (interval 3, branch 0). In this process: the text-to-video server (an API key, at most
2 jobs, cache levels 1 and 3, a LoRA adapter), the image-to-video one (a 5 s TTL, a small body limit). In
subprocesses: ``fastcache serve --preset tiny-animatediff`` killed by SIGKILL while a job runs, then restarted on the
same ``--data-dir``.
"""

import json
import re
import time

import httpx
import numpy as np
import pytest
import torch
from conftest import ServerProcess, app_in_thread, assert_error, decode_mp4, save_lora, wait_until
from fastapi.testclient import TestClient
from test_edits import bomb, encoded, picture

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.models import build_pipeline, load_pipeline, prompt_inputs
from fastcache.serving.edge import EdgeConfig
from fastcache.serving.engine import EngineConfig
from fastcache.serving.loras import LoraOptions, ServedLoras
from fastcache.serving.server import make_app
from fastcache.serving.service import Service, ServiceOptions
from fastcache.serving.video_options import VideoOptions
from fastcache.video_models import VIDEO_PRESETS
from fastcache.video_output import to_uint8

KEY = "video-test-key"
SIZE = 32
LIMIT_MB = 0.05  # ~52 kB: prompts and the tiny PNGs pass, a padded body does not


NO_LORA = LoraOptions()


def service(folder, data_dir, intervals=(), lora=NO_LORA, **video) -> Service:
    """A video model served from ``folder`` with an eager fastcache handle (interval 3, branch 0), 2 steps by default,
    its MP4s lossless."""
    options = ServiceOptions(model=str(folder), cache=FastCacheConfig(compile=False), lora=lora,
                             engine=EngineConfig(sizes=((SIZE, SIZE),), steps=2, max_steps=200, intervals=intervals),
                             video=VideoOptions(sizes=((SIZE, SIZE),), data_dir=str(data_dir), crf=0, **video))
    return Service(options)


def reference(folder, lora=NO_LORA):
    """A separate copy of a served pipeline, with the server's cache settings and LoRA slots, for direct calls."""
    pipe = load_pipeline(str(folder), dtype=torch.float32)
    loras = ServedLoras(lora, type(pipe), torch.float32) if lora.adapters else None
    if loras is not None:
        loras.attach(pipe)
    return pipe, compile_pipeline(pipe, 3, 0, compile=False), loras


def motion_lora(directory) -> LoraOptions:
    """A LoRA for the tiny AnimateDiff's spatial attention (made on its base 2-D UNet, as AnimateDiff users load SD
    LoRAs), served as ``style``."""
    sd = build_pipeline("tiny-sd")
    sd.unet = sd.unet.from_config(VIDEO_PRESETS["tiny-animatediff"]["unet"])
    return LoraOptions(adapters=(("style", save_lora(sd, directory)),))


@pytest.fixture(scope="module")
def text(tiny_video_models, tmp_path_factory):
    """The AnimateDiff server: its URL, a client with its key, and a separate copy of its pipeline (and handle and
    LoRA slots) for direct calls."""
    lora = motion_lora(tmp_path_factory.mktemp("video-lora"))
    served = service(tiny_video_models["animatediff"], tmp_path_factory.mktemp("text-videos"), intervals=(1, 3),
                     lora=lora, frames=(4, 8), max_jobs=2, ttl=600)
    app = make_app(served, EdgeConfig(api_keys=(KEY,), max_body_mb=LIMIT_MB))
    pipe, handle, loras = reference(tiny_video_models["animatediff"], lora)
    with app_in_thread(app) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"},
                                                 timeout=60) as client:
        yield dict(url=url, client=client, direct=pipe, handle=handle, loras=loras)


@pytest.fixture(scope="module")
def image(tiny_video_models, tmp_path_factory):
    """The SVD server (no key; finished videos kept 5 s), and a separate copy of its pipeline."""
    data_dir = tmp_path_factory.mktemp("image-videos")
    served = service(tiny_video_models["svd"], data_dir, frames=(4,), ttl=5)
    pipe, _, _ = reference(tiny_video_models["svd"])
    with app_in_thread(make_app(served, EdgeConfig(max_body_mb=LIMIT_MB))) as url, httpx.Client(
            base_url=url, timeout=60) as client:
        yield dict(url=url, client=client, data_dir=data_dir, direct=pipe)


def finished(client: httpx.Client, video_id: str, timeout: float = 120) -> dict:
    """The job once completed or failed (polled, at most ``timeout`` seconds)."""
    def done():
        job = client.get(f"/v1/videos/{video_id}").json()
        return job if job["status"] in ("completed", "failed") else None

    return wait_until(done, timeout, f"video {video_id} finished")


def mp4_frames(client: httpx.Client, video_id: str, tmp_path) -> tuple[np.ndarray, float]:
    response = client.get(f"/v1/videos/{video_id}/content")
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4", response.text
    assert int(response.headers["content-length"]) == len(response.content)
    path = tmp_path / f"{video_id}.mp4"
    path.write_bytes(response.content)
    return decode_mp4(path)


def metric(client: httpx.Client, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and sample.labels == labels)


# -- text to video ---------------------------------------------------------------------------------------------------

def test_a_job_is_queued_runs_and_its_mp4_is_the_frames_of_a_direct_call(text, tmp_path):
    """The server's default level (interval 3, cached) against the same pipeline with the same handle."""
    client, pipe = text["client"], text["direct"]
    seconds_before = metric(client, "fastcache_video_seconds_total")
    created = client.post("/v1/videos", json={"prompt": "a cat", "seconds": "1", "seed": 7,
                                              "negative_prompt": "blurry", "model": "sora-2"})
    job = created.json()
    assert created.status_code == 200 and re.fullmatch(r"video_[0-9a-f]{32}", job["id"]), created.text
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["error"] is None
    assert (job["size"], job["seconds"], job["num_frames"], job["fps"], job["seed"]) == ("32x32", "1", 8, 8, 7)
    done = finished(client, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100, done
    assert done["created_at"] <= done["completed_at"] <= done["expires_at"] - 599
    frames, rate = mp4_frames(client, job["id"], tmp_path)
    want = pipe(**prompt_inputs(pipe, ["a cat"], ["blurry"]), num_frames=8, height=SIZE, width=SIZE,
                num_inference_steps=2, guidance_scale=7.5, output_type="np",
                generator=torch.Generator().manual_seed(7)).frames[0]
    assert rate == 8 and np.array_equal(frames, to_uint8(want))  # lossless: the pipeline's frames, rounded to bytes
    assert job["id"] in [video["id"] for video in client.get("/v1/videos").json()["data"]]
    assert metric(client, "fastcache_video_seconds_total") - seconds_before == 1.0
    assert metric(client, "fastcache_video_jobs", status="completed") >= 1
    assert metric(client, "fastcache_video_jobs_finished_total", status="completed") >= 1
    assert metric(client, "fastcache_unet_steps_total", path="shallow") > 0
    assert metric(client, "fastcache_unet_fallbacks_total") == 0  # the cached path, never the original forward


def test_cache_level_1_is_the_plain_pipeline(text, tmp_path):
    client, pipe = text["client"], text["direct"]
    job = client.post("/v1/videos", json={"prompt": "a dog", "num_frames": 4, "seed": 3,
                                          "cache": {"interval": 1}}).json()
    assert finished(client, job["id"])["status"] == "completed"
    frames, _ = mp4_frames(client, job["id"], tmp_path)
    text["handle"].disable()
    try:
        plain = pipe(**prompt_inputs(pipe, ["a dog"]), num_frames=4, height=SIZE, width=SIZE, num_inference_steps=2,
                     guidance_scale=7.5, output_type="np", generator=torch.Generator().manual_seed(3)).frames[0]
    finally:
        text["handle"].enable()
    assert np.array_equal(frames, to_uint8(plain))


def test_a_lora_request_equals_a_direct_call_with_that_adapter(text, tmp_path):
    client, pipe, loras = text["client"], text["direct"], text["loras"]
    body = {"prompt": "a dog", "num_frames": 4, "seed": 3}
    jobs = [client.post("/v1/videos", json=dict(body, **lora)).json() for lora in ({"lora": "style"}, {})]
    styled, plain = (mp4_frames(client, job["id"], tmp_path)[0] for job in jobs if finished(client, job["id"]))
    loras.apply(pipe.unet, (("style", 1.0),))
    try:
        want = pipe(**prompt_inputs(pipe, ["a dog"]), num_frames=4, height=SIZE, width=SIZE, num_inference_steps=2,
                    guidance_scale=7.5, output_type="np", generator=torch.Generator().manual_seed(3)).frames[0]
    finally:
        loras.apply(pipe.unet, ())
    assert np.array_equal(styled, to_uint8(want)) and not np.array_equal(styled, plain)


def test_progress_rises_while_a_job_runs(text):
    client = text["client"]
    job = client.post("/v1/videos", json={"prompt": "slow", "num_inference_steps": 12, "num_frames": 4}).json()
    seen = []

    def record():
        now = client.get(f"/v1/videos/{job['id']}").json()
        seen.append(now["progress"])
        return now["status"] in ("completed", "failed")

    wait_until(record, 180, "the slow job's end")
    assert seen == sorted(seen) and seen[-1] == 100, seen
    assert any(0 < progress < 95 for progress in seen), seen  # written during the denoising steps


def test_at_the_job_limit_one_more_is_429_and_a_deleted_running_job_stops(text):
    client = text["client"]
    long = {"prompt": "long", "num_inference_steps": 200, "num_frames": 4}
    first, second = (client.post("/v1/videos", json=long).json() for _ in range(2))
    refused = client.post("/v1/videos", json=long)
    error = assert_error(refused.status_code, refused.content, 429)
    assert refused.headers["retry-after"] == "10" and error["code"] == "too_many_jobs"
    assert "2 video jobs are queued or running (at most 2)" in error["message"]
    wait_until(lambda: client.get(f"/v1/videos/{first['id']}").json()["status"] == "in_progress", 60, "first runs")
    for job in (first, second):  # the running one stops at its next step; the queued one never starts
        assert client.delete(f"/v1/videos/{job['id']}").json() == {"id": job["id"], "object": "video.deleted",
                                                                    "deleted": True}
        assert client.get(f"/v1/videos/{job['id']}").status_code == 404
    start = time.monotonic()
    quick = client.post("/v1/videos", json={"prompt": "quick", "num_frames": 4}).json()
    assert finished(client, quick["id"])["status"] == "completed"
    assert time.monotonic() - start < 100  # 200 steps of the first job would take minutes more


def test_the_list_is_paged_by_creation(text):
    client = text["client"]
    ids = [client.post("/v1/videos", json={"prompt": f"page {i}", "num_frames": 4}).json()["id"] for i in range(2)]
    for video_id in ids:
        finished(client, video_id)
    newest = client.get("/v1/videos", params={"limit": 1}).json()
    assert newest["object"] == "list" and [v["id"] for v in newest["data"]] == [ids[1]] and newest["has_more"]
    assert newest["first_id"] == newest["last_id"] == ids[1]
    after = client.get("/v1/videos", params={"limit": 1, "after": ids[1]}).json()
    assert [v["id"] for v in after["data"]] == [ids[0]]
    oldest_first = client.get("/v1/videos", params={"order": "asc", "limit": 100}).json()
    assert [v["id"] for v in oldest_first["data"]][-2:] == ids and not oldest_first["has_more"]
    for params, message in [({"limit": 0}, "limit must be an integer from 1 to 100"),
                            ({"limit": "x"}, "limit must be"), ({"order": "new"}, "order must be 'asc' or 'desc'"),
                            ({"after": "video_x"}, "after must be the id of a video on this server"),
                            ({"page": 2}, "'page' is not a parameter of this request")]:
        response = client.get("/v1/videos", params=params)
        assert message in assert_error(response.status_code, response.content, 400)["message"]


BAD_VIDEO_REQUESTS = [
    ({"prompt": "x", "num_frames": 5}, "num_frames 5 is not served; served frame counts (at 8 fps): 4 (0.5 s), 8 (1"),
    ({"prompt": "x", "num_frames": 33}, "num_frames 33 is not served"),
    ({"prompt": "x", "seconds": "3"}, "num_frames 24 is not served"),
    ({"prompt": "x", "seconds": "1", "num_frames": 4}, "num_frames 4 at 8 fps lasts 0.5 s, not 1"),
    ({"prompt": "x", "size": "64x64"}, "size 64x64 is not served for video; served sizes: 32x32."),
    ({"prompt": "x", "size": "9" * 5000}, "size must be 'WIDTHxHEIGHT'"),
    ({"prompt": "x", "fps": 0}, "fps must be an integer from 1 to 120"),
    ({"prompt": "x", "num_inference_steps": 201}, "num_inference_steps must be between 1 and 200"),
    ({"prompt": "x", "guidance_scale": 1}, "turns classifier-free guidance off, which this server did not warm up"),
    ({"prompt": "x", "seed": -1}, "seed must be between 0"),
    ({"prompt": "x", "cache": {"interval": 2}}, "cache.interval 2 is not served; served levels: 1, 3."),
    ({"prompt": "x", "cache": {"interval": 2, "branch": 1}}, 'cache must be {"interval": k} with k one of 1, 3'),
    ({"prompt": "x", "lora": "nope"}, "lora 'nope' is not loaded; 1 adapter is loaded (style)."),
    ({"prompt": "x", "num_frame": 4}, "'num_frame' is not a field of this request"),
    ({"prompt": "x", "input_reference": {"image_url": "data:"}}, "input_reference must be uploaded as a file"),
    ({"prompt": ""}, "prompt is required"),
    ({}, "prompt is required"),
    ({"prompt": 5}, "prompt must be a non-empty string"),
    ({"prompt": "\ud800"}, "prompt must be valid Unicode"),
    ([1, 2], "the request body must be a JSON object"),
    ("{not json", "the request body is not valid JSON"),
    ("", "the request body must be a JSON object"),
    ({"prompt": "x" * 10_001}, "prompt must be at most 10000 characters"),
    ("[" * 50_000, "the request body nests JSON 50000 levels deep; this server reads at most 32"),
    ('{"prompt": "x", "lora": ' + "[" * 40 + "]" * 40 + "}", "the request body nests JSON 41 levels deep"),
    ('{"prompt": "x", "seed": 1' + "0" * 5000 + "}", "a number too long to parse"),
]


@pytest.mark.parametrize("body, message", BAD_VIDEO_REQUESTS, ids=[str(b)[:40] for b, _ in BAD_VIDEO_REQUESTS])
def test_bad_input_is_400_in_the_one_format_naming_what_is_valid(text, body, message):
    content = body if isinstance(body, str) else json.dumps(body)
    response = text["client"].post("/v1/videos", content=content, headers={"content-type": "application/json"})
    error = assert_error(response.status_code, response.content, 400)
    assert message in error["message"] and error["type"] == "invalid_request_error"


def test_bodies_that_are_not_json_or_multipart_too_large_or_broken_are_refused(text):
    client = text["client"]
    cases = [
        (dict(content=b"prompt=x", headers={"content-type": "text/plain"}), 400, "must be JSON"),
        (dict(content=b"prompt=x&prompt=y", headers={"content-type": "application/x-www-form-urlencoded"}), 400,
         "prompt is given twice"),
        (dict(data={"prompt": "x"}, files={"input_reference": ("a.png", encoded(picture()), "image/png")}), 400,
         "input_reference is not taken: this model makes video from a prompt"),
        (dict(data={"prompt": "x", "num_frames": "four"}, files={"other": ("a.txt", b"x")}), 400,
         "'other' is not a file field of this request"),
        (dict(content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data"}), 400,
         "the form could not be read (Missing boundary"),
        (dict(json={"prompt": "x" * 60_000}), 413, "the request body is"),
    ]
    for kwargs, status, message in cases:
        response = client.post("/v1/videos", **kwargs)
        assert message in assert_error(response.status_code, response.content, status)["message"], response.text
    ok = client.post("/v1/videos", data={"prompt": "a form", "num_frames": "4", "seed": "2"})  # multipart, no file
    assert ok.status_code == 200 and finished(client, ok.json()["id"])["status"] == "completed"


def multipart(fields: dict[str, bytes]) -> tuple[bytes, dict]:
    """A multipart body of text ``fields`` given as raw bytes (which a client library would encode as UTF-8)."""
    parts = b"".join(b'--b\r\nContent-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n' + value + b"\r\n"
                     for name, value in fields.items())
    return parts + b"--b--\r\n", {"content-type": "multipart/form-data; boundary=b"}


@pytest.mark.parametrize("fields, param, message", [
    ({"prompt": b"caf\xe9"}, "prompt", "prompt must be valid UTF-8 text"),
    ({"prompt": b"x", "lora": b"[" * 2000}, "lora", "lora nests JSON 2000 levels deep"),
    ({"prompt": b"x", "cache": b'{"a":' * 2000}, "cache", "cache nests JSON 2000 levels deep"),
    ({"prompt": b"x", "num_frame": b"4"}, "num_frame", "'num_frame' is not a field of this request"),
])
def test_a_form_is_read_as_strictly_as_json(text, fields, param, message):
    content, headers = multipart(fields)
    response = text["client"].post("/v1/videos", content=content, headers=headers)
    error = assert_error(response.status_code, response.content, 400)
    assert message in error["message"] and error["param"] == param


def test_the_openapi_document_of_a_video_server_states_its_routes_errors(text):
    document = text["client"].get("/openapi.json").json()
    videos = {path: ops for path, ops in document["paths"].items() if path.startswith("/v1/videos")}
    assert set(videos) == {"/v1/videos", "/v1/videos/{video_id}", "/v1/videos/{video_id}/content"}
    for path, operations in videos.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses and {"400", "401", "429", "503"} <= set(responses), (method, path)
            schema = responses["400"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path)
    assert "404" in videos["/v1/videos/{video_id}"]["get"]["responses"]
    assert "409" in videos["/v1/videos/{video_id}/content"]["get"]["responses"]


def test_every_video_route_needs_the_api_key(text):
    url, video_id = text["url"], "video_" + "0" * 32
    for method, path in [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", f"/v1/videos/{video_id}"),
                         ("GET", f"/v1/videos/{video_id}/content"), ("DELETE", f"/v1/videos/{video_id}")]:
        for headers, code in [({}, "missing_api_key"), ({"Authorization": "Bearer nope"}, "invalid_api_key")]:
            response = httpx.request(method, url + path, headers=headers, json={"prompt": "x"}, timeout=30)
            assert assert_error(response.status_code, response.content, 401)["code"] == code


def test_unknown_unfinished_and_other_variants_are_named(text):
    client = text["client"]
    for path in ("/v1/videos/video_" + "0" * 32, "/v1/videos/nope/content", "/v1/videos/../../etc/passwd"):
        response = client.get(path)
        assert response.status_code == 404, response.text
    assert client.delete("/v1/videos/video_" + "1" * 32).status_code == 404
    job = client.post("/v1/videos", json={"prompt": "busy", "num_frames": 4, "num_inference_steps": 60}).json()
    early = client.get(f"/v1/videos/{job['id']}/content")
    error = assert_error(early.status_code, early.content, 409)
    assert error["code"] == "video_not_ready" and "its content is there once its status is completed" in error[
        "message"]
    variant = client.get(f"/v1/videos/{job['id']}/content", params={"variant": "thumbnail"})
    assert "variant must be 'video'" in assert_error(variant.status_code, variant.content, 400)["message"]
    client.delete(f"/v1/videos/{job['id']}")


def test_a_video_server_serves_no_images_and_says_what_it_serves(text):
    client = text["client"]
    refused = client.post("/v1/images/generations", json={"prompt": "x"})
    assert "makes video, not images: POST /v1/videos" in assert_error(refused.status_code, refused.content,
                                                                      400)["message"]
    model = client.get("/v1/models").json()["data"][0]
    assert model["images"] is False and model["video"]["input"] == "prompt"
    assert model["video"]["sizes"] == ["32x32"] and model["video"]["frames"] == [4, 8]
    assert model["video"]["max_jobs"] == 2 and model["video"]["encoding"] == "H.264 MP4, lossless RGB"


def test_a_video_request_to_an_image_server_is_400_naming_what_it_serves():
    served = Service(ServiceOptions(cache=FastCacheConfig(compile=False), engine=EngineConfig(sizes=((SIZE, SIZE),),
                                                                                              steps=2)))
    client = TestClient(make_app(served, warm_up=False))  # no lifespan: the refusal needs no engine
    for method, path in [("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/videos/video_1/content")]:
        response = client.request(method, path, json={"prompt": "x"})
        error = assert_error(response.status_code, response.content, 400)
        assert "(tiny-sd) makes images, not video: POST /v1/images/generations" in error["message"]
    assert client.get("/v1/models").json()["data"][0]["video"] is None


# -- image to video --------------------------------------------------------------------------------------------------

def post_image(client, data: bytes | None, **fields):
    files = {"input_reference": ("start.png", data, "image/png")} if data is not None else None
    return client.post("/v1/videos", data={"prompt": "ignored", **fields}, files=files)


def test_image_to_video_from_an_upload_equals_a_direct_call_and_expires(image, tmp_path):
    client, pipe = image["client"], image["direct"]
    start = picture(seed=9)
    job = post_image(client, encoded(start), seed="5").json()
    assert (job["num_frames"], job["fps"], job["seconds"]) == (4, 7, f"{4 / 7:g}")  # SVD's defaults
    done = finished(client, job["id"])
    assert done["status"] == "completed", done
    frames, rate = mp4_frames(client, job["id"], tmp_path)
    want = pipe(start, height=SIZE, width=SIZE, num_frames=4, num_inference_steps=2, fps=7, max_guidance_scale=3.0,
                output_type="np", generator=torch.Generator().manual_seed(5)).frames[0]
    assert rate == 7 and np.array_equal(frames, to_uint8(want))
    assert (image["data_dir"] / "videos" / f"{job['id']}.mp4").is_file()
    # the TTL is 5 s: then the row and the file are gone
    wait_until(lambda: client.get(f"/v1/videos/{job['id']}").status_code == 404, 60, "the video's expiry")
    assert client.get(f"/v1/videos/{job['id']}/content").status_code == 404
    assert not (image["data_dir"] / "videos" / f"{job['id']}.mp4").exists()
    assert job["id"] not in [video["id"] for video in client.get("/v1/videos").json()["data"]]


def test_bad_uploads_are_refused_on_their_header(image):
    client = image["client"]
    cases = [
        (None, {}, 400, "input_reference is required: this model makes video from an image"),
        (b"GIF89a not really", {}, 400, "input_reference is not a PNG, JPEG or WebP image"),
        (encoded(picture())[:100], {}, 400, "input_reference could not be decoded as a PNG image"),
        (bomb(60_000, 60_000), {}, 400, "input_reference declares more pixels than any served image"),
        (encoded(picture(48, 40)), {}, 400, "send resize=true to resize it"),
        (encoded(picture(3000, 1)), {}, 400, "input_reference is 3000x1 pixels; each side must be at most 2048"),
        (encoded(picture(160, 160, seed=2)), {}, 413, "the request body is"),  # ~77 kB of noise: over the limit
        (encoded(picture()), {"negative_prompt": "blur"}, 400, "negative_prompt is not taken by image to video"),
        (encoded(picture()), {"seconds": "1"}, 400, "num_frames 7 is not served; served frame counts (at 7 fps): 4 "
                                                    "(0.571 s)."),
        (encoded(picture()), {"seconds": "0.5"}, 400, "seconds 0.5 at 7 fps is not a whole number of frames"),
    ]
    for data, fields, status, message in cases:
        response = post_image(client, data, **fields)
        assert message in assert_error(response.status_code, response.content, status)["message"], response.text
    two = client.post("/v1/videos", files=[("input_reference", ("a.png", encoded(picture()), "image/png")),
                                           ("input_reference", ("b.png", encoded(picture()), "image/png"))])
    assert "the form could not be read (Too many files" in assert_error(two.status_code, two.content, 400)["message"]
    as_json = client.post("/v1/videos", json={"prompt": "x"})
    assert "input_reference is required" in assert_error(as_json.status_code, as_json.content, 400)["message"]


# -- a server killed while a job runs --------------------------------------------------------------------------------

def test_a_server_killed_during_a_job_marks_it_failed_at_restart_and_serves_what_finished(tmp_path):
    args = ("--preset", "tiny-animatediff", "--no-compile", "--video-sizes", "32", "--steps", "2", "--max-steps",
            "500", "--data-dir", str(tmp_path / "data"), "--video-crf", "0")
    server = ServerProcess(*args)
    try:
        client = httpx.Client(base_url=server.url, timeout=60)
        done = client.post("/v1/videos", json={"prompt": "finished before the crash", "seed": 1}).json()
        assert finished(client, done["id"])["status"] == "completed"
        before = client.get(f"/v1/videos/{done['id']}/content").content
        running = client.post("/v1/videos", json={"prompt": "cut short", "num_inference_steps": 500}).json()
        queued = client.post("/v1/videos", json={"prompt": "never started"}).json()
        wait_until(lambda: client.get(f"/v1/videos/{running['id']}").json()["progress"] > 0, 120, "a job running")
        server.proc.kill()  # SIGKILL, by the pid of the process this test started
        server.proc.wait(timeout=30)
    finally:
        server.stop()
    restarted = ServerProcess(*args)
    try:
        client = httpx.Client(base_url=restarted.url, timeout=60)
        for job in (running, queued):
            failed = client.get(f"/v1/videos/{job['id']}").json()
            assert failed["status"] == "failed" and failed["error"]["code"] == "server_restarted", failed
            assert "the server stopped (a crash or a restart) while this job was queued or running" in failed[
                "error"]["message"]
            assert client.get(f"/v1/videos/{job['id']}/content").status_code == 409
        assert client.get(f"/v1/videos/{done['id']}").json()["status"] == "completed"
        assert client.get(f"/v1/videos/{done['id']}/content").content == before
        listed = [video["id"] for video in client.get("/v1/videos", params={"order": "asc"}).json()["data"]]
        assert listed == [done["id"], running["id"], queued["id"]]
        assert "2 video job(s) left unfinished by the last process marked failed" in restarted.output()
    finally:
        restarted.stop()
