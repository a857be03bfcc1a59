"""The Python-level settings a compiled path bakes in as constants, read before every replay of a hand-captured graph.

A graph computes with the settings it was made under: which attention processor each attention runs (PAG swaps them
at every call), IP-Adapter scales, FreeU values, and the LoRA state (which adapters are active, disabled or fused, and
their scalings: ``set_adapters`` weights and the per-call scale). ``torch.compile``'s guards check all of these on
every call and compile again when one changed. A hand-captured CUDA graph has no guards: ``SettingsWatch.read()``
reads them, before every replay, and a graph is replayed only under the settings it was captured with.

Scalings that are tensors (``enable_lora_hotswap``) count by identity, not value: a graph reads their values itself.
The reading is flat and done by C-level maps (no Python loop over layers), and covers only the modules the path
runs: a shallow step reads a few layers. Which objects to read is planned again when the UNet's modules change
(``plan()``), when LoRA adapters are loaded or removed, and when its attention processors change.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from itertools import chain, repeat
from operator import attrgetter, is_, itemgetter
from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

from .lora import LoraLayers, tuner_layers

IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)
FREEU_VALUES = ("s1", "s2", "b1", "b2")
_ACTIVE, _DISABLED, _MERGED = map(itemgetter, ("_active_adapter", "_disable_adapters", "merged_adapters"))
CATEGORIES = ("attention processors", "IP-Adapter scales", "FreeU values", "LoRA adapters and scales")


def path_settings(partition, model: torch.nn.Module) -> tuple[SettingsWatch, SettingsWatch]:
    """A watch for each path of a partition, full then shallow: of the modules the path runs where the partition
    says (``UNetPartition.path_modules``), else of the whole model."""
    modules, lora = getattr(partition, "path_modules", None), LoraLayers(model)
    up_blocks = getattr(model, "up_blocks", ())
    return tuple(SettingsWatch(functools.partial(modules, full) if modules else lambda: [model], up_blocks, lora)
                 for full in (True, False))


class Reading:
    """One reading of the settings: a flat list of values, and where each category's values end in it."""

    __slots__ = ("values", "ends")

    def __init__(self, values: list, ends: tuple[int, ...]):
        self.values, self.ends = values, ends


class SettingsWatch:
    """Reads the settings that graphs of one path bake in, and tells whether two readings are the same.

    ``roots()`` gives the modules the path runs (the shallow path: a few layers): only their settings are read, so
    a shallow step, where the check's cost matters most, reads little.
    """

    def __init__(self, roots: Callable[[], list[torch.nn.Module]], up_blocks, lora: LoraLayers):
        self.roots, self.lora = roots, lora
        self._freeu = ([vars(up) for up in up_blocks for _ in FREEU_VALUES],
                       [name for _ in up_blocks for name in FREEU_VALUES])
        self.plan()

    def plan(self) -> None:
        """Find what to read: the path's attentions and LoRA layers (again after the UNet's modules changed)."""
        modules = [m for root in self.roots() for m in root.modules()]
        attentions = [m for m in modules if isinstance(m, Attention)]
        self._attention_dicts = [vars(a) for a in attentions]  # a processor object, or
        self._attention_modules = [a._modules for a in attentions]  # a processor that is a module (IP-Adapter)
        self._processors: list = []
        self._ip_adapters: list = []
        layers = tuner_layers(modules)
        self._lora_dicts = [vars(layer) for layer in layers]
        self._scalings = [layer.scaling for layer in layers]  # PEFT writes into these dicts, never replaces them
        self._lora_layers = self.lora.layers()  # the UNet's, to notice adapters loaded or removed

    def read(self) -> Reading:
        if self.lora.layers() is not self._lora_layers:
            self.plan()
        processors = list(chain(map(dict.get, self._attention_dicts, repeat("processor")),
                                map(dict.get, self._attention_modules, repeat("processor"))))
        if processors != self._processors:  # compared by identity: processor objects do not define ==
            self._processors = processors
            self._ip_adapters = [p for p in processors if isinstance(p, IP_ADAPTER_PROCESSORS)]
        values = list(processors)
        ends = [len(values)]
        values.extend(chain.from_iterable(map(attrgetter("scale"), self._ip_adapters)))
        ends.append(len(values))
        values.extend(map(dict.get, *self._freeu))
        ends.append(len(values))
        dicts = self._lora_dicts
        values.extend(chain.from_iterable(map(dict.values, self._scalings)))
        values.extend(map(_ACTIVE, dicts))
        values.extend(map(_DISABLED, dicts))
        values.extend(map(len, map(_MERGED, dicts)))  # fused or not
        ends.append(len(values))
        return Reading(values, tuple(ends))

    @staticmethod
    def same(reading: Reading, captured: Reading) -> bool:
        """Whether ``reading`` is the settings ``captured`` was read under. Identical objects first (the common
        case, one C-level pass); else value by value, tensors by identity. An equal reading then replaces the
        captured one's objects, so the next check takes the quick pass again."""
        new, old = reading.values, captured.values
        if len(new) != len(old):
            return False
        if all(map(is_, new, old)):
            return True
        if all(map(_same_value, new, old)):
            captured.values = new
            return True
        return False

    @staticmethod
    def changed(reading: Reading, captured: Reading) -> list[str]:
        """The categories whose settings differ between two readings (for logs and counters)."""
        names = []
        starts_new, starts_old = (0, *reading.ends[:-1]), (0, *captured.ends[:-1])
        for name, a, b, c, d in zip(CATEGORIES, starts_new, reading.ends, starts_old, captured.ends, strict=True):
            new, old = reading.values[a:b], captured.values[c:d]
            if len(new) != len(old) or not all(map(_same_value, new, old)):
                names.append(name)
        return names


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # read by the graph at its address
        return False
    return a == b
