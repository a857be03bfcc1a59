"""Whether a module's weights moved or its modules changed since a snapshot: what a captured CUDA graph cannot see."""

from __future__ import annotations

import torch


class WeightsWatch:
    """Tells whether a module's weights moved or its modules changed since a snapshot.

    A captured CUDA graph reads the weights at the addresses they had during capture and runs the modules it saw:
    after ``.to()``, ``fuse_qkv_projections``, an injected LoRA adapter or a processor that is a module (IP-Adapter)
    it would read freed memory or compute the old model. In-place updates (``fuse_lora``, a LoRA hot-swap) keep the
    addresses and need nothing. The check reads saved dictionaries, no module walk, so it costs a fraction of a
    millisecond and runs once per pipeline call. (Attention processors that are plain objects, which PAG swaps at
    every call, are a setting: ``settings.SettingsWatch`` checks them before every replay.)
    """

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.snapshot()

    def snapshot(self) -> None:
        modules = list(self.module.modules())
        self._sizes = [(store, len(store)) for m in modules for store in (m._modules, m._parameters, m._buffers)]
        self._children = [(m._modules, name, child) for m in modules for name, child in m._modules.items()]
        self._tensors = [(store, name, tensor, tensor.data_ptr())
                         for m in modules for store in (m._parameters, m._buffers)
                         for name, tensor in store.items() if tensor is not None]

    def moved(self) -> bool:
        return (any(len(store) != size for store, size in self._sizes)
                or any(store[name] is not child for store, name, child in self._children)
                or any(store[name] is not tensor or tensor.data_ptr() != ptr
                       for store, name, tensor, ptr in self._tensors))
