import pytest
import torch
from conftest import unet_inputs
from diffusers import UNet2DConditionModel, UNet2DModel

from fastcache.models import PRESETS
from fastcache.partition import (
    UNetPartition,
    adapter_residual_shapes,
    branch_positions,
    feature_shape,
    resolve_branch,
)
from fastcache.partitions import check_unet


@pytest.fixture(params=["tiny-sd", "tiny-sdxl"])
def unet(request):
    torch.manual_seed(0)
    return UNet2DConditionModel(**PRESETS[request.param]["unet"]).eval()


@torch.no_grad()
def test_full_path_equals_the_unet_forward_bit_for_bit(unet):
    inputs = unet_inputs(unet)
    expected = unet(**inputs).sample
    for branch in range(len(branch_positions(unet))):
        part = UNetPartition(unet, branch)
        cache = torch.zeros(feature_shape(unet, part.boundary, inputs["sample"].shape))
        assert torch.equal(part.full(cache=cache, **inputs), expected), branch
        assert cache.abs().sum() > 0, "the full path must write the feature"


@torch.no_grad()
def test_shallow_path_on_the_same_inputs_reproduces_the_full_step(unet):
    """With a feature cached from identical inputs, skipping the deep layers must change nothing."""
    inputs = unet_inputs(unet)
    for branch in range(len(branch_positions(unet))):
        part = UNetPartition(unet, branch)
        cache = torch.zeros(feature_shape(unet, part.boundary, inputs["sample"].shape))
        full = part.full(cache=cache, **inputs)
        assert torch.equal(part.shallow(cache=cache, **inputs), full), branch


@torch.no_grad()
def test_shallow_path_uses_the_cache(unet):
    inputs = unet_inputs(unet)
    part = UNetPartition(unet, 0)
    cache = torch.zeros(feature_shape(unet, part.boundary, inputs["sample"].shape))
    full = part.full(cache=cache, **inputs)
    cache.mul_(0.5)
    assert not torch.allclose(part.shallow(cache=cache, **inputs), full)


def test_branch_numbering_is_the_helpers(unet):
    n = len(unet.down_blocks)
    assert len(branch_positions(unet)) == 3 * n
    for branch in range(3 * n):
        b = resolve_branch(unet, branch)
        assert (b.block, b.layer) == (branch // 3, branch % 3)
        assert b.up_index == n - 1 - branch // 3 and b.first_up_resnet == 2 - branch % 3


def test_branch_numbering_generalises_to_other_depths():
    unet = UNet2DConditionModel(**dict(PRESETS["tiny-sd"]["unet"], layers_per_block=1))
    assert branch_positions(unet) == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    assert resolve_branch(unet, 3).first_up_resnet == 0


@pytest.mark.parametrize("branch", [-1, 9, 1.0, True, "0"])
def test_out_of_range_branch_names_the_range(unet, branch):
    with pytest.raises(ValueError, match=r"branch must be an int in \[0, 8\]"):
        resolve_branch(unet, branch)


def test_feature_shapes_per_branch(unet):
    shapes = [feature_shape(unet, resolve_branch(unet, b), (2, 4, 16, 16)) for b in range(9)]
    assert shapes[0] == (2, 32, 16, 16)  # output of the last up block's second layer
    assert shapes[8] == (2, 64, 4, 4)  # mid block output


def test_unsupported_unets_are_rejected_with_the_supported_list():
    with pytest.raises(ValueError, match="supports UNet2DConditionModel"):
        check_unet(UNet2DModel(block_out_channels=(32, 64), norm_num_groups=8, down_block_types=("DownBlock2D",) * 2,
                               up_block_types=("UpBlock2D",) * 2))
    odd = UNet2DConditionModel(**dict(PRESETS["tiny-sd"]["unet"], down_block_types=(
        "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")))
    with pytest.raises(ValueError, match="supports down blocks"):
        check_unet(odd)


def flops(fn, *args, **kwargs) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def test_shallow_path_computes_what_the_helpers_skip_step_computes_and_nothing_more():
    """Same FLOPs as DeepCacheSDHelper's skip step, for every branch: no deep layer sneaks back in."""
    from DeepCache import DeepCacheSDHelper

    from fastcache.models import build_pipeline

    pipe = build_pipeline("tiny-sd")
    unet = pipe.unet
    inputs = unet_inputs(unet)
    pipe.scheduler.set_timesteps(4)
    t0, t1 = pipe.scheduler.timesteps[:2]
    for branch in range(9):
        helper = DeepCacheSDHelper(pipe=pipe)
        helper.set_params(cache_interval=2, cache_branch_id=branch)
        helper.enable()
        args = (inputs["sample"], None, inputs["encoder_hidden_states"])
        unet(args[0], t0, args[2])  # full step: fills the helper's caches
        helper_skip = flops(unet, args[0], t1, args[2])
        helper.disable()
        part = UNetPartition(unet, branch)
        cache = torch.zeros(feature_shape(unet, part.boundary, args[0].shape))
        full = flops(part.full, args[0], t1, args[2], cache)
        assert full == flops(unet, args[0], t1, args[2])
        assert flops(part.shallow, args[0], t1, args[2], cache) == helper_skip < full, branch


def adapter_residuals(unet, sample_shape, seed=1) -> list[torch.Tensor]:
    """Random T2I-Adapter residuals for every down block and the mid block, as an SDXL adapter gives them."""
    shapes, mid = adapter_residual_shapes(unet, sample_shape)
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in (*shapes, mid)]


