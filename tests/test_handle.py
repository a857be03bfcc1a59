"""compile_pipeline in eager mode (compile=False) against the original DeepCache helper and the plain pipeline."""

import numpy as np
import pytest
import torch
from conftest import (
    ControlNetRunner,
    Img2ImgRunner,
    Runner,
    against_helper,
    fastcache_run,
    freeu_out_of_place,
    helper_run,
    image_embeds,
    ip_adapter_state_dict,
    pag_runner,
    rel_l2,
)

from fastcache import compile_pipeline
from fastcache.models import random_prompt_embeds
from fastcache.variants import speed_switches


# intervals 2 and 3 in CI (interval 1 is the plain pipeline, tested bit for bit elsewhere); 1 and 5 under -m slow
@pytest.mark.parametrize("interval", [pytest.param(1, marks=pytest.mark.slow), 2, 3,
                                      pytest.param(5, marks=pytest.mark.slow)])
def test_equals_deepcache_helper_for_every_branch(runner, interval):
    for branch in range(3 * len(runner.pipe.unet.down_blocks)):
        expected = helper_run(runner, interval, branch)
        assert rel_l2(fastcache_run(runner, interval, branch), expected) < 1e-5, branch


def test_equals_deepcache_helper_without_guidance(sd_runner):
    expected = helper_run(sd_runner, 3, 1, guidance_scale=1.0)
    assert rel_l2(fastcache_run(sd_runner, 3, 1, guidance_scale=1.0), expected) < 1e-5


def test_fused_qkv_and_channels_last_pipelines_equal_the_helper(runner):
    """The pipeline's own speed switches change the UNet's modules and layout; the paths must follow them."""
    with speed_switches(runner.pipe):
        for branch in range(3 * len(runner.pipe.unet.down_blocks)):
            expected = helper_run(runner, 3, branch)
            assert rel_l2(fastcache_run(runner, 3, branch), expected) < 1e-5, branch
        assert torch.equal(fastcache_run(runner, 1, 0), runner())


def test_interval_one_equals_the_plain_pipeline(runner):
    assert torch.equal(fastcache_run(runner, 1, 0), runner())


def test_disable_restores_the_exact_baseline_and_enable_resumes(runner):
    baseline = runner()
    attributes = dict(vars(runner.pipe.unet))
    handle = compile_pipeline(runner.pipe, 3, 0, compile=False)
    cached = runner()
    assert rel_l2(cached, baseline) > 1e-4, "caching should change the output a little"
    handle.disable()
    assert torch.equal(runner(), baseline)
    assert vars(runner.pipe.unet) == attributes, "disable() must leave the UNet object as it was"
    handle.enable()
    assert torch.equal(runner(), cached)


