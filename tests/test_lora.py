"""LoRA on the cached path (lora.py), eager: every diffusers LoRA operation, a per-call scale and hot-swaps, each
against the DeepCache helper on the same pipeline; bad input. Compiled: test_graphs.py and test_gpu.py."""

import pytest
import torch
from conftest import Runner, against_helper, rel_l2, save_lora

from fastcache import compile_pipeline
from fastcache.lora import LoraLayers
from fastcache.models import with_text_encoder

STEPS, INTERVAL, BRANCH = 4, 2, 0


def lora_runner(preset: str = "tiny-sd") -> Runner:
    runner = Runner(preset)
    with_text_encoder(runner.pipe)  # SD pipelines scale the text encoder's LoRA layers for a per-call scale
    return runner


def assert_equals_helper(runner: Runner, handle, **kwargs) -> torch.Tensor:
    return against_helper(runner, handle, INTERVAL, BRANCH, steps=STEPS, **kwargs)


def scalings(unet) -> list:
    return [dict(layer.scaling) for layer in LoraLayers(unet).layers()]


@pytest.mark.parametrize("preset", ["tiny-sd", pytest.param("tiny-sdxl", marks=pytest.mark.slow)])
def test_every_lora_operation_equals_the_helper(preset, lora_dir):
    runner = lora_runner(preset)
    pipe = runner.pipe
    plain = runner(steps=STEPS)
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=1), adapter_name="first")  # before compile_pipeline
    handle = compile_pipeline(pipe, INTERVAL, BRANCH, compile=False)
    first = assert_equals_helper(runner, handle)
    assert rel_l2(first, plain) > 1e-3, "the LoRA must matter"
    assert_equals_helper(runner, handle, cross_attention_kwargs={"scale": 0.4})
    pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=8, seed=2), adapter_name="second")  # after
    pipe.set_adapters(["first", "second"], adapter_weights=[0.7, -0.5])
    assert_equals_helper(runner, handle)
    assert_equals_helper(runner, handle, cross_attention_kwargs={"scale": 1.5})
    pipe.fuse_lora(adapter_names=["first", "second"], lora_scale=0.8)
    assert_equals_helper(runner, handle)
    pipe.unfuse_lora()
    pipe.disable_lora()
    assert_equals_helper(runner, handle)
    pipe.enable_lora()
    pipe.set_adapters("second")
    assert_equals_helper(runner, handle)
    pipe.unload_lora_weights()
    assert_equals_helper(runner, handle)
    assert handle.counters.fallbacks == 0 and handle.counters.shallow > 0
    handle.disable()
    assert rel_l2(runner(steps=STEPS), plain) < 1e-5, "unloaded (fuse and unfuse leave float rounding)"


def test_hot_swaps_and_per_call_scales_equal_the_helper_and_scale_in_place(lora_dir):
    """enable_lora_hotswap makes the scalings tensors: a swap fills them and the handle's per-call scale multiplies
    them in place and puts them back, so the same tensor objects hold every value (what keeps graphs that read them
    valid; diffusers' own forward divides them back into new tensors)."""
    runner = lora_runner()
    pipe = runner.pipe
    pipe.enable_lora_hotswap(target_rank=8)
    pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=4, seed=1), adapter_name="style")
    assert all(isinstance(s["style"], torch.Tensor) for s in scalings(pipe.unet))
    handle = compile_pipeline(pipe, INTERVAL, BRANCH, compile=False)
    before = assert_equals_helper(runner, handle, cross_attention_kwargs={"scale": 0.5})
    pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=8, seed=2), adapter_name="style", hotswap=True)
    swapped = assert_equals_helper(runner, handle, cross_attention_kwargs={"scale": 1.3})
    assert rel_l2(swapped, before) > 1e-3
    assert_equals_helper(runner, handle)
    tensors = [s["style"] for s in scalings(pipe.unet)]
    values = [t.clone() for t in tensors]
    runner(steps=STEPS, cross_attention_kwargs={"scale": 0.7})
    assert all(s["style"] is t and torch.equal(t, v)
               for s, t, v in zip(scalings(pipe.unet), tensors, values, strict=True))
    assert handle.counters.fallbacks == 0
    handle.disable()