@torch.no_grad()
@pytest.mark.parametrize("count", [None, 2], ids=["down-and-mid", "two-blocks"])
def test_t2i_adapter_residuals_enter_where_the_unet_adds_them_on_both_paths(unet, count):
    """Full path bit for bit the UNet's forward; the shallow path on the same inputs reproduces it for every branch,
    so it adds the residuals of every layer it computes."""
    inputs = unet_inputs(unet)
    residuals = adapter_residuals(unet, inputs["sample"].shape)[:count]
    expected = unet(**inputs, down_intrablock_additional_residuals=list(residuals)).sample  # the UNet pops them
    assert not torch.equal(expected, unet(**inputs).sample)
    for branch in range(len(branch_positions(unet))):
        part = UNetPartition(unet, branch)
        cache = torch.zeros(feature_shape(unet, part.boundary, inputs["sample"].shape))
        full = part.full(cache=cache, **inputs, down_intrablock_additional_residuals=residuals)
        assert torch.equal(full, expected), branch
        assert torch.equal(part.shallow(cache=cache, **inputs, down_intrablock_additional_residuals=residuals),
                           full), branch


@torch.no_grad()
def test_the_shallow_path_adds_exactly_the_adapter_residuals_of_the_layers_it_computes(unet):
    """Residuals of deeper layers change nothing on a skip step; each one it counts does."""
    inputs = unet_inputs(unet)
    residuals = adapter_residuals(unet, inputs["sample"].shape)
    counts = []
    for branch in range(len(branch_positions(unet))):
        part = UNetPartition(unet, branch)
        cache = torch.randn(feature_shape(unet, part.boundary, inputs["sample"].shape))
        used = part.boundary.shallow_adapter_residuals
        counts.append(used)
        shallow = part.shallow(cache=cache, **inputs, down_intrablock_additional_residuals=residuals)
        deeper_changed = residuals[:used] + [r + 1 for r in residuals[used:]]
        assert torch.equal(part.shallow(cache=cache, **inputs, down_intrablock_additional_residuals=deeper_changed),
                           shallow), branch
        for i in range(used):
            changed = [r + (j == i) for j, r in enumerate(residuals)]
            assert not torch.equal(part.shallow(cache=cache, **inputs, down_intrablock_additional_residuals=changed),
                                   shallow), (branch, i)
    # SD: cross-attention blocks add theirs after the last layer, the last DownBlock2D to its last layer's output;
    # SDXL: the first DownBlock2D after its downsampler (deeper than any of its layers), and the mid block's
    first_block_inside = unet.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert counts == [0, 0, int(first_block_inside), 1, 1, 2, 2, 2, 4]


@torch.no_grad()
def test_with_freeu_both_paths_equal_the_unet_forward_and_leave_the_cache_unscaled(unet):
    """FreeU applies at the up layers each path runs, as the up blocks' forward applies it; on the shallow path to a
    copy of the cached feature (diffusers' apply_freeu scales its input in place)."""
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    inputs = unet_inputs(unet)
    expected = unet(**inputs).sample
    for branch in range(len(branch_positions(unet))):
        part = UNetPartition(unet, branch)
        cache = torch.zeros(feature_shape(unet, part.boundary, inputs["sample"].shape))
        assert torch.equal(part.full(cache=cache, **inputs), expected), branch
        feature = cache.clone()
        assert torch.equal(part.shallow(cache=cache, **inputs), expected), branch
        assert torch.equal(cache, feature), branch


def test_path_modules_are_the_modules_each_path_runs(unet):
    """What the static graphs' settings check reads: every module a path calls, and for the shallow path no other."""
    part = UNetPartition(unet, 1)
    called = {True: set(), False: set()}
    inputs = unet_inputs(unet)
    for full in (True, False):
        hooks = [m.register_forward_pre_hook(lambda m, args, full=full: called[full].add(m)) for m in unet.modules()]
        with torch.no_grad():
            cache = torch.zeros(feature_shape(unet, part.boundary, inputs["sample"].shape))
            (part.full if full else part.shallow)(cache=cache, **inputs)
        for hook in hooks:
            hook.remove()
        listed = {m for root in part.path_modules(full) for m in root.modules()}
        assert called[full] <= listed
    shallow = {m for root in part.path_modules(False) for m in root.modules()}
    assert not (shallow - called[False]) & called[True], "nothing only the full path runs"
    assert unet.mid_block not in shallow and len(shallow) < len(called[True]) / 2
