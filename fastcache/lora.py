"""LoRA on the cached path: the per-call scale, applied as the UNet's own forward applies it, and hot-swaps that fit.

diffusers' UNet forward multiplies the scaling of every active LoRA adapter by ``cross_attention_kwargs["scale"]``
before the network runs and undoes it after (``scale_lora_layers`` / ``unscale_lora_layers``). The handle does the
same around each path it runs, so both paths see the weight the caller asked for, with two differences that keep
compiled graphs valid:

- scalings that are tensors (``enable_lora_hotswap`` makes them so) are scaled in place, by one foreach launch: a
  compiled graph or a captured CUDA graph reads the new value, so a new scale compiles and captures nothing;
- every scaling is put back exactly as it was. diffusers divides it back, which can leave a float one rounding off
  (a new constant to a compiled graph: a recompile at every call) and, after a scale of 0, resets ``set_adapters``
  weights to 1.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def tuner_layers(modules: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The PEFT tuner (LoRA) layers among ``modules``. PEFT is imported only where a LoRA is in play: a model that has
    LoRA layers was given them through PEFT (diffusers imports it to load one), so while PEFT is not imported there
    are none, and the core runs without PEFT installed."""
    if "peft" not in sys.modules:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in modules if isinstance(module, BaseTunerLayer)]


class LoraLayers:
    """The UNet's LoRA (PEFT tuner) layers, looked up again whenever its set of adapters changes."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self._adapters: Any = None  # the adapter names the layers were looked up for
        self._layers: list[torch.nn.Module] = []  # PEFT's BaseTunerLayer

    def layers(self) -> list[torch.nn.Module]:
        # loading, deleting or unloading adapters changes unet.peft_config (read without nn.Module's slow __getattr__)
        config = vars(self.unet).get("peft_config")
        adapters = (id(config), tuple(config)) if config else None
        if adapters != self._adapters:
            self._layers = tuner_layers(self.unet.modules()) if config else []
            self._adapters = adapters
        return self._layers

    def start_call(self, device: torch.device) -> None:
        """At a pipeline call's first evaluation: tensor scalings onto the UNet's device. PEFT makes them where the
        weights were at load time and ``.to()`` leaves them behind; a CPU scalar would be baked into a CUDA graph."""
        for layer in self.layers():
            for adapter, value in layer.scaling.items():
                if isinstance(value, torch.Tensor) and value.device != device:
                    layer.scaling[adapter] = value.to(device)

    @contextmanager
    def scaled(self, scale: float) -> Iterator[None]:
        """Every active adapter's scaling multiplied by ``scale`` (as ``scale_lora_layers``), restored on exit."""
        if scale == 1 or not self.layers():
            yield
            return
        floats, tensors = [], []
        for layer in self._layers:  # the adapters scale_layer scales: the active ones the layer holds
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    value = layer.scaling[adapter]
                    if isinstance(value, torch.Tensor):
                        tensors.append(value)
                    else:
                        floats.append((layer.scaling, adapter, value))
        saved = torch._foreach_mul(tensors, 1.0) if tensors else None  # copies, one launch
        for scaling, adapter, value in floats:
            scaling[adapter] = value * scale
        if tensors:
            torch._foreach_mul_(tensors, scale)
        try:
            yield
        finally:
            for scaling, adapter, value in floats:
                scaling[adapter] = value
            if tensors:
                torch._foreach_copy_(tensors, saved)


def split_scale(cross_attention_kwargs: dict | None) -> tuple[float, dict | None]:
    """``cross_attention_kwargs`` as the UNet's forward reads it: the LoRA scale, and what the processors get."""
    if not cross_attention_kwargs or "scale" not in cross_attention_kwargs:
        return 1.0, cross_attention_kwargs
    rest = dict(cross_attention_kwargs)
    return rest.pop("scale"), rest or None


def check_hotswap_rank(unet: torch.nn.Module, state_dict: dict, prefix: str | None, adapter_name: str | None) -> None:
    """``ValueError`` naming ``target_rank`` if hot-swapping ``state_dict`` into ``adapter_name`` needs a wider rank
    than the adapter's layers have (PEFT would then change the layers' shapes: every graph compiled again).

    Reads only PEFT-format keys (``...lora_A.weight``), as ``save_lora_weights`` writes them; changes nothing.
    """
    names = {module: name for name, module in unet.named_modules()}
    layers = {names[module]: module.lora_A[adapter_name].weight.shape[0] for module in tuner_layers(names)
              if adapter_name in getattr(module, "lora_A", {})}
    if not layers:
        return  # not an adapter of this UNet: diffusers raises its own error
    for key, value in state_dict.items():
        if prefix:
            if not key.startswith(f"{prefix}."):
                continue
            key = key[len(prefix) + 1:]
        if ".lora_A." not in key or value.ndim < 2:
            continue
        module = key.split(".lora_A.")[0]
        rank, width = value.shape[0], layers.get(module)
        if width is not None and rank > width:
            raise ValueError(
                f"cannot hot-swap a rank-{rank} LoRA into adapter {adapter_name!r}, whose layers have rank {width} "
                f"(e.g. {module}: the target_rank given to enable_lora_hotswap, or the first LoRA's rank). Call "
                f"pipe.enable_lora_hotswap(target_rank=R) with R >= {rank} before loading the first adapter. "
                f"Nothing was changed.")


def refuse_wide_hotswaps(unet: torch.nn.Module) -> Callable[[], None]:
    """Make ``unet.load_lora_adapter`` (what ``pipe.load_lora_weights`` calls) first refuse a hot-swap wider than the
    adapter's layers (``check_hotswap_rank``); returns the function that puts the UNet's own back."""
    if not hasattr(unet, "load_lora_adapter"):  # a UNet without LoRA support (SVD's): nothing to guard
        return lambda: None
    previous = vars(unet).get("load_lora_adapter")
    load = unet.load_lora_adapter

    @functools.wraps(load)
    def load_lora_adapter(pretrained_model_name_or_path_or_dict, prefix="transformer", hotswap=False, **kwargs):
        if hotswap and isinstance(pretrained_model_name_or_path_or_dict, dict):
            check_hotswap_rank(unet, pretrained_model_name_or_path_or_dict, prefix, kwargs.get("adapter_name"))
        return load(pretrained_model_name_or_path_or_dict, prefix=prefix, hotswap=hotswap, **kwargs)

    def undo() -> None:
        if previous is None:
            del unet.load_lora_adapter  # the class's again
        else:
            unet.load_lora_adapter = previous

    unet.load_lora_adapter = load_lora_adapter
    return undo
