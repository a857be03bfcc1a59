"""The compiled runtime: inductor on CPU here (CUDA graphs on CUDA), same code path as on a GPU."""

import pytest
import torch
from conftest import (
    TINY_PRESETS,
    Runner,
    against_helper,
    helper_run,
    image_embeds,
    ip_adapter_state_dict,
    pag_runner,
    rel_l2,
    save_lora,
)
from torch._dynamo.utils import counters as dynamo_counters

from fastcache import compile_pipeline, graphs
from fastcache.counters import Counters
from fastcache.graphs import UNET_INDUCTOR_OPTIONS, CompiledPaths, Paths, compile_options
from fastcache.models import with_text_encoder
from fastcache.partition import UNetPartition, feature_shape
from fastcache.variants import speed_switches


@pytest.mark.parametrize("preset, guidance", [("tiny-sd", 7.5), pytest.param("tiny-sdxl", 1.0, marks=pytest.mark.slow)],
                         ids=["sd-cfg", "sdxl-no-cfg"])  # SDXL compiled: ~1.5 min, left to -m slow
def test_compiled_paths_match_the_helper_and_never_recompile(preset, guidance):
    runner = Runner(preset)
    expected = helper_run(runner, 3, 1, guidance_scale=guidance)
    handle = compile_pipeline(runner.pipe, 3, 1)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    first = runner(guidance_scale=guidance)
    assert rel_l2(first, expected) < 1e-4
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2, "one graph per path"

    with torch.compiler.set_stance("fail_on_recompile"):
        second = runner(guidance_scale=guidance)
    assert torch.equal(second, first)
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 2
    assert (handle.counters.full, handle.counters.shallow, handle.counters.shapes) == (8, 12, 1)
    assert handle.counters.compiles == 2, "one compilation per (shape, path)"

    handle.disable()
    assert torch.equal(runner(guidance_scale=guidance), Runner(preset)(guidance_scale=guidance))


def test_compile_false_runs_the_partition_itself(sd_runner):
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    assert type(handle.paths) is Paths
    assert handle.paths.path(True) == handle.partition.full and handle.paths.path(False) == handle.partition.shallow


@pytest.mark.slow  # inductor on CPU (~1.5 min); the compiled decoder's CI representative is test_video_svd's
def test_tuned_pipeline_with_inductor_options_and_compiled_decoder(sd_runner):
    """The guides' recipe: fused QKV, channels_last, inductor options, compiled VAE decoder; three graphs."""
    pipe = sd_runner.pipe
    with speed_switches(pipe):
        plain = sd_runner(output_type="pt")
        expected_latents = helper_run(sd_runner, 3, 1)
        eager = compile_pipeline(pipe, 3, 1, compile=False)
        expected_images = sd_runner(output_type="pt")
        eager.disable()
        decoder_attributes = dict(vars(pipe.vae.decoder))

        handle = compile_pipeline(pipe, 3, 1, inductor_options=UNET_INDUCTOR_OPTIONS, compile_vae=True)
        graphs_before = dynamo_counters["stats"]["unique_graphs"]
        assert rel_l2(sd_runner(), expected_latents) < 1e-4
        images = sd_runner(output_type="pt")
        assert rel_l2(images, expected_images) < 1e-4
        assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 3, "full, shallow, decoder"
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.equal(sd_runner(output_type="pt"), images)
        handle.disable()
        assert vars(pipe.vae.decoder) == decoder_attributes
        assert torch.equal(sd_runner(output_type="pt"), plain), "disable() restores the eager decoder"


def test_inductor_options_merge_into_the_mode():
    assert compile_options("reduce-overhead", None) == {"mode": "reduce-overhead"}
    assert compile_options("reduce-overhead", {"conv_1x1_as_mm": True}) == {
        "options": {"triton.cudagraphs": True, "conv_1x1_as_mm": True}}


def test_a_shape_whose_compile_fails_runs_eagerly_from_then_on(sd_runner, monkeypatch):
    partition = UNetPartition(sd_runner.pipe.unet, 0)
    counters = Counters()
    paths = CompiledPaths(partition, counters, "default")
    attempts = []

    def failing_compile(**inputs):  # stands in for inductor failing at this shape
        attempts.append(1)
        raise RuntimeError("inductor failed")

    monkeypatch.setattr(paths, "full", failing_compile)
    inputs = _path_inputs(partition)
    with torch.no_grad():
        expected = partition.full(**dict(inputs, cache=inputs["cache"].clone()))
        first = paths(True, "key", inputs)
        second = paths(True, "key", inputs)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert attempts == [1]  # not compiled again at every call
    assert counters.compile_failures == 1 and counters.compiles == 0


def _path_inputs(partition: UNetPartition, batch: int = 2) -> dict:
    """A path's inputs at 16x16 latents, with a feature buffer of their shape."""
    unet = partition.unet
    return dict(sample=torch.randn(batch, 4, 16, 16), timestep=torch.tensor(10), encoder_hidden_states=torch.randn(
        batch, 77, unet.config.cross_attention_dim), added_cond_kwargs=None, timestep_cond=None, class_labels=None,
        down_block_additional_residuals=None, mid_block_additional_residual=None,
        cache=torch.empty(feature_shape(unet, partition.boundary, (batch, 4, 16, 16))))