def test_disable_holds_with_a_users_hook_registered_after_fastcaches(sd_runner):
    """diffusers' remove_hook leaves a later hook calling the removed one: that one must run the original forward."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Passing(ModelHook):  # a user's hook that wraps forward
        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs)

    baseline = sd_runner()
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    HookRegistry.check_if_exists_or_initialize(sd_runner.pipe.unet).register_hook(Passing(), "user's hook")
    cached = sd_runner()
    handle.disable()
    evaluations = handle.counters.full + handle.counters.shallow
    assert torch.equal(sd_runner(), baseline)
    assert handle.counters.full + handle.counters.shallow == evaluations, "a disabled handle ran its paths"
    handle.enable()
    assert torch.equal(sd_runner(), cached)
    assert handle.counters.fallbacks == 0


def test_no_feature_leaks_between_calls_prompts_or_shapes(sd_runner):
    other = random_prompt_embeds(sd_runner.pipe, seed=1)
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    first, second, bigger, again = sd_runner(), sd_runner(embeds=other), sd_runner(size=64), sd_runner()
    handle.disable()
    assert torch.equal(first, again)
    assert torch.equal(second, fastcache_run(sd_runner, 3, 0, embeds=other))
    assert torch.equal(bigger, fastcache_run(sd_runner, 3, 0, size=64))
    assert handle.counters.shapes == 2


def test_counters_follow_the_schedule(sd_runner):
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    sd_runner()
    assert (handle.counters.full, handle.counters.shallow) == (4, 6)
    handle.disable()
    handle = compile_pipeline(sd_runner.pipe, 5, 0, schedule=[0, 1, 7], compile=False)
    sd_runner()
    assert (handle.counters.full, handle.counters.shallow) == (3, 7)


def test_the_paths_hear_of_each_pipeline_call_once(sd_runner, monkeypatch):
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    starts, counters = [], handle.counters
    monkeypatch.setattr(handle.paths, "start_call", lambda: starts.append(counters.full + counters.shallow))
    sd_runner()
    sd_runner(steps=4)
    assert starts == [0, 10], "at the first UNet evaluation of each call, before it runs"
    handle.disable()


@pytest.mark.parametrize("kwargs, error, message", [  # every option's own check is test_config's
    (dict(interval=0), ValueError, "interval must be an int >= 1"),
    (dict(branch=9), ValueError, r"branch must be an int in \[0, 8\]"),  # the UNet's range: checked here
    (dict(cache_size=4), TypeError,
     r"unknown fastcache options: 1 name \(cache_size\); valid: \d+ options \(e.g. interval, branch"),
    (dict(inductor_options={"conv_1x1_as_mm": True, "go_fast": True}), ValueError,
     r"unknown inductor options: 1 name \(go_fast\)"),
    (dict(compile=False, compile_vae=True), ValueError, "need compile=True"),
])
def test_bad_arguments_raise_and_leave_the_pipeline_and_torch_untouched(sd_runner, kwargs, error, message):
    baseline = sd_runner()
    attributes = dict(vars(sd_runner.pipe.unet))
    with torch._dynamo.config.patch(recompile_limit=8), pytest.raises(error, match=message):
        try:
            compile_pipeline(sd_runner.pipe, **kwargs)
        finally:
            assert torch._dynamo.config.recompile_limit == 8, "torch's settings change once all arguments are valid"
    assert vars(sd_runner.pipe.unet) == attributes
    assert torch.equal(sd_runner(), baseline)


def test_numpy_integers_are_accepted_for_interval_and_branch(sd_runner):
    expected = helper_run(sd_runner, 3, 1)
    handle = compile_pipeline(sd_runner.pipe, np.int64(3), np.int32(1), compile=False)
    assert (handle.schedule.interval, handle.partition.boundary.branch) == (3, 1)
    assert rel_l2(sd_runner(), expected) < 1e-5


def test_unsupported_pipelines_are_rejected(sd_runner):
    with pytest.raises(ValueError, match="needs a diffusers pipeline with a `unet`"):
        compile_pipeline(object())
    unet = sd_runner.pipe.unet
    sd_runner.pipe.unet = torch.compile(unet)
    with pytest.raises(ValueError, match="already torch.compile'd"):
        compile_pipeline(sd_runner.pipe)
    sd_runner.pipe.unet = unet
    not_a_unet = type("Pipe", (), {"unet": sd_runner.pipe.vae, "scheduler": sd_runner.pipe.scheduler})()
    with pytest.raises(ValueError, match="supports UNet2DConditionModel"):
        compile_pipeline(not_a_unet)


def test_enabling_twice_on_one_unet_is_refused(sd_runner):
    compile_pipeline(sd_runner.pipe, compile=False)
    with pytest.raises(ValueError, match="already enabled"):
        compile_pipeline(sd_runner.pipe, compile=False)


@torch.no_grad()
def test_sizes_the_paths_cannot_cut_run_the_original_forward(sd_runner):
    unet = sd_runner.pipe.unet
    inputs = (torch.randn(1, 4, 18, 16), torch.tensor(1), torch.randn(1, 77, 32))
    expected = unet(*inputs).sample
    handle = compile_pipeline(sd_runner.pipe, compile=False)
    assert torch.equal(unet(*inputs).sample, expected)
    assert handle.counters.fallbacks == 1 and handle.counters.shapes == 0


def test_unsupported_arguments_fall_back_to_the_original_forward(sd_runner):
    baseline = sd_runner()
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    # attention processors ignore unknown keys, so the uncached result must equal the plain pipeline's
    assert torch.equal(sd_runner(cross_attention_kwargs={"unused": 1}), baseline)
    assert handle.counters.fallbacks == 10 and handle.counters.full == 0


@pytest.mark.parametrize("preset", ["tiny-sd", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_freeu_takes_the_cached_path_and_follows_new_values_between_calls(preset):
    """At branch 3 the recomputed up block applies FreeU itself (resolution 1): the paths must apply it as the up
    block's forward does. The oracle is the helper with FreeU on a copy (conftest.freeu_out_of_place: see below)."""
    runner = Runner(preset)
    handle = compile_pipeline(runner.pipe, 3, 3, compile=False)
    for values in ((0.9, 0.2, 1.2, 1.4), (0.6, 0.4, 1.1, 1.3), None):
        if values:
            runner.pipe.unet.enable_freeu(*values)
        else:
            runner.pipe.unet.disable_freeu()
        with freeu_out_of_place():
            against_helper(runner, handle, 3, 3, steps=6)
    assert handle.counters.fallbacks == 0 and handle.counters.shallow == 12


