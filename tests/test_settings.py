"""settings.py: what a hand-captured graph bakes in besides its inputs, read before every replay (the static graphs
kept per settings: test_static_graphs.py)."""

import pytest
from conftest import Runner, ip_adapter_state_dict, pag_runner, save_lora
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

from fastcache.lora import LoraLayers
from fastcache.partition import UNetPartition
from fastcache.settings import SettingsWatch, path_settings

LORA, IP, FREEU, PROCESSORS = "LoRA adapters and scales", "IP-Adapter scales", "FreeU values", "attention processors"


@pytest.fixture
def pipe(lora_dir):
    """tiny-sd with two LoRAs (float scalings) and an IP-Adapter."""
    pipe = Runner("tiny-sd").pipe
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=1), adapter_name="a")
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=2), adapter_name="b")
    pipe.set_adapters(["a", "b"], [1.0, 1.0])
    pipe.unet._load_ip_adapter_weights([ip_adapter_state_dict(pipe.unet)])
    return pipe


def test_each_setting_a_graph_bakes_in_is_noticed_and_equal_values_are_not(pipe):
    unet = pipe.unet
    full, _ = path_settings(UNetPartition(unet, 0), unet)
    captured = full.read()
    same_values = {
        "the same IP-Adapter scale again": lambda: pipe.set_ip_adapter_scale(1.0),
        "the same adapters and weights again": lambda: pipe.set_adapters(["a", "b"], [1.0, 1.0]),
        "FreeU enabled and disabled": lambda: (unet.enable_freeu(0.9, 0.2, 1.2, 1.4), unet.disable_freeu()),
    }
    for change, apply in same_values.items():
        apply()
        assert full.same(full.read(), captured), change
    mid = unet.mid_block.attentions[0].transformer_blocks[0].attn1
    processor = mid.processor
    changes = {  # change -> (what it changes, how to undo it)
        "IP-Adapter scale": (IP, lambda: pipe.set_ip_adapter_scale(0.5), lambda: pipe.set_ip_adapter_scale(1.0)),
        "FreeU values": (FREEU, lambda: unet.enable_freeu(0.9, 0.2, 1.2, 1.4), unet.disable_freeu),
        "adapter weights": (LORA, lambda: pipe.set_adapters(["a", "b"], [0.5, 1.0]),
                            lambda: pipe.set_adapters(["a", "b"], [1.0, 1.0])),
        "active adapters": (LORA, lambda: pipe.set_adapters("a"), lambda: pipe.set_adapters(["a", "b"])),
        "LoRA disabled": (LORA, pipe.disable_lora, pipe.enable_lora),
        "LoRA fused": (LORA, pipe.fuse_lora, pipe.unfuse_lora),
        "a PAG processor": (PROCESSORS, lambda: setattr(mid, "processor", PAGCFGIdentitySelfAttnProcessor2_0()),
                            lambda: mid.set_processor(processor)),
    }
    for change, (category, apply, undo) in changes.items():
        apply()
        reading = full.read()
        assert not full.same(reading, captured), change
        assert full.changed(reading, captured) == [category], change
        undo()
        assert full.same(full.read(), captured), change
    with LoraLayers(unet).scaled(0.5):  # a per-call scale
        reading = full.read()
    assert full.changed(reading, captured) == [LORA] and full.same(full.read(), captured)


def test_tensor_scalings_count_by_identity_not_value(lora_dir):
    """Hot-swap scalings are tensors a graph reads at replay: a new value in place is no new setting, a new tensor
    object is (the graph would read the old one)."""
    pipe = Runner("tiny-sd").pipe
    pipe.enable_lora_hotswap(target_rank=4)
    pipe.load_lora_weights(save_lora(pipe, lora_dir, seed=1), adapter_name="a")
    watch = SettingsWatch(lambda: [pipe.unet], pipe.unet.up_blocks, LoraLayers(pipe.unet))
    captured = watch.read()
    layer = LoraLayers(pipe.unet).layers()[0]
    layer.scaling["a"].fill_(0.25)
    assert watch.same(watch.read(), captured)
    layer.scaling["a"] = layer.scaling["a"].clone()
    assert not watch.same(watch.read(), captured)


def test_the_shallow_path_reads_only_the_layers_it_runs(pipe):
    unet = pipe.unet
    full, shallow = path_settings(UNetPartition(unet, 0), unet)
    captured = full.read(), shallow.read()
    assert len(captured[1].values) < len(captured[0].values) / 3
    deep = unet.mid_block.attentions[0].transformer_blocks[0].attn1  # the mid block: full path only
    deep.processor = PAGCFGIdentitySelfAttnProcessor2_0()
    assert not full.same(full.read(), captured[0]) and shallow.same(shallow.read(), captured[1])
    shallow_layer = unet.up_blocks[-1].attentions[-1].transformer_blocks[0].attn1  # branch 0 runs it
    shallow_layer.processor = PAGCFGIdentitySelfAttnProcessor2_0()
    assert not shallow.same(shallow.read(), captured[1])


def test_pag_calls_read_the_same_settings_although_they_install_their_processors_each_time():
    """PAG installs the same processor objects at every call and restores the originals after: a static graph
    captured at its first call is replayed at its second, also after a plain call in between."""
    from diffusers import StableDiffusionPAGPipeline, StableDiffusionPipeline

    runner = pag_runner(Runner("tiny-sd"), StableDiffusionPAGPipeline)
    unet = runner.pipe.unet
    full, shallow = path_settings(UNetPartition(unet, 0), unet)
    readings = []
    hook = unet.register_forward_pre_hook(lambda module, args: readings.append((full.read(), shallow.read())))
    runner(steps=2, pag_scale=3.0)
    plain = Runner("tiny-sd", StableDiffusionPipeline.from_pipe(runner.pipe))
    plain(steps=2)
    runner(steps=2, pag_scale=3.0)
    hook.remove()
    pag_first, original, pag_second = readings[0], readings[2], readings[4]
    assert full.same(pag_second[0], pag_first[0]) and shallow.same(pag_second[1], pag_first[1])
    assert full.changed(original[0], pag_first[0]) == [PROCESSORS]
    assert shallow.same(original[1], pag_first[1]), "PAG on the mid block: the shallow path runs none of its layers"