def test_the_per_call_scale_multiplies_active_adapters_and_restores_every_scaling_exactly(lora_dir):
    """As scale_lora_layers, on the active adapters; then every scaling as it was (diffusers divides back, which can
    leave a float one rounding off, and after a scale of 0 resets set_adapters weights to 1)."""
    runner = lora_runner()
    pipe = runner.pipe
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=1), adapter_name="a")
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=2), adapter_name="b")
    pipe.set_adapters(["a"], adapter_weights=[0.3])  # b inactive: the forward leaves it alone
    layers = LoraLayers(pipe.unet)
    saved = scalings(pipe.unet)
    for scale in (0.7, 0.0):
        with layers.scaled(scale):
            assert scalings(pipe.unet) == [dict(s, a=s["a"] * scale) for s in saved]
        assert scalings(pipe.unet) == saved

    hotswap = lora_runner().pipe
    hotswap.enable_lora_hotswap(target_rank=4)
    hotswap.load_lora_weights(save_lora(hotswap, lora_dir, seed=1), adapter_name="a")
    layers = LoraLayers(hotswap.unet)
    tensors = [s["a"] for s in scalings(hotswap.unet)]
    values = [t.clone() for t in tensors]
    for scale in (0.7, 0.0):
        with layers.scaled(scale):
            assert all(torch.equal(t, v * scale) for t, v in zip(tensors, values, strict=True))
        assert all(s["a"] is t and torch.equal(t, v) for s, t, v in zip(scalings(hotswap.unet), tensors, values,
                                                                       strict=True))


def test_bad_lora_input_gets_diffusers_errors_and_the_handle_stays_usable(lora_dir):
    runner = lora_runner()
    pipe = runner.pipe
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=1), adapter_name="a")
    handle = compile_pipeline(pipe, INTERVAL, BRANCH, compile=False)
    with pytest.raises(ValueError, match=r"Adapter name\(s\) \{'nope'\} not in the list of present adapters"):
        pipe.set_adapters(["nope"])
    absent = {"unet.no_such_module.lora_A.weight": torch.randn(4, 32),
              "unet.no_such_module.lora_B.weight": torch.randn(32, 4)}
    with pytest.raises(ValueError, match="Target modules {'no_such_module'} not found in the base model"):
        pipe.load_lora_weights(absent, adapter_name="broken")
    assert_equals_helper(runner, handle, cross_attention_kwargs={"scale": 0.6})
    assert handle.counters.fallbacks == 0
    handle.disable()


def test_a_hot_swap_wider_than_target_rank_is_refused_and_changes_nothing(lora_dir):
    runner = lora_runner()
    pipe = runner.pipe
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=4, seed=1), adapter_name="style")
    handle = compile_pipeline(pipe, INTERVAL, BRANCH, compile=False)
    before = runner(steps=STEPS)
    weights = {name: (p, p.clone()) for name, p in pipe.unet.named_parameters()}
    with pytest.raises(ValueError, match=r"have rank 4 .*the target_rank .*target_rank=R\) with R >= 8"):
        pipe.load_lora_weights(save_lora(pipe, lora_dir, rank=8, seed=2), adapter_name="style", hotswap=True)
    assert {name: p for name, (p, _) in weights.items()} == dict(pipe.unet.named_parameters())
    assert all(torch.equal(p, copy) for p, copy in weights.values())
    assert torch.equal(runner(steps=STEPS), before) and handle.counters.fallbacks == 0
    handle.disable()
    assert "load_lora_adapter" not in vars(pipe.unet), "disable() removes the checked loader"
