"""Shape keys and device moves over the UNet's inputs, nested ones included (IP-Adapter's image embeddings)."""

import torch

from fastcache.shapes import on_device, shape_key


def inputs(image_embeds, timestep=None):
    return dict(sample=torch.zeros(2, 4, 8, 8), timestep=torch.tensor(3) if timestep is None else timestep,
                encoder_hidden_states=torch.zeros(2, 77, 32), class_labels=None,
                added_cond_kwargs=dict(image_embeds=image_embeds))


def test_one_key_per_signature_whatever_the_values():
    first, second = inputs([torch.zeros(2, 1, 16)]), inputs([torch.ones(2, 1, 16)], torch.tensor(999))
    assert shape_key(first) == shape_key(second), "new values at the same shapes: same graphs, same buffer"
    assert shape_key(first) != shape_key(inputs([torch.zeros(2, 2, 16)]))
    assert shape_key(first) != shape_key(inputs([torch.zeros(2, 1, 16)], torch.tensor(3.0))), "a float timestep"
    assert shape_key(first) != shape_key(inputs([torch.zeros(2, 1, 16)] * 2)), "two adapters"
    assert len(repr(shape_key(first))) < 600, "no tensor's values in the key"


def test_every_tensor_moves_to_the_device_nested_ones_too():
    moved = on_device(inputs([torch.zeros(2, 1, 16)]), torch.device("meta"))
    assert moved["sample"].is_meta and moved["added_cond_kwargs"]["image_embeds"][0].is_meta
    assert isinstance(moved["added_cond_kwargs"]["image_embeds"], list) and moved["class_labels"] is None
