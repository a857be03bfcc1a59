import pytest
import torch

from fastcache.models import (
    INPAINT_PRESETS,
    PRESETS,
    build_pipeline,
    inpaint_pipeline,
    load_pipeline,
    model_geometry,
    prompt_inputs,
    random_prompt_embeds,
    refiner_pipeline,
)


def test_presets_are_the_published_architectures():
    assert PRESETS["sd21"]["unet"]["attention_head_dim"] == (5, 10, 20, 20)
    assert PRESETS["sdxl"]["unet"]["transformer_layers_per_block"] == (1, 2, 10)


def test_unknown_preset_names_the_valid_ones():
    names = r"\d+ presets \((e.g. )?sd15, .*inpainting preset \(sd15-inpaint, tiny-sd-inpaint\)"
    with pytest.raises(ValueError, match=names):
        build_pipeline("sd9")


def test_inpainting_presets_are_their_base_with_a_nine_channel_unet():
    pipe = build_pipeline("tiny-sd-inpaint")
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    assert INPAINT_PRESETS["sd15-inpaint"]["unet"] == dict(PRESETS["sd15"]["unet"], in_channels=9)
    assert model_geometry(None, "tiny-sd-inpaint") == model_geometry(None, "tiny-sd")


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


def test_refiner_embeds_fit_its_unet_and_inpaint_unets_have_4_or_9_channels():
    base = build_pipeline("tiny-sdxl")
    embeds = random_prompt_embeds(refiner_pipeline(base))
    assert embeds["prompt_embeds"].shape == (1, 77, 24), "the refiner's context is narrower than the base's"
    assert embeds["pooled_prompt_embeds"].shape == (1, 16), "5 aesthetic-score time ids beside it, not 6"
    assert inpaint_pipeline(base, 4).unet is base.unet
    assert inpaint_pipeline(base, 9).unet.config.in_channels == 9
    with pytest.raises(ValueError, match="unet_channels must be 4 or 9"):
        inpaint_pipeline(base, 8)


def test_prompt_inputs_give_a_text_encoder_pipeline_its_texts():
    class WithEncoder:
        text_encoder, tokenizer = object(), object()

    assert prompt_inputs(WithEncoder(), ["a", "b"]) == dict(prompt=["a", "b"], negative_prompt=None)
    assert prompt_inputs(WithEncoder(), ["a"], ["blurry"]) == dict(prompt=["a"], negative_prompt=["blurry"])


def test_derived_prompt_embeddings_depend_on_the_text_alone():
    pipe = build_pipeline("tiny-sdxl")
    batch = prompt_inputs(pipe, ["a cat", "a dog", "a cat"], ["", "blurry", ""])
    alone = prompt_inputs(pipe, ["a dog"], ["blurry"])
    for name, value in batch.items():
        assert value.shape[0] == 3
        assert torch.equal(value[0], value[2])  # equal texts, equal embeddings, anywhere in a batch
        assert torch.equal(value[1], alone[name][0])
    assert not torch.equal(batch["prompt_embeds"][0], batch["prompt_embeds"][1])


def test_a_folder_saved_from_a_preset_loads_without_its_missing_components(tmp_path):
    build_pipeline("tiny-sd").save_pretrained(tmp_path)
    loaded = load_pipeline(str(tmp_path), dtype=torch.float32, device="cpu")
    assert loaded.text_encoder is None and loaded.safety_checker is None
    geometry = model_geometry(str(tmp_path))
    assert geometry == model_geometry(None, "tiny-sd") and geometry.branches == 9


def test_a_folder_without_model_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_pipeline(str(tmp_path))
