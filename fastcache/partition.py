"""Split a diffusers ``UNet2DConditionModel`` into a full path and a shallow (DeepCache skip-step) path.

Both paths are built from the UNet's own submodules; neither patches them. The full path runs the whole
network and copies the hidden state that enters the first recomputed up layer into a static buffer; the
shallow path recomputes only the layers above the cache branch and reads that buffer instead of going deep.
That one tensor is all a skip step needs, so the result equals ``DeepCacheSDHelper``'s, which caches every
module's output.

Residuals from outside enter where the UNet's own forward adds them: a ControlNet's to every skip connection and to
the mid block's output; a T2I-Adapter's (``down_intrablock_additional_residuals``, one per down block, in order)
inside a cross-attention down block after its last layer, after any other down block (whose output is also its last
skip connection: the UNet adds in place), and one more to the mid block's output when its shape fits. A skip step
adds those of the layers it computes.
"""

from __future__ import annotations

import itertools
import numbers
import operator
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from diffusers.utils.torch_utils import apply_freeu

SUPPORTED_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")


@dataclass(frozen=True)
class Boundary:
    """Where the cached feature sits, in the UNet's own indices.

    ``block`` / ``layer`` follow the DeepCache helper: ``layer`` counts the down block's resnet(+attention)
    layers from 0 and gives the downsampler the index after them. On a skip step the down block ``block``
    runs its first ``layer`` layers, and its mirror ``up_blocks[up_index]`` runs ``resnets[first_up_resnet:]``.
    """

    branch: int
    block: int
    layer: int
    up_index: int
    first_up_resnet: int
    shallow_skips: int  # skip connections a skip step computes: conv_in's output, then the down layers it runs
    shallow_adapter_residuals: int  # leading T2I-Adapter residuals that land in layers a skip step computes

    @property
    def at_mid_output(self) -> bool:
        """The cached feature is the mid block's output: a skip step recomputes everything but the mid block (and
        so adds the current ControlNet mid residual to the cached output, as the helper does)."""
        return self.up_index == 0 and self.first_up_resnet == 0


def branch_positions(unet: UNet2DConditionModel) -> list[tuple[int, int]]:
    """All ``(block, layer)`` positions, in branch order: ``layers_per_block + 1`` per down block.

    With the usual ``layers_per_block=2`` this is the helper's numbering ``block = branch // 3``,
    ``layer = branch % 3``; other depths generalise it so every branch is one position.
    """
    return [(b, layer) for b, block in enumerate(unet.down_blocks) for layer in range(len(block.resnets) + 1)]


def check_layout(unet: Any, down: tuple[str, ...], up: tuple[str, ...], mid: tuple[str, ...]) -> None:
    """``ValueError`` unless ``unet``'s blocks are of the named types and mirror each other as DeepCache's branch
    numbering needs (one up resnet more than its down block, a downsampler in every down block but the last)."""
    names = {
        "down": ([type(b).__name__ for b in unet.down_blocks], down),
        "up": ([type(b).__name__ for b in unet.up_blocks], up),
        "mid": ([type(unet.mid_block).__name__] if unet.mid_block is not None else [], mid),
    }
    for kind, (found, valid) in names.items():
        bad = [n for n in found if n not in valid]
        if bad:
            raise ValueError(f"fastcache supports {kind} blocks {valid}; this UNet has {bad}.")
    n = len(unet.down_blocks)
    for b, down_block in enumerate(unet.down_blocks):
        up_block = unet.up_blocks[n - 1 - b]
        if len(up_block.resnets) != len(down_block.resnets) + 1:
            raise ValueError(
                f"fastcache needs up block {n - 1 - b} to have one resnet more than down block {b}; "
                f"found {len(up_block.resnets)} and {len(down_block.resnets)}."
            )
        if (down_block.downsamplers is None) != (b == n - 1):
            raise ValueError("fastcache needs a downsampler in every down block but the last.")


