import pytest
import torch

from fastcache.models import PRESETS, build_pipeline, load_pipeline, random_prompt_embeds


def test_presets_are_the_published_architectures():
    assert PRESETS["sd21"]["unet"]["attention_head_dim"] == (5, 10, 20, 20)
    assert PRESETS["sdxl"]["unet"]["transformer_layers_per_block"] == (1, 2, 10)


def test_unknown_preset_names_the_valid_ones():
    with pytest.raises(ValueError, match="tiny-sd"):
        build_pipeline("sd9")


def test_load_pipeline_reads_a_local_diffusers_folder(tmp_path):
    pipe = build_pipeline("tiny-sdxl")
    pipe.save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), dtype=torch.float32, device="cpu")
    assert type(loaded) is type(pipe)
    for name, param in pipe.unet.state_dict().items():
        assert torch.equal(loaded.unet.state_dict()[name], param)


def test_random_prompt_embeds_fit_the_unet():
    pipe = build_pipeline("tiny-sdxl")
    embeds = random_prompt_embeds(pipe, batch_size=2)
    assert embeds["prompt_embeds"].shape == (2, 77, 32)
    assert embeds["pooled_prompt_embeds"].shape == (2, 32)
