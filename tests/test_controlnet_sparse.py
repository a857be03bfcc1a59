"""SparseCtrl's split: the partition against ``SparseControlNetModel.forward`` bit for bit, the shallow SparseCtrl's
FLOPs, and what is refused. The pipeline against the DeepCache helper is in test_video_animatediff_features.py."""

import pytest
import torch
from conftest import FRAMES, VideoRunner, motion_unet_inputs
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from torch.utils.flop_counter import FlopCounterMode

from fastcache import compile_pipeline
from fastcache.controlnet_sparse import SparseControlNetPartition
from fastcache.partition import branch_positions, resolve_branch
from fastcache.video_models import with_sparse_controlnet


@pytest.fixture(scope="module")
def animatediff() -> VideoRunner:
    return VideoRunner("tiny-animatediff")


def sparse_inputs(net, unet, latent_condition: bool, seed: int = 0) -> dict:
    """A guided call as the pipeline makes it: a batch of 2, one condition video (batch 1) with frame 0 set in it and
    in its mask; latents as conditions (8x8), or RGB images (16x16, the tiny VAE's factor 2)."""
    inputs = motion_unet_inputs(unet, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    channels, size = (4, 8) if latent_condition else (3, 16)
    cond = torch.zeros(1, channels, FRAMES, size, size)
    cond[:, :, 0] = torch.rand(1, channels, size, size, generator=g)
    mask = torch.zeros(1, 1, FRAMES, size, size)
    mask[:, :, 0] = 1
    return dict(inputs, controlnet_cond=cond, conditioning_mask=mask, conditioning_scale=torch.tensor(0.8))


@pytest.mark.parametrize("latent_condition, order", [(True, "rgb"), pytest.param(False, "bgr", marks=pytest.mark.slow)])
@torch.no_grad()
def test_full_path_equals_the_forward_and_shallow_its_first_residuals_bit_for_bit(animatediff, latent_condition,
                                                                                   order):
    net = with_sparse_controlnet(animatediff.pipe, latent_condition=latent_condition).controlnet
    net.register_to_config(controlnet_conditioning_channel_order=order)
    inputs = sparse_inputs(net, animatediff.pipe.unet, latent_condition)
    down, mid = net(**inputs, return_dict=False)
    for branch in range(len(branch_positions(net))):
        partition = SparseControlNetPartition(net, resolve_branch(net, branch))
        full_down, full_mid = partition.full(**inputs)
        assert len(full_down) == len(down) and all(map(torch.equal, full_down, down)), branch
        assert torch.equal(full_mid, mid), branch
        shallow = partition.shallow(**inputs)
        assert len(shallow) == partition.boundary.shallow_skips, branch
        assert all(map(torch.equal, shallow, down)), branch
    shapes, mid_shape = partition.residual_shapes(inputs["sample"].shape)
    assert [tuple(r.shape) for r in down] == shapes and tuple(mid.shape) == mid_shape


def test_the_shallow_sparse_controlnet_computes_what_the_shallow_unet_needs_and_nothing_more(animatediff):
    """Its FLOPs are exactly those of the modules it needs, as they count in a whole forward: embeddings, conv_in,
    the conditioning embedding, the down layers above the branch with their motion modules, and their zero
    convolutions."""
    net = with_sparse_controlnet(animatediff.pipe).controlnet
    inputs = sparse_inputs(net, animatediff.pipe.unet, latent_condition=True)
    whole = flop_counts(net, **inputs, return_dict=False)
    for branch in range(len(branch_positions(net))):
        boundary = resolve_branch(net, branch)
        if boundary.at_mid_output:
            continue  # a skip step there needs every residual: the whole SparseCtrl runs
        needed = ["time_embedding", "conv_in", "controlnet_cond_embedding",
                  *(f"down_blocks.{b}" for b in range(boundary.block)),
                  *(f"down_blocks.{boundary.block}.{kind}.{i}" for kind in ("resnets", "attentions", "motion_modules")
                    for i in range(boundary.layer)),
                  *(f"controlnet_down_blocks.{i}" for i in range(boundary.shallow_skips))]
        expected = sum(whole.get(f"SparseControlNetModel.{name}", 0) for name in needed)
        shallow = flop_counts(SparseControlNetPartition(net, boundary).shallow, **inputs)["Global"]
        assert shallow == expected < whole["Global"], branch


def flop_counts(fn, **kwargs) -> dict[str, int]:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(**kwargs)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def test_a_sparse_controlnet_the_cut_cannot_take_is_refused_and_nothing_changes(animatediff):
    pipe = with_sparse_controlnet(animatediff.pipe)
    sparse = pipe.controlnet
    config = {k: v for k, v in sparse.config.items() if not k.startswith("_")}
    pipe.controlnet = type(sparse)(**dict(config, layers_per_block=1))
    with pytest.raises(ValueError, match=r"needs a SparseControlNetModel whose down blocks are the UNet's"):
        compile_pipeline(pipe)
    pipe.controlnet = MultiControlNetModel([sparse])
    with pytest.raises(ValueError, match=r"supports ControlNetModel, .* SparseControlNetModel; this pipeline has a "
                                         r"MultiControlNetModel of \['SparseControlNetModel'\]"):
        compile_pipeline(pipe)
    for module in (pipe.unet, sparse):
        registry = getattr(module, "_diffusers_hook", None)
        assert registry is None or registry.get_hook("fastcache") is None