def test_compiles_counts_the_graphs_dynamo_made_and_every_first_call_where_torch_cannot_tell(
        sd_runner, monkeypatch, caplog):
    """``counters.compiles`` reads dynamo's graph list around a shape's first call: a call that made no graph (here
    the path runs uncompiled) counts none. Where a torch release no longer offers that private list, every
    (shape, path) pair's first call counts one, with one warning, and nothing fails."""
    partition = UNetPartition(sd_runner.pipe.unet, 0)
    counters = Counters()
    paths = CompiledPaths(partition, counters, "default")
    monkeypatch.setattr(paths, "full", partition.full)  # dynamo makes no graph for it
    with torch.no_grad():
        paths(True, "a", _path_inputs(partition))
        assert counters.compiles == 0
        monkeypatch.delattr(torch._dynamo.eval_frame, "_debug_get_cache_entry_list")
        monkeypatch.setattr(graphs, "_GRAPH_COUNT_WARNED", False)
        for key in ("b", "b", "c"):
            paths(True, key, _path_inputs(partition))
    assert counters.compiles == 2 and counters.compile_failures == 0
    assert sum("does not list dynamo's graphs" in record.message for record in caplog.records) == 1


def test_one_graph_per_path_takes_every_batch_size():
    """With guidance on (UNet batches 2, 4, 8) the dynamic-batch graphs made at the first call take the next batch
    sizes without compiling (dynamo's stance fails on any compile), and their images equal the eager runtime's (the
    static graphs': the slow test below). On CPU, PyTorch's fp32 convolution picks its backend by ``batch >= 16``, so
    a UNet batch of 16 or more gets a second graph per path (README)."""
    runner = Runner("tiny-sd")
    handle = compile_pipeline(runner.pipe, 2, 0)
    dynamic = {1: runner(steps=4)}
    with torch.compiler.set_stance("fail_on_recompile"):
        dynamic.update({n: runner(steps=4, num_images_per_prompt=n) for n in (2, 4)})
    assert (handle.counters.compiles, handle.counters.shapes, handle.counters.recompiles) == (2, 3, 0)
    handle.disable()
    eager = compile_pipeline(runner.pipe, 2, 0, compile=False)
    for n, images in dynamic.items():
        assert rel_l2(images, runner(steps=4, num_images_per_prompt=n)) < 1e-4, n
    eager.disable()


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_dynamic_batch_warm_up_equals_the_static_one_for_every_batch_size(preset):
    """Batch sizes 1, 2, 4 with guidance on and one image without guidance (a UNet batch of one, which dynamo
    specialises: a graph of its own), SD and SDXL (``added_cond_kwargs`` batched too): the dynamic graphs' images
    equal the static graphs' within 1e-4, and compile 4 graphs where static shapes compile 8."""
    runner = Runner(preset)
    calls = [dict(num_images_per_prompt=n) for n in (1, 2, 4)] + [dict(guidance_scale=1.0)]
    outputs, compiles = {}, {}
    for dynamic_batch in (True, False):
        torch._dynamo.reset()  # each mode makes its own graphs (the paths' code is shared)
        handle = compile_pipeline(runner.pipe, 2, 0, dynamic_batch=dynamic_batch)
        outputs[dynamic_batch] = [runner(steps=4, **call) for call in calls]
        compiles[dynamic_batch] = handle.counters.compiles
        assert handle.counters.fallbacks == handle.counters.recompiles == 0
        handle.disable()
    for call, got, expected in zip(calls, outputs[True], outputs[False], strict=True):
        assert rel_l2(got, expected) < 1e-4, call
    assert compiles == {True: 4, False: 8}


def test_the_recompile_limit_is_raised_while_compiled_handles_are_enabled_and_then_put_back():
    first, second = Runner("tiny-sd"), Runner("tiny-sd")
    with torch._dynamo.config.patch(recompile_limit=8):
        eager = compile_pipeline(first.pipe, 3, 0, compile=False)
        assert torch._dynamo.config.recompile_limit == 8, "an eager handle compiles nothing"
        eager.disable()
        handles = [compile_pipeline(runner.pipe, 3, 0) for runner in (first, second)]  # nothing compiles yet
        assert torch._dynamo.config.recompile_limit == 64
        handles[0].disable()
        assert torch._dynamo.config.recompile_limit == 64, "the second handle is still enabled"
        handles[1].disable()
        assert torch._dynamo.config.recompile_limit == 8
        handles[0].enable()
        torch._dynamo.config.recompile_limit = 100  # the user's own setting wins over ours
        handles[0].disable()
        assert torch._dynamo.config.recompile_limit == 100


# -- the compile rule: a graph made under one setting is never replayed under another --------------------------------


