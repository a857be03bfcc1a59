"""ControlNet pipelines under the cache: the shallow ControlNet against the ControlNet's forward, and whole pipelines
against the DeepCache helper on the same ControlNet pipeline (fp32, tiny configs, random weights)."""

import pytest
import torch
from conftest import SIZE, STEPS, ControlNetRunner, deepcache_helper, helper_run, rel_l2, unet_inputs
from diffusers import ControlNetModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from torch._dynamo.utils import counters as dynamo_counters
from torch.utils.flop_counter import FlopCounterMode

from fastcache import compile_pipeline
from fastcache.controlnet import ControlNetPartition, residual_shapes
from fastcache.models import PRESETS, build_pipeline, with_controlnet
from fastcache.partition import branch_positions, resolve_branch

BRANCHES = range(9)  # the tiny UNets have three down blocks of two layers


def controlnet_inputs(net, batch=2, seed=0):
    inputs = unet_inputs(net, batch, seed=seed)
    inputs["controlnet_cond"] = torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return inputs


@pytest.fixture(params=["tiny-sd", "tiny-sdxl"])
def nets(request):
    return with_controlnet(build_pipeline(request.param), count=2).controlnet.nets


def partition_call(inputs, scales):
    """The partition's arguments for a call of the nets with ``inputs`` and per-net ``scales``."""
    conds = [inputs["controlnet_cond"], inputs["controlnet_cond"].flip(0)]
    call = {k: v for k, v in inputs.items() if k != "controlnet_cond"}
    return dict(call, controlnet_cond=conds[:len(scales)], conditioning_scale=scales), conds


@torch.no_grad()
def test_full_partition_equals_the_controlnet_forward_bit_for_bit(nets):
    inputs = controlnet_inputs(nets[0])
    call, conds = partition_call(inputs, [0.7, 1.3])
    plain = {k: v for k, v in inputs.items() if k != "controlnet_cond"}
    expected = MultiControlNetModel(nets)(**plain, controlnet_cond=conds, conditioning_scale=[0.7, 1.3],
                                          return_dict=False)
    down, mid = ControlNetPartition(nets, resolve_branch(nets[0], 0)).full(**call)
    assert len(down) == len(expected[0]) and all(torch.equal(a, b) for a, b in zip(down, expected[0], strict=True))
    assert torch.equal(mid, expected[1])
    shapes, mid_shape = residual_shapes(nets[0], inputs["sample"].shape)
    assert [tuple(r.shape) for r in down] == shapes and tuple(mid.shape) == mid_shape


@torch.no_grad()
def test_shallow_partition_computes_the_residuals_of_the_shallow_skips_bit_for_bit(nets):
    inputs = controlnet_inputs(nets[0])
    for count in (1, 2):
        call, _ = partition_call(inputs, [0.5, 1.0][:count])
        for branch in BRANCHES:
            partition = ControlNetPartition(nets[:count], resolve_branch(nets[0], branch))
            full_down, _ = partition.full(**call)
            shallow = partition.shallow(**call)
            assert len(shallow) == partition.boundary.shallow_skips, branch
            assert all(torch.equal(a, b) for a, b in zip(shallow, full_down, strict=False)), branch


