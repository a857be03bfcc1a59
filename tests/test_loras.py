"""Per-request LoRA (serving/loras.py): the options check the files themselves, each adapter set served equals a
direct pipeline call with those adapters loaded and weighted the ordinary diffusers way, sets batch apart, a switch
compiles nothing (one compiled test, counters), and over HTTP an unknown name gets a 400 naming the loaded adapters."""

import logging
import re
import subprocess
import sys
from dataclasses import replace

import httpx
import pytest
import torch
from conftest import (
    MAX_ERROR_CHARS,
    ROOT,
    app_in_thread,
    assert_error,
    cli_error,
    free_port,
    png_array,
    rel_l2,
    save_lora,
)
from safetensors.torch import save_file

from fastcache import FastCacheConfig, compile_pipeline
from fastcache.lora import LoraLayers
from fastcache.models import build_pipeline
from fastcache.serving.edits import warmup_inputs
from fastcache.serving.engine import Engine, EngineConfig
from fastcache.serving.loras import LoraOptions, fit_problem
from fastcache.serving.request import ImageRequest, InvalidRequest, pipeline_kwargs
from fastcache.serving.server import make_app
from fastcache.serving.service import Service, ServiceOptions
from fastcache.settings import SettingsWatch

SIZE, STEPS, INTERVAL = 32, 4, 2


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> dict[str, str]:
    """Two LoRAs of the tiny model, of ranks 4 and 8; ``c`` targets only the queries (a subset of the layers)."""
    folder = tmp_path_factory.mktemp("served-loras")
    pipe = build_pipeline("tiny-sd")
    c = save_lora(pipe, folder / "c", rank=2, seed=3)
    state = {key: value for key, value in _load(c).items() if ".to_q." in key}
    save_file(state, folder / "c-queries.safetensors")
    return {"a": save_lora(pipe, folder, rank=4, seed=1), "b": save_lora(pipe, folder, rank=8, seed=2),
            "c": str(folder / "c-queries.safetensors")}


def _load(folder: str) -> dict:
    from safetensors.torch import load_file

    return load_file(f"{folder}/pytorch_lora_weights.safetensors")


def options(loras, compile_=False, slots=2, edits=(), **engine) -> ServiceOptions:
    engine = {"sizes": ((SIZE, SIZE),), "batch_sizes": (1, 2), "steps": STEPS, "edits": edits, **engine}
    return ServiceOptions(cache=FastCacheConfig(interval=INTERVAL, compile=compile_),
                          lora=LoraOptions(adapters=tuple(loras.items()), slots=slots), engine=EngineConfig(**engine))


def request(seed: int, lora=(), steps: int = STEPS, **fields) -> ImageRequest:
    return ImageRequest("a lighthouse", SIZE, SIZE, steps, 7.5, seed=seed, lora=lora, **fields)


def direct(loras, lora: tuple, seed: int, interval: int = INTERVAL, steps: int = STEPS, model: str = "tiny-sd",
           **fields):
    """The request as a direct call of a fresh ``model`` pipeline (the server's weights) with its adapters loaded by
    diffusers (``load_lora_weights``) and weighted by ``set_adapters``; at ``interval`` 1 the plain pipeline (no
    fastcache), else under an eager fastcache handle at that interval (the DeepCache oracle's semantics). An edit of
    the base model runs on its ``from_pipe`` edit pipeline, as the server's."""
    pipe = build_pipeline(model)
    wanted = dict(lora)
    for name in wanted:
        pipe.load_lora_weights(loras[name], adapter_name=name)
    if wanted:
        pipe.set_adapters(list(wanted), adapter_weights=list(wanted.values()))
    handle = compile_pipeline(pipe, interval, 0, compile=False) if interval > 1 else None
    try:
        target = pipe
        if "image" in fields and not model.endswith("-inpaint"):
            from fastcache.serving.edits import edit_pipeline

            target = edit_pipeline(pipe, "inpaint" if fields.get("mask") is not None else "img2img")
        return target(**pipeline_kwargs(target, [request(seed, lora, steps, **fields)])).images[0]
    finally:
        if handle is not None:
            handle.disable()