def resolve_branch(unet: UNet2DConditionModel, branch: int) -> Boundary:
    """Map a DeepCache branch id to the layers a skip step recomputes; ``ValueError`` if out of range."""
    positions = branch_positions(unet)
    if not isinstance(branch, numbers.Integral) or isinstance(branch, bool) or not 0 <= branch < len(positions):
        raise ValueError(f"branch must be an int in [0, {len(positions) - 1}] for this UNet; got {branch!r}.")
    branch = operator.index(branch)  # numpy integers too
    block, layer = positions[branch]
    down = unet.down_blocks[block]
    n_layers = len(down.resnets)
    skips = 1 + sum(len(down.resnets) + 1 for down in unet.down_blocks[:block]) + layer
    # adapter residuals: one per whole down block above the branch, the branch's own block's if a skip step runs
    # the layer it lands after, and the mid block's if the cached feature is the mid block's output
    adapter = block + (layer == n_layers and _adapter_inside(down))
    if block == len(unet.down_blocks) - 1 and layer == n_layers and unet.mid_block is not None:
        adapter += 1
    return Boundary(branch, block, layer, len(unet.down_blocks) - 1 - block, n_layers - layer, skips, adapter)


def run_down(down_blocks, h, emb, context, boundary: Boundary | None = None,
             adapter: list | tuple = (), calls: Any = None) -> tuple[torch.Tensor, list]:
    """The down path of a UNet or a ControlNet (the same blocks): every block, or with ``boundary`` only the layers
    a skip step runs, plus T2I-Adapter residuals (``adapter``, one per block in order) where the UNet adds them.
    ``calls``: the partition whose ``_layer``/``_call_block`` call a layer and a block of this UNet family (default:
    ``UNetPartition``'s, for 2-D blocks; ``context`` is what they take). Returns the hidden state and the skip
    connections, ``conv_in``'s output ``h`` first."""
    calls = calls or UNetPartition
    skips = [h]
    blocks = down_blocks if boundary is None else down_blocks[:boundary.block]
    for down, residual in itertools.zip_longest(blocks, adapter[:len(blocks)]):
        h, res = _down_block(down, h, emb, context, residual, calls)
        skips.extend(res)
    if boundary is not None:
        down = down_blocks[boundary.block]
        residual = adapter[boundary.block] if boundary.block < len(adapter) else None
        for i in range(boundary.layer):
            h = calls._layer(down, i, h, emb, context)
            if residual is not None and i == len(down.resnets) - 1 and _adapter_inside(down):
                h = h + residual
            skips.append(h)
    return h, skips


def adapter_residual_shapes(unet: UNet2DConditionModel, sample_shape) -> tuple[list[tuple], tuple]:
    """Where T2I-Adapter residuals land for a UNet input of ``sample_shape``: the shape of each down block's (its
    attention output in a cross-attention block, else the block's output) and the mid block's output shape."""
    batch, _, height, width = sample_shape
    shapes = []
    for b, down in enumerate(unet.down_blocks):
        if _adapter_inside(down):
            shapes.append((batch, down.resnets[-1].out_channels, height >> b, width >> b))
        else:
            shapes.append((batch, down.downsamplers[0].out_channels, height >> (b + 1), width >> (b + 1)))
    last = len(unet.down_blocks) - 1
    mid_channels = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else None
    return shapes, (batch, mid_channels, height >> last, width >> last)


def adapter_residuals_problem(unet: UNet2DConditionModel, residuals, sample_shape) -> list[str]:
    """Why the paths cannot add these T2I-Adapter residuals as the UNet would (empty if they can): each down block's
    must have the shape of what it is added to (the UNet broadcasts or fails). The one after them goes to the mid
    block only if its shape fits, and any further ones are ignored, in the paths as in the UNet."""
    if residuals is None:
        return []
    if not isinstance(residuals, (list, tuple)) or not all(isinstance(r, torch.Tensor) for r in residuals):
        return ["down_intrablock_additional_residuals that are not a list of tensors"]
    shapes, _ = adapter_residual_shapes(unet, sample_shape)
    found = [tuple(r.shape) for r in residuals[:len(shapes)]]
    if found == shapes[:len(found)]:
        return []
    return [f"T2I-Adapter residuals of shapes {found} for down blocks that take {shapes[:len(found)]}"]


def _adapter_inside(down) -> bool:
    """Whether a down block's T2I-Adapter residual lands on its last layer's output (before any downsampler): in a
    cross-attention block, and in a block without a downsampler (the UNet adds it to the block's output)."""
    return getattr(down, "has_cross_attention", False) or down.downsamplers is None