@pytest.fixture
def dynamo_only(monkeypatch):
    """torch.compile with dynamo's guards and graphs but no inductor (backend "eager"): which setting changes dynamo
    catches, and how often the paths compile, is dynamo's doing; the kernels are inductor's (the unmarked inductor
    tests above and below; the same tests with inductor are marked slow)."""
    compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compile(fn, backend="eager", fullgraph=True,
                                                                         dynamic=False))


def _compare(runner: Runner, handle, tolerance: float, **kwargs) -> torch.Tensor:
    return against_helper(runner, handle, 2, 0, tolerance, steps=4, **kwargs)


def test_lora_hot_swaps_and_per_call_scales_compile_nothing_new_with_freeu_on(lora_dir):
    """Under enable_lora_hotswap the scalings are tensors, which a per-call scale multiplies in place and a swap
    fills: graph inputs, not constants. With FreeU on (its Fourier filter in the full path's graph). Inductor,
    compared with the helper."""
    runner = Runner("tiny-sd")
    pipe = with_text_encoder(runner.pipe)
    pipe.unet.enable_freeu(0.9, 0.2, 1.2, 1.4)
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=4, seed=1), adapter_name="style")
    handle = compile_pipeline(pipe, 2, 0)
    first = _compare(runner, handle, 1e-4, cross_attention_kwargs={"scale": 0.5})
    assert handle.counters.compiles == 2
    pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=8, seed=2), adapter_name="style", hotswap=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        swapped = _compare(runner, handle, 1e-4, cross_attention_kwargs={"scale": 1.3})
    assert rel_l2(swapped, first) > 1e-3
    assert (handle.counters.compiles, handle.counters.recompiles, handle.counters.fallbacks) == (2, 0, 0)
    handle.disable()


@pytest.mark.parametrize("backend", ["dynamo", pytest.param("inductor", marks=pytest.mark.slow)])
def test_every_setting_change_is_caught_compiled_once_and_counted(backend, lora_dir, request):
    """LoRA weights as floats (no hot-swap), IP-Adapter scales, FreeU values, a new adapter: each change makes both
    paths compile once, counted with dynamo's reason; a setting met before compiles nothing."""
    if backend == "dynamo":
        request.getfixturevalue("dynamo_only")
    runner = Runner("tiny-sd")
    pipe = with_text_encoder(runner.pipe)
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=1), adapter_name="a")
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)])
    embeds = image_embeds()
    handle = compile_pipeline(pipe, 2, 0)
    counters = handle.counters
    _compare(runner, handle, 1e-4, ip_adapter_image_embeds=embeds)
    assert (counters.compiles, counters.recompiles) == (2, 0)
    half = dict(cross_attention_kwargs={"scale": 0.5})
    changes = [  # one setting at a time (dynamo reports the guard the last graph failed), and the recompiles it costs
        ("a per-call LoRA scale", lambda: None, 2),
        ("an IP-Adapter scale", lambda: pipe.set_ip_adapter_scale(0.6), 2),
        ("back to the first IP-Adapter scale", lambda: pipe.set_ip_adapter_scale(1.0), 0),
        ("FreeU", lambda: pipe.unet.enable_freeu(0.9, 0.2, 1.2, 1.4), 2),
        ("a second adapter, mixed", lambda: (pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=2),
                                                                      adapter_name="b"),
                                             pipe.set_adapters(["a", "b"], [0.6, 0.8])), 2),
    ]
    for change, apply, recompiles in changes:
        before = counters.recompiles
        apply()
        _compare(runner, handle, 1e-4, ip_adapter_image_embeds=embeds, **half)
        assert counters.recompiles - before == recompiles, change
    assert counters.compiles == 2 and counters.fallbacks == 0
    assert sum(counters.recompile_reasons.values()) == counters.recompiles == 8
    reasons = " ".join(counters.recompile_reasons)  # dynamo's failed guards: the LoRA, IP-Adapter, FreeU settings
    assert all(name in reasons for name in (".scaling[", ".scale[0]", "s1")), list(counters.recompile_reasons)
    handle.disable()


@pytest.mark.parametrize("backend", ["dynamo", pytest.param("inductor", marks=pytest.mark.slow)])
def test_pag_compiles_once_although_it_installs_its_processors_at_every_call(backend, request):
    """PAG puts its processors on its layers at every call and restores the originals after (batch 3 with CFG): its
    second call compiles nothing."""
    from diffusers import StableDiffusionPAGPipeline

    if backend == "dynamo":
        request.getfixturevalue("dynamo_only")
    runner = pag_runner(Runner("tiny-sd"), StableDiffusionPAGPipeline)
    handle = compile_pipeline(runner.pipe, 2, 0)
    first = _compare(runner, handle, 1e-4, pag_scale=3.0)  # the helper's call leaves the original processors too
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(runner(steps=4, pag_scale=3.0), first)
    assert handle.counters.compiles == 2 and handle.counters.recompiles == 0
    assert handle.counters.fallbacks == 0
    handle.disable()