def test_the_helper_scales_its_cached_feature_again_at_every_skip_step_under_freeu(sd_runner):
    """Why the FreeU oracle applies FreeU to a copy: diffusers' apply_freeu scales the hidden state in place, which
    in the helper is its cached output. Where the recomputed up block applies no FreeU (branch 0: resolution 2) the
    helper is exact as it is; at branch 3 its skip steps drift from the full step's FreeU."""
    sd_runner.pipe.unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    for branch, exact in ((0, True), (3, False)):
        raw = helper_run(sd_runner, 3, branch, steps=6)
        with freeu_out_of_place():
            on_a_copy = helper_run(sd_runner, 3, branch, steps=6)
        assert (rel_l2(raw, on_a_copy) < 1e-6) == exact, branch
        assert rel_l2(fastcache_run(sd_runner, 3, branch, steps=6), on_a_copy) < 1e-5


def test_calls_with_autograd_on_fall_back_and_leave_the_feature_buffer_out_of_the_graph(sd_runner):
    """Pipelines run under no_grad; a direct call with grad on must neither cache nor track the buffer."""
    unet = sd_runner.pipe.unet
    inputs = dict(sample=torch.randn(2, 4, 16, 16), timestep=torch.tensor(10),
                  encoder_hidden_states=sd_runner.embeds["prompt_embeds"].repeat(2, 1, 1))
    expected = unet(**inputs).sample
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)
    out = unet(**inputs).sample
    assert torch.equal(out, expected) and handle.counters.fallbacks == 1 and handle.counters.full == 0
    with torch.no_grad():
        unet(**inputs)
    assert handle.counters.full == 1 and not any(buffer.requires_grad for buffer in handle.buffers.values())


def test_img2img_counts_steps_from_its_first_denoising_step(sd_runner):
    """img2img starts mid-schedule (strength < 1): step 0 of the call is its first evaluation, as in the helper."""
    img2img = Img2ImgRunner(sd_runner)
    expected = helper_run(img2img, 3, 2)
    assert rel_l2(fastcache_run(img2img, 3, 2), expected) < 1e-5


def test_set_interval_applies_to_loops_that_start_later_and_compiles_nothing(sd_runner):
    baseline, expected = sd_runner(), helper_run(sd_runner, 2, 0)
    handle = compile_pipeline(sd_runner.pipe, 3, 0, compile=False)

    def switch(pipe, step, timestep, kwargs):  # in the middle of a call: that loop keeps its schedule
        if step == 1:
            handle.set_interval(1)
        return kwargs

    sd_runner(callback_on_step_end=switch)
    assert (handle.counters.full, handle.counters.shallow) == (4, 6)
    assert torch.equal(sd_runner(), baseline), "interval 1 is the plain pipeline"
    assert (handle.counters.full, handle.counters.shallow) == (14, 6)
    assert handle.set_interval(2) is handle and rel_l2(sd_runner(), expected) < 1e-5
    assert (handle.config.interval, handle.schedule.interval, handle.counters.shapes) == (2, 2, 1)
    for bad, error in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(error, match="interval must be an int >= 1"):
            handle.set_interval(bad)
    assert handle.config.interval == 2, "a bad value changes nothing"
    handle.disable()
    explicit = compile_pipeline(sd_runner.pipe, 3, 0, schedule=[0, 4], compile=False)
    with pytest.raises(ValueError, match="explicit schedule"):
        explicit.set_interval(2)