def _down_block(down, h, emb, context, residual, calls):
    """A whole down block, with its T2I-Adapter residual (or ``None``) added where the UNet's forward adds it."""
    if residual is None or getattr(down, "has_cross_attention", False):
        extra = {} if residual is None else {"additional_residuals": residual}
        return calls._call_block(down, hidden_states=h, temb=emb, encoder_hidden_states=context, **extra)
    h, res = down(hidden_states=h, temb=emb)
    h = h + residual  # the UNet adds it in place: to the block's output and so to its last skip connection
    return h, (*res[:-1], h)


def downsampling_factor(unet: UNet2DConditionModel) -> int:
    """Latent height and width must be multiples of this (2 ** number of downsamplers)."""
    return 2 ** (len(unet.down_blocks) - 1)


def feature_shape(unet: UNet2DConditionModel, boundary: Boundary, sample_shape: torch.Size) -> tuple[int, ...]:
    """Shape of the cached hidden state for a UNet input of ``sample_shape`` (B, C, H, W)."""
    up = unet.up_blocks[boundary.up_index]
    if boundary.first_up_resnet > 0:
        channels = _out_channels(up.resnets[boundary.first_up_resnet - 1])
    elif boundary.up_index > 0:
        channels = _out_channels(unet.up_blocks[boundary.up_index - 1].resnets[-1])
    elif unet.mid_block is not None:
        channels = _out_channels(unet.mid_block.resnets[-1])
    else:
        channels = _out_channels(unet.down_blocks[-1].resnets[-1])
    batch, _, height, width = sample_shape
    return (batch, channels, height >> boundary.block, width >> boundary.block)


def _out_channels(resnet: torch.nn.Module) -> int:
    """A resnet's output channels (SVD's spatio-temporal resnet holds a 2-D one, which says; FreeNoise's split
    inference wraps resnets in a module that holds the resnet)."""
    resnet = getattr(resnet, "module", resnet)
    return getattr(resnet, "spatial_res_block", resnet).out_channels


