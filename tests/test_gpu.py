"""GPU-only checks of the CUDA-graph path (skipped without CUDA): fp16, reduce-overhead, two graphs, no re-records."""

import pytest
import torch
from conftest import AdapterRunner, ControlNetRunner, InpaintRunner, Runner, image_embeds, rel_l2, save_lora
from diffusers import EulerDiscreteScheduler

from fastcache import compile_pipeline
from fastcache.graphs import cudagraph_recordings
from fastcache.models import random_ip_adapter, with_text_encoder
from fastcache.variants import VARIANTS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_runner(preset: str = "tiny-sd", runner: Runner | None = None) -> Runner:
    runner = runner or Runner(preset)
    runner.pipe.to("cuda", torch.float16)
    runner.embeds = {k: v.to("cuda", torch.float16) for k, v in runner.embeds.items()}
    return runner


def test_cuda_graphs_record_once_per_path_and_shape_and_match_eager():
    runner = cuda_runner()
    eager = compile_pipeline(runner.pipe, 3, 0, compile=False)
    expected = runner()
    eager.disable()

    handle = compile_pipeline(runner.pipe, 3, 0)
    recordings = cudagraph_recordings()
    first = runner()
    assert cudagraph_recordings() - recordings == 2, "one CUDA graph per path"
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(3):
            again = runner()
    assert cudagraph_recordings() - recordings == 2, "no re-record in steady state"
    assert torch.equal(again, first)
    assert rel_l2(first, expected) < 5e-3
    handle.disable()


def test_a_second_shape_records_its_own_pair_without_disturbing_the_first():
    runner = cuda_runner()
    handle = compile_pipeline(runner.pipe, 3, 0)
    small = runner()
    recordings = cudagraph_recordings()
    runner(size=64)
    assert cudagraph_recordings() - recordings == 2
    assert torch.equal(runner(), small)
    handle.disable()


@pytest.mark.parametrize("mode", ["reduce-overhead", "static-cudagraphs"])
def test_dynamic_batch_compiles_once_records_cuda_graphs_per_bucket_and_matches_static_shapes(mode):
    """Guidance on, 1, 2 and 4 images: one graph per path for all three buckets (no compile after the first), CUDA
    graphs recorded (cudagraph trees) or captured (by hand) per bucket and replayed after, images as the static
    graphs'."""
    runner = cuda_runner()
    sizes = (1, 2, 4)
    static = compile_pipeline(runner.pipe, 3, 0, mode=mode, dynamic_batch=False)
    expected = {n: runner(num_images_per_prompt=n) for n in sizes}
    assert static.counters.compiles == 6
    static.disable()
    torch._dynamo.reset()  # the dynamic handle makes its own graphs (the paths' code is shared)

    handle = compile_pipeline(runner.pipe, 3, 0, mode=mode)
    recordings = cudagraph_recordings()
    first = {1: runner()}
    with torch.compiler.set_stance("fail_on_recompile"):
        first.update({n: runner(num_images_per_prompt=n) for n in sizes[1:]})
        graphs = cudagraph_recordings() - recordings + handle.counters.captures
        assert handle.counters.compiles == 2 and graphs == 2 * len(sizes), "one compile per path, graphs per bucket"
        for n in sizes:
            assert torch.equal(runner(num_images_per_prompt=n), first[n])
    assert cudagraph_recordings() - recordings + handle.counters.captures == graphs, "replayed, not recorded again"
    assert handle.counters.recompiles == handle.counters.fallbacks == 0
    for n in sizes:
        assert rel_l2(first[n], expected[n]) < 5e-3, n
    handle.disable()