def test_a_server_without_adapters_refuses_lora():
    engine = Engine(build_pipeline("tiny-sd"), EngineConfig(sizes=((SIZE, SIZE),), batch_sizes=(1,), steps=STEPS))
    engine.check(request(1))
    with pytest.raises(InvalidRequest, match="this server serves no LoRA adapters"):
        engine.check(request(1, "a"))


@pytest.mark.parametrize("make, message", [
    (lambda d, p: {"adapters": (("x", str(d / "nope.safetensors")),)}, "lora x=.*nope.safetensors: no such file"),
    (lambda d, p: {"adapters": (("x", str(d)),)}, "a folder must hold one .safetensors file; it holds 0"),
    (lambda d, p: {"adapters": (("x", _write(d / "junk.safetensors", b"not safetensors")),)},
     "not a readable safetensors file"),
    (lambda d, p: {"adapters": (("x", _tensors(d / "w.safetensors", {"conv.weight": torch.zeros(2, 2)})),)},
     "not a LoRA .it holds 'conv.weight'"),
    (lambda d, p: {"adapters": (("x", _tensors(d / "te.safetensors", {
        "text_encoder.layer.lora_A.weight": torch.zeros(4, 8)})),)}, "text-encoder LoRA layers, which cannot be"),
    (lambda d, p: {"adapters": (("a", p["a"]), ("b", p["b"])), "rank": 4},
     "lora b has rank 8, wider than 4: raise lora_rank to at least 8"),
    (lambda d, p: {"adapters": (("a b", p["a"]),)}, "lora names are 1 to 64 letters"),
    (lambda d, p: {"adapters": (("none", p["a"]),)}, "and not 'none'"),
    (lambda d, p: {"adapters": (("a", p["a"]), ("a", p["b"]))}, "lora a is given twice"),
    (lambda d, p: {"adapters": (("a", p["a"]),), "slots": 2}, "lora_slots must be an integer from 1 to 1"),
    (lambda d, p: {"slots": 1}, "lora_slots and lora_rank need adapters"),
])
def test_lora_options_check_the_files_from_their_headers(tmp_path, loras, make, message):
    with pytest.raises(ValueError, match=message):
        LoraOptions(**make(tmp_path, loras))


def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _tensors(path, tensors: dict) -> str:
    save_file(tensors, path)
    return str(path)


def test_a_bad_lora_option_is_one_line_and_exit_code_2(loras, capsys):
    for arguments, message in ((["--lora", "style"], "--lora takes NAME=PATH"),
                               (["--lora", "x=/no/such/lora"], "--lora x=/no/such/lora: no such file or folder"),
                               (["--lora", f"a={loras['a']}", "--lora", f"b={loras['b']}", "--lora-rank", "4"],
                                "--lora b has rank 8, wider than 4"),
                               (["--lora", f"a={loras['a']}", "--lora-slots", "3"], "--lora-slots must be an integer")):
        err = cli_error(["serve", "--preset", "tiny-sd", "--no-compile", "--sizes", "32", *arguments], capsys)
        assert message in err, err


def _unet_keys(path: str) -> dict:
    return {key.removeprefix("unet."): value for key, value in _load(path).items()}


def test_a_lora_for_another_model_or_of_other_widths_is_named_in_a_short_line(loras, tmp_path):
    unet = build_pipeline("tiny-sd").unet
    assert fit_problem(unet, _unet_keys(loras["a"])) is None
    other = save_lora(build_pipeline("tiny-sdxl"), tmp_path)  # its third down block has attentions; tiny-sd's not
    problem = fit_problem(unet, _unet_keys(other))
    assert re.fullmatch(r"the LoRA targets \d+ modules this UNet does not have \(e\.g\. down_blocks\.2\.attentions"
                        r"\.0\..*\); is it for another model, or are its keys prefixed twice\?", problem), problem
    twice = {f"unet.{key}": value for key, value in _unet_keys(loras["a"]).items()}
    assert "its keys are prefixed twice (unet.unet.)" in fit_problem(unet, twice)
    wide = dict(_unet_keys(loras["a"]))
    key = next(key for key in wide if key.endswith("attn2.to_k.lora_A.weight"))
    wide[key] = torch.zeros(4, 77)  # another text encoder's width
    assert fit_problem(unet, wide).startswith("the LoRA's layers have other widths than 1 module of this UNet (")