class UNetPartition:
    """The full and shallow forward passes of one UNet at one cache branch.

    ``full`` and ``shallow`` take the UNet's own call arguments plus the cache buffer, and return the noise
    prediction. They hold no state of their own, which is what lets them be compiled as two graphs.

    This class is the 2-D family's (``UNet2DConditionModel``); a video family (``partition_motion``,
    ``partition_svd``) subclasses it with its own stem (embeddings, ``conv_in``, frames flattened into the batch),
    its own way of calling a layer and a block (``_layer``, ``_call_block``: ``context`` is whatever they take
    besides the hidden state and the time embedding), its head (back to the 5-D sample) and its arguments. The
    cut itself, ``_full`` and ``_shallow`` on per-frame hidden states, is shared.
    """

    # The UNet arguments the two paths implement, by the names of the UNet's forward. A call that sets any other
    # one (attention masks, whatever a later diffusers adds) runs the original forward.
    arguments = ("sample", "timestep", "encoder_hidden_states", "added_cond_kwargs", "timestep_cond", "class_labels",
                 "down_block_additional_residuals", "mid_block_additional_residual",
                 "down_intrablock_additional_residuals")
    output = UNet2DConditionOutput  # what the UNet's forward returns with return_dict=True
    unet_class = UNet2DConditionModel
    blocks = dict(down=SUPPORTED_DOWN_BLOCKS, up=SUPPORTED_UP_BLOCKS, mid=SUPPORTED_MID_BLOCKS)
    layer_parts = ("resnets", "attentions")  # the modules of layer i of a block, in the order they run

    def __init__(self, unet: UNet2DConditionModel, branch: int):
        self.check(unet)
        self.unet = unet
        self.boundary = resolve_branch(unet, branch)
        # skip connections of the full path: conv_in's output, every down layer's and every downsampler's
        self.skip_count = 1 + sum(len(down.resnets) + (down.downsamplers is not None) for down in unet.down_blocks)

    @classmethod
    def check(cls, unet: Any) -> None:
        """``ValueError`` naming what is supported unless this family's partition can cut ``unet``."""
        check_layout(unet, **cls.blocks)
        if unet.config.get("addition_embed_type") == "image_hint":
            raise ValueError("fastcache does not support addition_embed_type='image_hint' (it changes the input).")

    def frames(self, sample_shape) -> int:
        """Frames per sample: the per-frame hidden states hold ``batch * frames`` of them (1 for images)."""
        return 1

    def feature_shape(self, sample_shape) -> tuple[int, ...]:
        """Shape of the cached hidden state for a UNet input of ``sample_shape``."""
        return feature_shape(self.unet, self.boundary, sample_shape)

    def check_input(self, sample_shape) -> None:
        """``ValueError`` naming what is valid for an input the UNet itself cannot take (checked at a new shape, before
        anything runs); images: none."""

    def frame_signature(self, sample_signature):
        """A sample's ``(dtype, shape, device)`` as the per-frame images a video pipeline's ControlNet gets (for
        images: itself)."""
        return sample_signature

    def full(self, sample, timestep, encoder_hidden_states, cache, added_cond_kwargs=None, timestep_cond=None,
             class_labels=None, down_block_additional_residuals=None, mid_block_additional_residual=None,
             down_intrablock_additional_residuals=None):
        """Whole UNet; writes the feature at the boundary into ``cache``. ControlNet and T2I-Adapter residuals, if
        given, are added where the UNet's forward adds them."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                                     class_labels)
        return self._full(h, emb, context, cache, down_block_additional_residuals, mid_block_additional_residual,
                          down_intrablock_additional_residuals or ())

    def shallow(self, sample, timestep, encoder_hidden_states, cache, added_cond_kwargs=None, timestep_cond=None,
                class_labels=None, down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None):
        """Only the layers above the branch; everything deeper comes from ``cache``. ControlNet residuals, if
        given, are those of the skip connections this path computes (the first ``boundary.shallow_skips``);
        T2I-Adapter residuals those of the blocks it computes (``boundary.shallow_adapter_residuals``, more are
        ignored); mid residuals count only where the cached feature is the mid block's output."""
        emb, context, h = self._stem(sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                                     class_labels)
        return self._shallow(h, emb, context, cache, down_block_additional_residuals, mid_block_additional_residual,
                             down_intrablock_additional_residuals or ())

    def path_modules(self, full: bool) -> list[torch.nn.Module]:
        """The modules a path runs (for the full path, the whole UNet): the settings its graphs depend on."""
        unet, bnd = self.unet, self.boundary
        if full:
            return [unet]
        modules = [m for name, m in unet.named_children() if name not in ("down_blocks", "mid_block", "up_blocks")]
        parts = self.layer_parts
        modules += [*unet.down_blocks[:bnd.block],
                    *_layer_modules(unet.down_blocks[bnd.block], range(bnd.layer), parts)]
        up = unet.up_blocks[bnd.up_index]
        modules += _layer_modules(up, range(bnd.first_up_resnet, len(up.resnets)), parts) + list(up.upsamplers or [])
        return modules + list(unet.up_blocks[bnd.up_index + 1:])

    # -- the cut, on per-frame hidden states: shared by every family ---------------------------------------

    def _full(self, h, emb, context, cache, down_residuals=None, mid_residual=None, adapter=()):
        """From ``conv_in``'s output to ``conv_out``'s, writing the boundary feature into ``cache``."""
        unet, bnd = self.unet, self.boundary
        h, skips = run_down(unet.down_blocks, h, emb, context, adapter=adapter, calls=self)  # up pops from the end
        skips = _add(skips, down_residuals)
        adapter_mid = None
        if unet.mid_block is not None:
            h = self._call_block(unet.mid_block, h, emb, encoder_hidden_states=context)
            adapter_mid = self._adapter_mid(adapter, h)
        if bnd.at_mid_output:  # cached before the residuals: a skip step adds its own
            cache.copy_(h)
            cache = None
        if adapter_mid is not None:
            h = h + adapter_mid
        if mid_residual is not None:
            h = h + mid_residual
        for up in unet.up_blocks[: bnd.up_index]:
            h = self._call_up_block(up, h, skips, emb, context)
        h = self._up_layers(h, skips, emb, context, start=0, cache=cache)
        return self._head(h, skips, emb, context)

    def _shallow(self, h, emb, context, cache, down_residuals=None, mid_residual=None, adapter=()):
        """From ``conv_in``'s output to ``conv_out``'s through the layers above the branch and ``cache``."""
        bnd = self.boundary
        adapter = adapter[:bnd.shallow_adapter_residuals]
        _, skips = run_down(self.unet.down_blocks, h, emb, context, bnd, adapter, calls=self)
        skips = _add(skips, down_residuals)
        if bnd.at_mid_output:
            adapter_mid = self._adapter_mid(adapter, cache)
            if adapter_mid is not None:
                cache = cache + adapter_mid
            if mid_residual is not None:
                cache = cache + mid_residual
        h = self._up_layers(cache, skips, emb, context, start=bnd.first_up_resnet, cache=None)
        return self._head(h, skips, emb, context)

    # -- pieces shared by both paths -------------------------------------------------------------------

    def _stem(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond, class_labels):
        """Time/class/added embeddings and ``conv_in``, through the UNet's own helper methods."""
        unet = self.unet
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = unet.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
        aug_emb = unet.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                     added_cond_kwargs=added_cond_kwargs)
        if aug_emb is not None:
            emb = emb + aug_emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states,
                                                     added_cond_kwargs=added_cond_kwargs)
        return emb, context, unet.conv_in(sample)

    def _adapter_mid(self, adapter, h):
        """The T2I-Adapter residual of the mid block's output: the one after the down blocks' own, if its shape is
        the output's (SDXL's adapters have one; the UNet's forward applies the same rule)."""
        n = len(self.unet.down_blocks)
        return adapter[n] if len(adapter) > n and adapter[n].shape == h.shape else None

    def _up_layers(self, h, skips, emb, context, start, cache):
        """Up block ``boundary.up_index`` from resnet ``start``; on the full path, saves the boundary feature."""
        up = self.unet.up_blocks[self.boundary.up_index]
        for i in range(start, len(up.resnets)):
            if cache is not None and i == self.boundary.first_up_resnet:
                cache.copy_(h)
            h, skip = _freeu(up, h, skips.pop())
            h = self._layer(up, i, torch.cat([h, skip], dim=1), emb, context)
        if up.upsamplers is not None:
            for upsampler in up.upsamplers:
                h = upsampler(hidden_states=h)  # by name, as the blocks call it (FreeNoise's split inference)
        return h

    def _head(self, h, skips, emb, context):
        """Up blocks above the boundary, then the output convolution."""
        unet = self.unet
        for up in unet.up_blocks[self.boundary.up_index + 1:]:
            h = self._call_up_block(up, h, skips, emb, context)
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)

    def _call_up_block(self, up, h, skips, emb, context):
        res = tuple(skips[-len(up.resnets):])
        del skips[-len(up.resnets):]
        return self._call_block(up, hidden_states=h, res_hidden_states_tuple=res, temb=emb,
                                encoder_hidden_states=context)

    @staticmethod
    def _call_block(block, *args, encoder_hidden_states, **kwargs):
        """A whole diffusers block, passing the text context only to blocks that attend to it."""
        if getattr(block, "has_cross_attention", False):
            kwargs["encoder_hidden_states"] = encoder_hidden_states
        return block(*args, **kwargs)

    @staticmethod
    def _layer(block, i, h, emb, context):
        """Layer ``i`` of a block: its resnet, then its transformer if it has one."""
        h = block.resnets[i](h, emb)
        if getattr(block, "attentions", None) is not None:
            h = block.attentions[i](h, encoder_hidden_states=context, return_dict=False)[0]
        return h