@pytest.mark.parametrize("variant, scheduler_step", [("fastcache", False), ("fastcache-static-fused", True)])
def test_steady_state_steps_never_sync_with_the_host(variant, scheduler_step):
    """UNet calls (and with the fused step, scheduler steps) as the pipeline makes them: no grad, warmed shapes."""
    runner = cuda_runner()
    with VARIANTS[variant].applied(runner.pipe, 3, 0) as handle:
        runner()  # warm both paths at batch 2 (CFG)
        unet, scheduler = runner.pipe.unet, runner.pipe.scheduler
        embeds = runner.embeds["prompt_embeds"].repeat(2, 1, 1)
        sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
        scheduler.set_timesteps(7, device="cuda")
        timesteps = list(scheduler.timesteps)  # 0-d CUDA tensors, as the pipeline's loop gets them
        before = (handle.counters.full, handle.counters.shallow)

        def step(t):
            nonlocal sample
            out = unet(sample, t, encoder_hidden_states=embeds, return_dict=False)[0]
            if scheduler_step:
                sample = scheduler.step(out, t, sample, return_dict=False)[0]

        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
                for t in timesteps:
                    step(t)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert (handle.counters.full - before[0], handle.counters.shallow - before[1]) == (3, 4)


def test_static_cudagraphs_capture_once_per_path_and_match_reduce_overhead():
    runner = cuda_runner()
    handle = compile_pipeline(runner.pipe, 3, 0)
    expected = runner()
    handle.disable()
    static = compile_pipeline(runner.pipe, 3, 0, mode="static-cudagraphs")
    first = runner()
    assert static.counters.captures == 2
    with torch.compiler.set_stance("fail_on_recompile"):
        again = runner()
    assert static.counters.captures == 2 and static.counters.replays == 20
    assert torch.equal(again, first)
    assert rel_l2(first, expected) < 5e-3
    static.disable()


def test_static_cudagraphs_take_numbers_and_cpu_tensors_as_device_inputs_never_captured_stale():
    """Direct calls with a Python-number timestep and CPU conditioning tensors (SDXL's time ids): both become
    device inputs of the one captured graph, so a replay at another timestep computes that timestep."""
    runner = cuda_runner("tiny-sdxl")
    unet = runner.pipe.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator).to("cuda", torch.float16)
    context = runner.embeds["prompt_embeds"].repeat(2, 1, 1)
    conditioning = dict(text_embeds=runner.embeds["pooled_prompt_embeds"].repeat(2, 1).cpu(),
                        time_ids=torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2, dtype=torch.float16))

    def call(timestep, device):
        added = {name: value.to(device) for name, value in conditioning.items()}
        return unet(sample, timestep, encoder_hidden_states=context, added_cond_kwargs=added).sample

    with torch.no_grad():
        expected = {t: call(torch.tensor(t, device="cuda"), "cuda") for t in (999, 10)}
        static = compile_pipeline(runner.pipe, 3, 0, mode="static-cudagraphs")
        outputs = [(t, call(t, "cpu")) for t in (999, 10, 999)]
    assert static.counters.captures == 1 and static.counters.unplaced == 3
    assert all(rel_l2(out, expected[t]) < 5e-3 for t, out in outputs)
    static.disable()


def test_static_cudagraphs_capture_again_once_the_weights_move():
    """New weight tensors (as .to() or fused projections make): replaying the old capture would read the old ones."""
    runner = cuda_runner()
    static = compile_pipeline(runner.pipe, 3, 0, mode="static-cudagraphs")
    runner()
    with torch.no_grad():
        for param in runner.pipe.unet.parameters():
            param.data = param.data * 0.9
    moved = runner()
    assert static.counters.captures == 4
    static.disable()
    eager = compile_pipeline(runner.pipe, 3, 0, compile=False)
    expected = runner()
    eager.disable()
    assert rel_l2(moved, expected) < 5e-3


def test_static_cudagraphs_capture_again_for_a_scheduler_with_other_timestep_dtypes():
    """Euler's float timesteps get graphs of their own instead of being cast into DDIM's int64 input."""
    runner = cuda_runner()
    ddim = runner.pipe.scheduler
    euler = EulerDiscreteScheduler.from_config(ddim.config)
    runner.pipe.scheduler = euler
    eager = compile_pipeline(runner.pipe, 3, 0, compile=False)
    expected = runner()
    eager.disable()
    runner.pipe.scheduler = ddim
    static = compile_pipeline(runner.pipe, 3, 0, mode="static-cudagraphs")
    runner()
    runner.pipe.scheduler = euler
    swapped = runner()
    assert static.counters.captures == 4
    assert rel_l2(swapped, expected) < 5e-3
    static.disable()