@pytest.mark.parametrize("preset", ["tiny-sd", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_ip_adapters_take_the_cached_path_under_every_scale(preset):
    """Two IP-Adapters from ip_adapter_image_embeds; set_ip_adapter_scale between calls."""
    runner = Runner(preset)
    pipe = runner.pipe
    plain = runner(steps=6)
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet, seed=1), ip_adapter_state_dict(pipe.unet,
                                                                                                         seed=2)])
    embeds = image_embeds(2)
    handle = compile_pipeline(pipe, 3, 0, compile=False)
    for scale in ([1.0, 1.0], [0.7, 0.0], [0.3, 1.2]):
        pipe.set_ip_adapter_scale(scale)
        got = against_helper(runner, handle, 3, 0, steps=6, ip_adapter_image_embeds=embeds)
        assert rel_l2(got, plain) > 1e-3, scale
    assert handle.counters.fallbacks == 0 and handle.counters.shallow == 12


def test_ip_adapter_image_goes_through_the_image_encoder_then_the_cached_path(sd_runner):
    from diffusers import StableDiffusionPipeline
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8,
        projection_dim=16))
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pipe = StableDiffusionPipeline.from_pipe(sd_runner.pipe, image_encoder=encoder, feature_extractor=processor)
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)])
    runner = Runner("tiny-sd", pipe)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    expected = helper_run(runner, 3, 0, steps=6, ip_adapter_image=image)
    handle = compile_pipeline(pipe, 3, 0, compile=False)
    assert rel_l2(runner(steps=6, ip_adapter_image=image), expected) < 1e-5
    assert handle.counters.fallbacks == 0 and handle.counters.shallow == 4


def _pag_call(kind: str, runner: Runner) -> dict:
    """The call arguments a PAG pipeline of ``kind`` needs beyond the prompt: images, masks, control images."""
    generator = torch.Generator().manual_seed(4)
    image = torch.rand(1, 3, 32, 32, generator=generator)
    if kind == "img2img":
        return dict(image=image, strength=0.7)
    if kind == "inpaint":
        mask = torch.zeros(1, 1, 32, 32)
        mask[..., 8:24, 8:24] = 1
        return dict(image=image, mask_image=mask, strength=1.0, height=32, width=32)
    kwargs = dict(height=32, width=32)
    if kind == "controlnet":
        kwargs["image"] = image
    return kwargs


PAG_PIPELINES = {"sd": ("tiny-sd", "StableDiffusionPAGPipeline", "text"),
                 "sd-img2img": ("tiny-sd", "StableDiffusionPAGImg2ImgPipeline", "img2img"),
                 "sd-inpaint": ("tiny-sd", "StableDiffusionPAGInpaintPipeline", "inpaint"),
                 "sd-controlnet": ("tiny-sd", "StableDiffusionControlNetPAGPipeline", "controlnet"),
                 "sdxl": ("tiny-sdxl", "StableDiffusionXLPAGPipeline", "text"),
                 "sdxl-img2img": ("tiny-sdxl", "StableDiffusionXLPAGImg2ImgPipeline", "img2img"),
                 "sdxl-inpaint": ("tiny-sdxl", "StableDiffusionXLPAGInpaintPipeline", "inpaint"),
                 "sdxl-controlnet": ("tiny-sdxl", "StableDiffusionXLControlNetPAGPipeline", "controlnet")}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if name.startswith("sdxl-") else [])
                                  for name in PAG_PIPELINES])
def test_pag_pipelines_take_the_cached_path_and_equal_the_helper(name):
    """PAG swaps the self-attention processors of its layers at every call (batch 3 with guidance)."""
    import diffusers

    preset, cls, kind = PAG_PIPELINES[name]
    base = ControlNetRunner(preset) if kind == "controlnet" else Runner(preset)
    pipe = pag_runner(base, getattr(diffusers, cls)).pipe
    kwargs = dict(_pag_call(kind, base), pag_scale=3.0, num_inference_steps=6, output_type="latent",
                  **base.embeds)

    run = _Call(pipe, kwargs)
    expected = helper_run(run, 3, 0)
    handle = compile_pipeline(pipe, 3, 0, compile=False)
    assert rel_l2(run(), expected) < 1e-5
    assert handle.counters.fallbacks == 0 and handle.counters.shallow > 0
    assert [buffer.shape[0] for buffer in handle.buffers.values()] == [3], "one shape, batch 3: PAG and CFG"
    assert handle.counters.shapes == 1


class _Call:
    """A pipeline call with fixed arguments and seed, for helper_run."""

    def __init__(self, pipe, kwargs: dict):
        self.pipe, self.kwargs = pipe, kwargs

    def __call__(self) -> torch.Tensor:
        return self.pipe(generator=torch.Generator().manual_seed(0), **self.kwargs).images