def _layer_modules(block, indices, parts=("resnets", "attentions")) -> list[torch.nn.Module]:
    """The modules of layers ``indices`` of a block: each one's ``parts`` (resnet, attention, motion module...)."""
    lists = [getattr(block, part, None) for part in parts]
    return [modules[i] for i in indices for modules in lists if modules is not None]


def _freeu(up, h: torch.Tensor, skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeU at one up layer, as the up block's forward applies it (diffusers' ``apply_freeu``, when all four values
    are set), to a copy of ``h``: ``apply_freeu`` scales ``h`` in place, and on a skip step ``h`` is the cached
    feature (the DeepCache helper scales its cached output again at every skip step that way)."""
    if not (getattr(up, "s1", None) and getattr(up, "s2", None) and getattr(up, "b1", None)
            and getattr(up, "b2", None)):  # the up blocks' own test (enable_freeu sets the four on every up block)
        return h, skip
    return apply_freeu(up.resolution_idx, h.clone(), skip, s1=up.s1, s2=up.s2, b1=up.b1, b2=up.b2)


def _add(skips: list, residuals) -> list:
    """Skip connections plus ControlNet residuals, pairwise (a skip step gets only the residuals of its skips)."""
    if residuals is None:
        return skips
    return [skip + residual for skip, residual in zip(skips, residuals, strict=True)]