def test_tuned_variant_captures_once_and_matches_the_plain_runtime():
    """fused QKV + channels_last + compiled decoder + fused step + static graphs, on CUDA in fp16."""
    runner = cuda_runner()
    handle = compile_pipeline(runner.pipe, 3, 0)
    expected = runner(output_type="pt")
    handle.disable()
    with VARIANTS["fastcache-tuned"].applied(runner.pipe, 3, 0) as tuned:
        first = runner(output_type="pt")
        with torch.compiler.set_stance("fail_on_recompile"):
            again = runner(output_type="pt")
        assert tuned.counters.captures == 2
    assert torch.equal(again, first)
    assert rel_l2(first, expected) < 5e-3


@pytest.mark.parametrize("mode", ["reduce-overhead", "static-cudagraphs"])
def test_controlnet_pipeline_records_four_graphs_never_syncs_and_matches_eager(mode):
    """UNet and ControlNet, full and shallow: one CUDA graph each; the hand-driven steady state (the ControlNet,
    then the UNet with its residuals, as the pipeline calls them) never waits on the host."""
    runner = cuda_runner(runner=ControlNetRunner("tiny-sd"))
    runner.image = runner.image.to("cuda", torch.float16)
    eager = compile_pipeline(runner.pipe, 3, 0, compile=False)
    expected = runner()
    eager.disable()
    handle = compile_pipeline(runner.pipe, 3, 0, mode=mode)
    recordings = cudagraph_recordings()
    first = runner()
    graphs = cudagraph_recordings() - recordings + handle.counters.captures
    assert graphs == 4, "UNet and ControlNet, full and shallow"
    assert rel_l2(first, expected) < 5e-3 and handle.counters.controlnet_shallow == 6
    pipe = runner.pipe
    context = torch.cat([runner.embeds["negative_prompt_embeds"], runner.embeds["prompt_embeds"]])
    image = torch.cat([runner.image] * 2)
    pipe.scheduler.set_timesteps(10, device="cuda")
    timesteps = list(pipe.scheduler.timesteps)
    sample = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.float16)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
            for t in timesteps:
                down, mid = pipe.controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=image,
                                            return_dict=False)
                pipe.unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert cudagraph_recordings() - recordings + handle.counters.captures == 4, "no re-record in steady state"
    assert handle.counters.controlnet_shallow == 12 and handle.counters.controlnet_recomputes == 0
    handle.disable()


@pytest.mark.parametrize("mode", ["reduce-overhead", "static-cudagraphs"])
@pytest.mark.parametrize("make, branch", [(lambda: AdapterRunner("tiny-sdxl"), 5),
                                          (lambda: InpaintRunner("tiny-sd"), 0)],
                         ids=["t2i-adapter", "inpaint-9-channels"])
def test_adapter_and_inpaint_pipelines_record_two_graphs_and_match_eager(make, branch, mode):
    """T2I-Adapter residuals (a list of tensors; the skip step's graph takes only those it adds) and a 9-channel
    UNet: one CUDA graph per path, none recorded again on the next call."""
    runner = cuda_runner(runner=make())
    eager = compile_pipeline(runner.pipe, 3, branch, compile=False)
    expected = runner()
    eager.disable()
    handle = compile_pipeline(runner.pipe, 3, branch, mode=mode)
    recordings = cudagraph_recordings()
    first = runner()
    assert cudagraph_recordings() - recordings + handle.counters.captures == 2, "one graph per path"
    with torch.compiler.set_stance("fail_on_recompile"):
        again = runner()
    assert cudagraph_recordings() - recordings + handle.counters.captures == 2, "no re-record on the next call"
    assert torch.equal(again, first) and rel_l2(first, expected) < 5e-3
    assert handle.counters.fallbacks == 0 and handle.counters.shallow >= handle.counters.full > 0
    handle.disable()