def flop_counts(fn, **kwargs) -> dict[str, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(**kwargs)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def test_the_shallow_controlnet_computes_what_the_shallow_unet_needs_and_nothing_more():
    """Its FLOPs are exactly those of the modules it needs, as they count in a whole forward: embeddings, conv_in,
    the conditioning embedding, the down layers above the branch and their zero convolutions."""
    net = with_controlnet(build_pipeline("tiny-sd")).controlnet
    inputs = controlnet_inputs(net)
    whole = flop_counts(net, **inputs, return_dict=False)
    for branch in BRANCHES:
        boundary = resolve_branch(net, branch)
        if boundary.at_mid_output:
            continue  # a skip step there needs every residual: the whole ControlNet runs
        needed = ["time_embedding", "conv_in", "controlnet_cond_embedding",
                  *(f"down_blocks.{b}" for b in range(boundary.block)),
                  *(f"down_blocks.{boundary.block}.{kind}.{i}" for kind in ("resnets", "attentions")
                    for i in range(boundary.layer)),
                  *(f"controlnet_down_blocks.{i}" for i in range(boundary.shallow_skips))]
        expected = sum(whole.get(f"ControlNetModel.{name}", 0) for name in needed)
        call, _ = partition_call(inputs, [1.0])
        shallow = flop_counts(ControlNetPartition([net], boundary).shallow, **call)["Global"]
        assert shallow == expected < whole["Global"], branch


def test_branch_positions_of_a_controlnet_are_the_unets():
    pipe = with_controlnet(build_pipeline("tiny-sd"))
    assert branch_positions(pipe.controlnet) == branch_positions(pipe.unet)


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("interval", [1, 2, 3, 5])
def test_equals_the_helper_on_a_controlnet_pipeline_for_every_branch(preset, interval):
    runner = ControlNetRunner(preset)
    for branch in BRANCHES:
        expected = helper_run(runner, interval, branch)
        handle = compile_pipeline(runner.pipe, interval, branch, compile=False)
        assert rel_l2(runner(), expected) < 1e-5, branch
        shallow_controlnet = 0 if handle.partition.boundary.at_mid_output else handle.counters.shallow
        assert handle.counters.controlnet_shallow == shallow_controlnet, branch
        handle.disable()


def test_interval_one_is_the_plain_controlnet_pipeline():
    runner = ControlNetRunner("tiny-sd", count=2)
    plain = runner()
    handle = compile_pipeline(runner.pipe, 1, 0, compile=False)
    assert torch.equal(runner(), plain)
    assert handle.counters.controlnet_shallow == 0


@pytest.mark.parametrize("preset", ["tiny-sd", "tiny-sdxl"])
@pytest.mark.parametrize("kwargs", [dict(), dict(guess_mode=True), dict(control_guidance_end=0.5),
                                    dict(controlnet_conditioning_scale=[0.6, 1.4], control_guidance_start=0.2)],
                         ids=["two-controlnets", "guess-mode", "guidance-end", "scales-and-start"])
def test_two_controlnets_and_the_pipelines_controlnet_options_equal_the_helper(preset, kwargs):
    runner = ControlNetRunner(preset, count=2)
    for branch in (0, 4):
        expected = helper_run(runner, 3, branch, **kwargs)
        handle = compile_pipeline(runner.pipe, 3, branch, compile=False)
        assert rel_l2(runner(**kwargs), expected) < 1e-5, branch
        expected_shallow = 0 if kwargs.get("guess_mode") else handle.counters.shallow  # guess mode: whole
        assert handle.counters.controlnet_shallow == expected_shallow
        handle.disable()


@pytest.mark.parametrize("variant", ["img2img", "inpaint"])
def test_img2img_and_inpaint_controlnet_pipelines_equal_the_helper(variant):
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline

    runner = ControlNetRunner("tiny-sd")
    generator = torch.Generator().manual_seed(2)
    extra = dict(image=torch.rand(1, 3, 32, 32, generator=generator), strength=0.6, control_image=runner.image)
    kind = StableDiffusionControlNetImg2ImgPipeline
    if variant == "inpaint":
        kind = StableDiffusionControlNetInpaintPipeline
        extra["mask_image"] = (torch.rand(1, 1, 32, 32, generator=generator) > 0.5).float()
    pipe = kind.from_pipe(runner.pipe)
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **runner.embeds, **extra).images

    with deepcache_helper(pipe, 3, 2):
        expected = run()
    handle = compile_pipeline(pipe, 3, 2, compile=False)
    assert rel_l2(run(), expected) < 1e-5
    assert handle.counters.controlnet_shallow == handle.counters.shallow == 4


@torch.no_grad()
def test_a_unet_evaluation_that_cannot_be_shallow_after_all_gets_the_whole_controlnets_residuals():
    """A hand loop whose UNet call at a skip step falls back (here: cross_attention_kwargs): the shallow ControlNet's
    residuals are replaced by the whole ControlNet's, recomputed on the same call; never its NaN placeholders."""
    runner = ControlNetRunner("tiny-sd")
    pipe, embeds = runner.pipe, runner.embeds
    scheduler, unet, controlnet = pipe.scheduler, pipe.unet, pipe.controlnet
    context = torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
    image = torch.cat([runner.image] * 2)

    def loop(fallback_at=None):
        scheduler.set_timesteps(4)
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        outputs = []
        for i, t in enumerate(scheduler.timesteps):
            down, mid = controlnet(x, t, encoder_hidden_states=context, controlnet_cond=image, return_dict=False)
            extra = dict(cross_attention_kwargs={"unused": 1}) if i == fallback_at else {}
            outputs.append(unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid, **extra).sample)
        return outputs

    handle = compile_pipeline(pipe, 3, 0, compile=False)
    cached = loop(fallback_at=1)
    assert handle.counters.controlnet_shallow == 1 and handle.counters.controlnet_recomputes == 1
    handle.disable()
    # step 1 is the plain UNet with the whole ControlNet's residuals; the fallback left the loop, so it runs full
    assert all(torch.equal(a, b) for a, b in zip(cached, loop(), strict=True))


def test_the_compiled_runtime_matches_the_helper_and_never_recompiles():
    runner = ControlNetRunner("tiny-sd")
    expected = helper_run(runner, 3, 1)
    handle = compile_pipeline(runner.pipe, 3, 1)
    graphs_before = dynamo_counters["stats"]["unique_graphs"]
    first = runner()
    assert rel_l2(first, expected) < 1e-4
    assert dynamo_counters["stats"]["unique_graphs"] - graphs_before == 4, "UNet and ControlNet, full and shallow"
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(runner(), first)
    assert handle.counters.compiles == 4 and handle.counters.controlnet_shallow == 12
    handle.disable()


def test_unsupported_controlnets_are_refused_naming_what_is_supported():
    pipe = with_controlnet(build_pipeline("tiny-sd"))
    pipe.controlnet = MultiControlNetModel([pipe.controlnet, torch.nn.Linear(1, 1)])
    with pytest.raises(ValueError, match=r"supports ControlNetModel, MultiControlNetModel of ControlNetModels and "
                                         r"SparseControlNetModel; this pipeline has a MultiControlNetModel of "
                                         r"\['Linear'\]"):
        compile_pipeline(pipe)
    config = {k: v for k, v in PRESETS["tiny-sd"]["unet"].items() if k not in ("sample_size", "up_block_types")}
    pipe.controlnet = ControlNetModel(**dict(config, layers_per_block=1), conditioning_embedding_out_channels=(16, 32))
    with pytest.raises(ValueError, match="needs a ControlNet whose down blocks are the UNet's"):
        compile_pipeline(pipe)