def test_a_lora_with_its_keys_prefixed_twice_is_one_line_said_once(loras, tmp_path):
    """The issue's case: save_lora_weights around a dict that already has the unet. prefix. The whole stderr of
    fastcache serve is one line (diffusers and PEFT no longer log every module name before it), naming a count."""
    pipe = build_pipeline("tiny-sd")
    type(pipe).save_lora_weights(tmp_path / "twice", unet_lora_layers=_load(loras["a"]), safe_serialization=True)
    out = subprocess.run([sys.executable, "-m", "fastcache.cli", "serve", "--preset", "tiny-sd", "--no-compile",
                          "--sizes", "32", "--port", str(free_port()), "--lora", f"x={tmp_path / 'twice'}"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in out.stderr.splitlines() if " INFO " not in line]
    assert out.returncode == 2 and len(lines) == 1 and len(lines[0]) <= MAX_ERROR_CHARS, out.stderr[-3000:]
    assert re.search(r"lora x: the LoRA targets \d+ modules this UNet does not have \(e\.g\. unet\.down_blocks\.0\.",
                     lines[0]) and "its keys are prefixed twice" in lines[0], lines[0]


def test_each_adapter_set_equals_a_direct_call_with_it_loaded_and_sets_batch_apart(loras):
    """Every request of a set in one call, each set in a call of its own; the images equal diffusers' own
    loading and weighting (fp32), with the adapters a request did not ask for having no effect. The switches change
    no setting a graph bakes in: the settings a hand-captured graph is checked against read the same (scalings are
    the same tensors), and no parameter moved."""
    service = Service(options(loras, edits=("img2img",)))
    engine, unet = service.engine, service.pipe.unet
    watch = SettingsWatch(lambda: [unet], unet.up_blocks, LoraLayers(unet))
    settings, addresses = watch.read(), [param.data_ptr() for param in unet.parameters()]
    image, _ = warmup_inputs(SIZE, SIZE)
    asks = [((), 1), ((("a", 0.8),), 2), ((("a", 0.8),), 3), ((("b", 1.0), ("c", -1.5)), 4),
            ((("a", 0.8), ("b", -0.5)), 5), ((("a", 0.3),), 6), ((("c", 1.0),), 7), ((), 8)]
    calls = []
    engine.on_batch = lambda images, padded: calls.append(images)
    futures = [engine.submit(request(seed, lora)) for lora, seed in asks]
    edit = engine.submit(request(9, (("b", 0.5),), image=image, strength=0.6))
    engine.start().stop(timeout=300)
    assert sorted(calls) == [1, 1, 1, 1, 1, 2, 2], "a set with another weight is another set"
    for (lora, seed), future in zip(asks, futures, strict=True):
        assert rel_l2(future.result(timeout=0)[0], direct(loras, lora, seed)) < 1e-5, lora
    assert rel_l2(edit.result(timeout=0)[0], direct(loras, (("b", 0.5),), 9, image=image, strength=0.6)) < 1e-5
    assert rel_l2(futures[1].result()[0], futures[5].result()[0]) > 1e-3, "the weight matters"
    assert service.loras.images == {"none": 2, "a": 3, "b,c": 1, "a,b": 1, "c": 1, "b": 1}
    assert service.loras.switches >= 6 and service.loras.hotswaps >= 3
    assert service.handle.counters.fallbacks == 0
    assert SettingsWatch.same(watch.read(), settings), watch.changed(watch.read(), settings)
    assert [param.data_ptr() for param in unet.parameters()] == addresses
    with pytest.raises(InvalidRequest, match=r"lora 'd' is not loaded; 3 adapters are loaded \(a, b, c\)") as error:
        engine.check(request(1, (("d", 1.0),)))
    assert error.value.param == "lora"
    with pytest.raises(InvalidRequest, match="combines at most 2 per request"):
        engine.check(request(1, ("a", "b", "c")))


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd-inpaint"])
def test_sdxl_and_an_inpainting_model_beside_the_base_serve_adapters_too(tmp_path, model):
    """SDXL's loader, and an inpainting model (a 9-channel UNet with slots of its own) served beside the base one:
    a request with an adapter equals diffusers' loading and weighting, one without it the plain model."""
    inpaint = model.endswith("-inpaint")
    lora = save_lora(build_pipeline(model), tmp_path, rank=4, seed=1)
    served_options = options({"a": lora}, slots=1, edits=("inpaint",) if inpaint else (), batch_sizes=(1,))
    service = Service(replace(served_options, preset="tiny-sd" if inpaint else model,
                              inpaint_preset=model if inpaint else None))
    image, mask = warmup_inputs(SIZE, SIZE)
    fields = {"image": image, "mask": mask} if inpaint else {}
    served = [service.engine.run([request(3, lora_set, **fields)])[0][0] for lora_set in ((("a", 0.7),), ())]
    with_lora, plain = (direct({"a": lora}, lora_set, 3, model=model, **fields) for lora_set in ((("a", 0.7),), ()))
    assert rel_l2(served[0], with_lora) < 1e-5 and rel_l2(served[1], plain) < 1e-5
    assert rel_l2(with_lora, plain) > 1e-3, "the adapter matters"


def test_switching_adapters_between_calls_compiles_nothing(loras):
    """The one compiled test (one bucket, 3 steps): after the warm-up (no adapter), calls with every set, other
    weights, at both served cache levels and back to none run on the warm graphs: the handle's compiles, recompiles,
    recaptures, fallbacks and compile failures stay put, and so does dynamo's graph count. The images equal diffusers'
    own LoRA loading: at interval 1 the plain pipeline's (no fastcache), at 2 the eager runtime's; a request without
    adapters after some with equals the plain model (nothing leaks)."""
    from torch._dynamo.utils import counters as dynamo

    steps = 3
    service = Service(options(loras, compile_=True, batch_sizes=(1,), steps=steps, intervals=(1, INTERVAL)))
    handle = service.handle
    before = dynamo["stats"]["unique_graphs"]
    service.warm_up(progress=False)
    counters = handle.counters
    warm = (counters.compiles, counters.recompiles, counters.recaptures, counters.fallbacks,
            counters.compile_failures, dynamo["stats"]["unique_graphs"])
    assert warm == (2, 0, 0, 0, 0, before + 2) and not service.engine.eager_buckets
    asks = [((("a", 1.0),), 1), ((("b", 0.7),), INTERVAL), ((("a", -0.4), ("b", 1.2)), 1), ((), 1),
            ((("c", 2.0),), INTERVAL), ((("a", 1.0),), INTERVAL), ((), INTERVAL)]
    images = [service.engine.run([request(seed, lora, steps=steps, interval=interval)])[0][0]
              for seed, (lora, interval) in enumerate(asks)]
    assert (counters.compiles, counters.recompiles, counters.recaptures, counters.fallbacks,
            counters.compile_failures, dynamo["stats"]["unique_graphs"]) == warm
    assert service.loras.switches == len(asks) and service.loras.hotswaps >= 3
    handle.disable()
    errors = [rel_l2(image, direct(loras, lora, seed, interval, steps=steps))
              for seed, (image, (lora, interval)) in enumerate(zip(images, asks, strict=True))]
    logging.getLogger(__name__).info("compiled LoRA switches vs diffusers' own loading: rel L2 %s", errors)
    assert max(errors) < 1e-4, errors


@pytest.fixture(scope="module")
def server(loras):
    service = Service(options(loras, edits=("img2img",), max_delay_ms=300))
    with app_in_thread(make_app(service)) as url:
        yield url


def generate(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json={"prompt": "a lighthouse", "seed": 3, **body}, timeout=120)


BAD_LORAS = [
    ("d", "lora 'd' is not loaded; 3 adapters are loaded (a, b, c)"),
    ([{"name": "a", "scale": 0.5}, {"name": "zz"}], "lora 'zz' is not loaded; 3 adapters are loaded (a, b, c)"),
    ({"name": "a", "path": "/etc/passwd"}, "lora must be an adapter's name"),
    ({"name": "a", "scale": "high"}, "lora 'a': scale must be a finite number from -10 to 10"),
    ({"name": "a", "scale": 11}, "scale must be a finite number from -10 to 10"),
    (["a", "a"], "lora must name each adapter once"),
    (["a", "b", "c"], "combines at most 2 per request"),
    (5, "lora must be an adapter's name, {\"name\": NAME, \"scale\": S}"),
]


@pytest.mark.parametrize("lora, message", BAD_LORAS, ids=[str(b)[:30] for b, _ in BAD_LORAS])
def test_a_bad_lora_gets_a_400_naming_the_loaded_adapters(server, lora, message):
    response = generate(server, lora=lora)
    error = assert_error(response.status_code, response.content, 400)
    assert message in error["message"] and error["param"] == "lora", error


def test_adapters_over_http_models_and_metrics(server):
    one = generate(server, lora="a")
    same = generate(server, lora=[{"name": "a", "scale": 1.0}])
    assert one.status_code == same.status_code == 200
    assert (png_array(one.json()["data"][0]["b64_json"]) == png_array(same.json()["data"][0]["b64_json"])).all()
    plain = generate(server)
    assert not (png_array(one.json()["data"][0]["b64_json"]) == png_array(plain.json()["data"][0]["b64_json"])).all()
    form = httpx.post(f"{server}/v1/images/edits", data={"prompt": "a cat", "lora": "b", "seed": "1"},
                      files={"image": ("i.png", _png(), "image/png")}, timeout=120)
    json_form = httpx.post(f"{server}/v1/images/edits", data={"prompt": "a cat", "seed": "1",
                                                             "lora": '[{"name": "b", "scale": 1}]'},
                           files={"image": ("i.png", _png(), "image/png")}, timeout=120)
    assert form.status_code == json_form.status_code == 200, form.text
    assert form.json()["data"][0]["b64_json"] == json_form.json()["data"][0]["b64_json"]
    bad_form = httpx.post(f"{server}/v1/images/edits", data={"prompt": "a cat", "lora": "[oops"},
                          files={"image": ("i.png", _png(), "image/png")}, timeout=120)
    assert "lora must be an adapter's name" in assert_error(bad_form.status_code, bad_form.content, 400)["message"]
    model = httpx.get(f"{server}/v1/models").json()["data"][0]
    assert model["lora_adapters"] == ["a", "b", "c"] and model["lora_slots"] == 2
    assert "safetensors" not in httpx.get(f"{server}/v1/models").text, "paths are not listed"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'fastcache_lora_images_total{adapters="a"} 2.0' in metrics
    assert 'fastcache_lora_images_total{adapters="b"} 2.0' in metrics
    assert 'fastcache_lora_images_total{adapters="none"} 1.0' in metrics  # the warm-up is not counted
    # a, a (same set: no switch), none, b, b: 3 switches; a and b each hot-swapped once into a slot
    assert "fastcache_lora_switches_total 3.0" in metrics and "fastcache_lora_hotswaps_total 2.0" in metrics


def _png() -> bytes:
    import io

    buffer = io.BytesIO()
    warmup_inputs(SIZE, SIZE)[0].save(buffer, format="PNG")
    return buffer.getvalue()