# -- settings (run as their own row of bench/device_check.sh): hot-swaps and scales under CUDA graphs ---------------


@pytest.mark.parametrize("mode", ["reduce-overhead", "static-cudagraphs"])
def test_settings_lora_hot_swaps_and_per_call_scales_record_no_cuda_graph(mode, lora_dir):
    """Under enable_lora_hotswap a swap copies weights and scalings in place and a per-call scale multiplies the
    scaling tensors in place: the graphs recorded at the first call replay every later one and compute the new
    LoRA (against the eager runtime)."""
    runner = cuda_runner()
    pipe = with_text_encoder(runner.pipe)
    pipe.enable_lora_hotswap(target_rank=8)
    loras = [save_lora(pipe, lora_dir, rank=4, seed=1), save_lora(pipe, lora_dir, rank=8, seed=2)]
    pipe.load_lora_weights(loras[0], adapter_name="style")
    calls = [(1, dict(cross_attention_kwargs={"scale": 0.5})), (1, {}),  # (which LoRA, call arguments)
             (0, dict(cross_attention_kwargs={"scale": 1.3}))]

    def run_all() -> list[torch.Tensor]:
        outputs = []
        for lora, kwargs in calls:
            pipe.load_lora_weights(loras[lora], adapter_name="style", hotswap=True)
            outputs.append(runner(**kwargs))
        return outputs

    eager = compile_pipeline(pipe, 3, 0, compile=False)
    expected = run_all()
    eager.disable()
    handle = compile_pipeline(pipe, 3, 0, mode=mode)
    runner(cross_attention_kwargs={"scale": 0.5})  # lora 0: records (or captures) both paths
    recorded = cudagraph_recordings() + handle.counters.captures
    with torch.compiler.set_stance("fail_on_recompile"):
        outputs = run_all()
    assert cudagraph_recordings() + handle.counters.captures == recorded, "no CUDA graph recorded again"
    assert (handle.counters.recompiles, handle.counters.recaptures, handle.counters.fallbacks) == (0, 0, 0)
    assert all(rel_l2(out, exp) < 5e-3 for out, exp in zip(outputs, expected, strict=True))
    assert rel_l2(outputs[0], outputs[2]) > 5e-3, "the swaps and scales must change the output"
    handle.disable()


def test_settings_static_cudagraphs_capture_per_ip_adapter_scale_and_never_replay_a_stale_one():
    """OneDiff #839 (the same image for every set_ip_adapter_scale): a capture is replayed only under the settings it
    was captured with; a new scale captures once, going back replays the first capture."""
    runner = cuda_runner()
    pipe = runner.pipe
    pipe.unet._load_ip_adapter_weights([random_ip_adapter(pipe.unet, 16)])
    embeds = [e.to("cuda", torch.float16) for e in image_embeds()]
    eager = compile_pipeline(pipe, 3, 0, compile=False)
    expected = {}
    for scale in (1.0, 0.3):
        pipe.set_ip_adapter_scale(scale)
        expected[scale] = runner(ip_adapter_image_embeds=embeds)
    eager.disable()
    static = compile_pipeline(pipe, 3, 0, mode="static-cudagraphs")
    outputs = []
    for scale in (1.0, 0.3, 1.0):
        pipe.set_ip_adapter_scale(scale)
        outputs.append((scale, runner(ip_adapter_image_embeds=embeds)))
    assert static.counters.captures == 4 and static.counters.recaptures == 2
    assert static.counters.recapture_reasons == {"IP-Adapter scales": 2}
    assert all(rel_l2(out, expected[scale]) < 5e-3 for scale, out in outputs)
    assert torch.equal(outputs[0][1], outputs[2][1])
    static.disable()
