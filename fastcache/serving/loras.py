"""Per-request LoRA: adapters loaded once at start, hot-swapped between pipeline calls into a fixed set of slots.

Loading an adapter adds modules, and ``set_adapters`` writes its weights into the layers as Python floats: on a
compiled UNet both compile again (README, "Never stale, compile once"). So the served UNet gets, once and before
anything compiles, ``slots`` PEFT adapters (``fastcache-slot00``, ...) that cover every layer any served adapter
targets, at the widest rank, all active, their scalings tensors (PEFT's ``prepare_model_for_compiled_hotswap``).
Before each pipeline call the request's adapter set is put in place: an adapter that no slot holds is hot-swapped
into a slot the call does not need (diffusers' ``load_lora_adapter(hotswap=True)`` copies its weights into the slot's
tensors, zero-padded, and fills their scalings), each slot's scalings are multiplied in place by its adapter's weight,
and a slot the call does not use gets 0: its layers then add exactly nothing. Shapes, modules and every Python-level
setting stay as they were, so a switch compiles and captures nothing.

The files are checked when the options are built (a safetensors file, a LoRA of the UNet alone, its rank), and the
weights against the model at start, by hot-swapping each adapter once.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors_text import count, examples, one_line
from ..lora import LoraLayers
from .request import InvalidRequest

logger = logging.getLogger(__name__)

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NO_ADAPTERS = "none"  # the metrics' label of requests without adapters (so no adapter may have that name)
DEFAULT_MAX_SLOTS = 4  # slots by default: every adapter loaded, at most this many
MAX_SLOTS = 16
MAX_RANK = 4096
# NOTE: PEFT's hot-swap finds a slot's tensors by its name as a substring of their keys: fixed width, so that no
# slot's name is part of another's (slot-1 of slot-10)
SLOT = "fastcache-slot{:02d}"
_TEXT_ENCODER_KEYS = ("text_encoder", "lora_te")  # diffusers' and kohya's prefixes (te1, te2: SDXL's two)
_DOWN_KEYS = (".lora_A.", "lora.down.", "lora_down.")  # a LoRA's first matrix: its rank is the first dimension


@dataclass(frozen=True)
class LoraOptions:
    """The adapters a server loads (``--lora NAME=PATH``), how many one request may combine (``slots``: each costs a
    rank-``rank`` LoRA on every layer the adapters target, at every UNet step, used or not) and the slots' rank
    (default: the widest adapter's). Checks itself, reading each file's header only: ``ValueError`` naming the flag's
    field and the adapter at fault."""

    adapters: tuple[tuple[str, str], ...] = ()  # (name, path of a .safetensors file or of a folder holding one)
    slots: int | None = None  # default: as many as adapters, at most DEFAULT_MAX_SLOTS
    rank: int | None = None  # default: the widest adapter's rank
    ranks: Mapping[str, int] = field(init=False, repr=False, compare=False)  # each adapter's rank, from its file

    def __post_init__(self):
        pairs = tuple(self.adapters.items() if isinstance(self.adapters, Mapping) else self.adapters)
        if not all(isinstance(pair, (tuple, list)) and len(pair) == 2 for pair in pairs):
            raise ValueError(f"lora must be (name, path) pairs; got {self.adapters!r}")
        ranks = {}
        for name, path in pairs:
            if not isinstance(name, str) or not NAME.fullmatch(name) or name == NO_ADAPTERS:
                raise ValueError(f"lora names are 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or "
                                 f"digit, and not {NO_ADAPTERS!r}; got {name!r}")
            if name in ranks:
                raise ValueError(f"lora {name} is given twice; give each adapter one name")
            ranks[name] = _file_rank(name, lora_file(name, path))
        object.__setattr__(self, "adapters", tuple((name, str(path)) for name, path in pairs))
        object.__setattr__(self, "ranks", ranks)
        if (self.slots is not None or self.rank is not None) and not ranks:
            raise ValueError("lora_slots and lora_rank need adapters to serve (--lora NAME=PATH)")
        most = min(len(ranks), MAX_SLOTS)
        if self.slots is not None and (not _is_int(self.slots) or not 1 <= self.slots <= most):
            raise ValueError(f"lora_slots must be an integer from 1 to {most} (the adapters loaded, at most "
                             f"{MAX_SLOTS}); got {self.slots!r}")
        if self.rank is not None and (not _is_int(self.rank) or not 1 <= self.rank <= MAX_RANK):
            raise ValueError(f"lora_rank must be an integer from 1 to {MAX_RANK}; got {self.rank!r}")
        limit = self.rank if self.rank is not None else MAX_RANK
        too_wide = {name: rank for name, rank in ranks.items() if rank > limit}
        if too_wide:
            name, rank = next(iter(too_wide.items()))
            fix = (f"raise lora_rank to at least {max(too_wide.values())} or leave it out (default: the widest "
                   f"adapter's rank)" if self.rank is not None else f"ranks above {MAX_RANK} are not served")
            raise ValueError(f"lora {name} has rank {rank}, wider than {limit}: {fix}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.adapters)

    @property
    def slot_count(self) -> int:
        return self.slots or min(len(self.adapters), DEFAULT_MAX_SLOTS)

    @property
    def target_rank(self) -> int:
        return self.rank or max(self.ranks.values(), default=1)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def lora_file(name: str, path: str | Path) -> Path:
    """The safetensors file of adapter ``name``: ``path`` itself, or the one ``.safetensors`` file in folder ``path``
    (as ``save_lora_weights`` writes it)."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"lora {name}={path}: a folder must hold one .safetensors file; it holds {len(files)}")
        return files[0]
    if not path.is_file():
        raise ValueError(f"lora {name}={path}: no such file or folder")
    return path


def _file_rank(name: str, path: Path) -> int:
    """The rank of the LoRA in ``path``, read from its header (no tensor is loaded); ``ValueError`` if it is not a
    safetensors file, not a LoRA, has text-encoder layers (their hot-swap is not supported) or DoRA scales."""
    where = f"lora {name}={path}"
    try:
        with safe_open(str(path), "pt") as file:
            shapes = {key: file.get_slice(key).get_shape() for key in file.keys()}  # noqa: SIM118 (no __iter__)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{where}: not a readable safetensors file ({error})") from None
    if not shapes:
        raise ValueError(f"{where}: the file holds no tensors")
    other = next((key for key in shapes if "lora" not in key and not key.endswith(".alpha")), None)
    if other is not None:
        raise ValueError(f"{where}: not a LoRA (it holds {other!r}; LoRA keys name lora_A/lora_B or lora_down/up)")
    if any(key.startswith(_TEXT_ENCODER_KEYS) for key in shapes):
        raise ValueError(f"{where}: it has text-encoder LoRA layers, which cannot be hot-swapped (diffusers); serve "
                         f"a LoRA of the UNet alone")
    if any("dora_scale" in key for key in shapes):
        raise ValueError(f"{where}: a DoRA, which diffusers cannot hot-swap")
    ranks = [shape[0] for key, shape in shapes.items() if any(tag in key for tag in _DOWN_KEYS) and len(shape) >= 2]
    if not ranks:
        raise ValueError(f"{where}: no LoRA down (lora_A) matrices found")
    return max(ranks)


class _Slots:
    """The slots of one UNet: which adapter each holds, the scalings its last hot-swap set (copies), and the adapter
    set last put in place."""

    def __init__(self, unet, names: list[str]):
        self.names, self.layers = names, LoraLayers(unet)
        self.held: list[str | None] = [None] * len(names)
        self.loaded = [[torch.zeros_like(t) for t in self.scalings(i)] for i in range(len(names))]
        self.applied: tuple | None = None  # None: unknown (a swap began), () : every slot at 0
        self.used = [0] * len(names)  # when each slot was last asked for (the slot to reuse: the least recent)

    def scalings(self, index: int) -> list[torch.Tensor]:
        """Slot ``index``'s scaling tensors, as the layers hold them now (read again at every switch: nothing else
        keeps them)."""
        name = self.names[index]
        return [layer.scaling[name] for layer in self.layers.layers() if name in layer.scaling]


class ServedLoras:
    """The served adapters' weights (in memory) and the slots of each UNet they serve on.

    ``attach(pipe)`` prepares a pipeline's UNet (before ``compile_pipeline``); ``apply(unet, adapters)`` puts a
    request's adapter set in place before its pipeline call (the engine's thread only). For the metrics: ``images``
    per adapter set (``names_label``), ``switches`` (calls whose adapters or weights differ from the previous call's
    on that UNet) and ``hotswaps`` (adapters copied into a slot).
    """

    def __init__(self, options: LoraOptions, pipeline_class, dtype: torch.dtype):
        self.options = options
        self.switches = self.hotswaps = 0
        self.images: dict[str, int] = {}
        self._slots: dict[int, _Slots] = {}
        self._calls = 0
        self.weights = {}
        for name, path in options.adapters:
            file = lora_file(name, path)
            state_dict, alphas, metadata = pipeline_class.lora_state_dict(
                str(file.parent), weight_name=file.name, use_safetensors=True, local_files_only=True,
                return_lora_metadata=True)
            state_dict = {key: value.to(dtype) for key, value in state_dict.items()}
            self.weights[name] = (state_dict, alphas, metadata)

    @property
    def names(self) -> tuple[str, ...]:
        return self.options.names

    def check(self, adapters: tuple[tuple[str, float], ...]) -> None:
        """``InvalidRequest`` naming the loaded adapters unless this server can serve ``adapters``."""
        unknown = [name for name, _ in adapters if name not in self.weights]
        if unknown:
            raise InvalidRequest(f"lora {unknown[0][:64]!r} is not loaded; {count(self.names, 'adapter')} "
                                 f"{'is' if len(self.names) == 1 else 'are'} loaded {examples(self.names)}.", "lora")
        if len(adapters) > self.options.slot_count:
            raise InvalidRequest(f"lora names {len(adapters)} adapters; this server combines at most "
                                 f"{self.options.slot_count} per request (--lora-slots).", "lora")

    # -- preparing a UNet ----------------------------------------------------------------------------------------

    def attach(self, pipe) -> None:
        """Give ``pipe``'s UNet its slots (covering every layer an adapter targets, at the slots' rank, scalings as
        tensors, all active, every slot at 0), then hot-swap each adapter into the first slot once: an adapter that
        does not fit the model is refused here, naming it (``ValueError``)."""
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap

        unet = pipe.unet
        if id(unet) in self._slots:
            return
        if getattr(unet, "peft_config", None):
            raise ValueError("lora: the model already has LoRA adapters; serve a model without them")
        for adapter, (state_dict, _, _) in self.weights.items():  # before diffusers and PEFT log their own errors
            problem = fit_problem(unet, _unet_keys(adapter, state_dict))
            if problem:
                raise ValueError(f"lora {adapter}: {problem}")
        names = [SLOT.format(i) for i in range(self.options.slot_count)]
        empty = self._empty_slot(unet)
        with warnings.catch_warnings():  # PEFT warns of several adapters in one model: that is the point here
            warnings.simplefilter("ignore", UserWarning)
            for name in names:
                unet.load_lora_adapter(dict(empty), prefix="unet", adapter_name=name)
        prepare_model_for_compiled_hotswap(unet, target_rank=self.options.target_rank, config=unet.peft_config)
        unet.set_adapter(names)
        slots = self._slots[id(unet)] = _Slots(unet, names)
        for adapter in self.names:
            try:
                self._swap(slots, 0, adapter)
            except Exception as error:  # noqa: BLE001 (diffusers and PEFT raise several kinds)
                raise ValueError(f"lora {adapter}: cannot be hot-swapped into this model's UNet "
                                 f"({type(error).__name__}: {one_line(error, 200)})") from None
        self.hotswaps = 0
        for i in range(len(names)):
            torch._foreach_zero_(slots.scalings(i))
        slots.applied = ()

    def _empty_slot(self, unet) -> dict[str, torch.Tensor]:
        """A LoRA of zeros, at the slots' rank, on every layer any adapter targets (PEFT keys, ``unet.`` prefix)."""

        rank, empty = self.options.target_rank, {}
        for name, (state_dict, _, _) in self.weights.items():
            for key, value in _unet_keys(name, state_dict).items():
                if ".lora_A." in key:
                    empty[f"unet.{key}"] = torch.zeros(rank, *value.shape[1:], dtype=unet.dtype, device=unet.device)
                elif ".lora_B." in key and value.ndim >= 2:
                    empty[f"unet.{key}"] = torch.zeros(value.shape[0], rank, *value.shape[2:], dtype=unet.dtype,
                                                       device=unet.device)
        return empty

    # -- serving a request ---------------------------------------------------------------------------------------

    def apply(self, unet, adapters: tuple[tuple[str, float], ...]) -> None:
        """Put ``adapters`` (sorted ``(name, scale)`` pairs, checked) in place on ``unet`` for its next call: each
        adapter in a slot (a hot-swap where no slot holds it: into a slot this call does not need, the one asked for
        longest ago), each slot's scalings its adapter's times its scale, the other slots' 0."""
        slots = self._slots.get(id(unet))
        if slots is None or slots.applied == adapters:
            return
        self._calls += 1
        self.switches += 1
        wanted = dict(adapters)
        free = sorted((i for i, held in enumerate(slots.held) if held not in wanted), key=slots.used.__getitem__)
        for name in wanted:
            if name not in slots.held:
                self._swap(slots, free.pop(0), name)
        for i, held in enumerate(slots.held):
            if held in wanted:
                slots.used[i] = self._calls
            scalings = slots.scalings(i)
            torch._foreach_copy_(scalings, slots.loaded[i])
            torch._foreach_mul_(scalings, wanted.get(held, 0.0))
        slots.applied = adapters

    def count(self, adapters: tuple[tuple[str, float], ...], images: int) -> None:
        """Count ``images`` served with ``adapters``."""
        label = names_label([name for name, _ in adapters])
        self.images[label] = self.images.get(label, 0) + images

    def _swap(self, slots: _Slots, index: int, adapter: str) -> None:
        """Hot-swap ``adapter``'s weights into slot ``index`` (diffusers: in place, zero-padded to the slot's rank,
        the slot's layers it does not target zeroed), and keep the scalings it set."""
        state_dict, alphas, metadata = self.weights[adapter]
        slots.held[index] = None  # until the swap is done
        slots.applied = None
        slots.layers.unet.load_lora_adapter(dict(state_dict), prefix="unet", network_alphas=alphas, metadata=metadata,
                                            adapter_name=slots.names[index], hotswap=True)
        torch._foreach_copy_(slots.loaded[index], slots.scalings(index))
        slots.held[index] = adapter
        self.hotswaps += 1
        logger.debug("fastcache: LoRA %s hot-swapped into %s", adapter, slots.names[index])


def _unet_keys(name: str, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's part of a LoRA, keyed as PEFT names its layers (``down_blocks.0....to_q.lora_A.weight``)."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    unet_keys = {key.removeprefix("unet."): value for key, value in state_dict.items() if key.startswith("unet.")}
    if not unet_keys:
        raise ValueError(f"lora {name}: no UNet layers in it")
    if not any("lora_A" in key for key in unet_keys):
        unet_keys = convert_unet_state_dict_to_peft(unet_keys)
    return unet_keys


def fit_problem(unet: torch.nn.Module, unet_keys: Mapping[str, torch.Tensor]) -> str | None:
    """Why a LoRA (PEFT keys) does not fit ``unet``: modules the UNet does not have, or layers of other widths; one
    bounded line (a count and a few names), or ``None``. A LoRA made for another model, or saved with its keys
    prefixed twice (``unet.unet.``), fails here, before diffusers and PEFT log every module name."""
    modules = dict(unet.named_modules())
    widths: dict[str, list[int | None]] = {}  # module -> [in, out] as the LoRA's A and B matrices say
    for key, value in unet_keys.items():
        for part, axis, side in ((".lora_A.", 1, 0), (".lora_B.", 0, 1)):
            if part in key and value.ndim >= 2:
                widths.setdefault(key.split(part)[0], [None, None])[side] = value.shape[axis]
    absent = [name for name in widths if name not in modules]
    if absent:
        twice = all(name.startswith("unet.") and name[5:] in modules for name in absent)
        return (f"the LoRA targets {count(absent, 'module')} this UNet does not have {examples(absent)}; "
                + ("its keys are prefixed twice (unet.unet.): save the UNet's layers without the unet. prefix"
                   if twice else "is it for another model, or are its keys prefixed twice?"))
    misfit = [name for name, (width_in, width_out) in widths.items()
              if (width_in, width_out) != _widths(modules[name], width_in, width_out)]
    if misfit:
        return (f"the LoRA's layers have other widths than {count(misfit, 'module')} of this UNet "
                f"{examples(misfit)}; is it for another model?")
    return None


def _widths(module: torch.nn.Module, width_in: int | None, width_out: int | None) -> tuple:
    """``module``'s input and output widths, where the LoRA gives one (``None`` where it does not)."""
    found = (getattr(module, "in_features", getattr(module, "in_channels", None)),
             getattr(module, "out_features", getattr(module, "out_channels", None)))
    return tuple(None if given is None else width for given, width in zip((width_in, width_out), found, strict=True))


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=PATH`` (the command line's ``--lora``) as a pair; ``ValueError`` naming the form otherwise."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"lora takes NAME=PATH (e.g. --lora style=/loras/style.safetensors); got {text!r}")
    return name, path


def names_label(adapters: Sequence[str]) -> str:
    """The metrics' label of an adapter set: its names sorted, comma-separated (names cannot hold commas)."""
    return ",".join(sorted(adapters)) or NO_ADAPTERS
