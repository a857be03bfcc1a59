"""``FastCacheConfig``: every option of ``compile_pipeline`` in one dataclass that validates itself.

``compile_pipeline``'s keywords, the benchmark's variants, the service's options and the command line all build or
hold one, so a default or a check is written once. Checks that need the model (the branch's range, a ControlNet's
layout) run when the config is applied to a pipeline.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors_text import listing
from .graphs import COMPILE_MODES, compile_options
from .schedule import Schedule, as_int, make_schedule


@dataclass(frozen=True)
class FastCacheConfig:
    """How fastcache runs a pipeline. Invalid values raise ``ValueError`` (a wrong value) or ``TypeError`` (a wrong
    type) naming what is valid, at construction.

    Attributes:
        interval: a full UNet step every ``interval`` steps (1 = no caching: the plain pipeline's output).
        branch: DeepCache branch id; 0 (shallowest, fastest) to ``3 * len(unet.down_blocks) - 1`` for the usual two
            layers per block (the range is checked against the UNet).
        schedule: ``"uniform"``, ``"quad-center"`` (DeepCache's non-uniform schedule, with ``center`` and ``pow``) or
            a list of full-step indices containing 0.
        compile: compile both paths with ``torch.compile`` (CUDA graphs on CUDA with the default ``mode``);
            ``False`` runs the same runtime eagerly.
        mode: a ``torch.compile`` mode, or ``"static-cudagraphs"`` (CUDA graphs captured by hand); see
            ``graphs.COMPILE_MODES``.
        inductor_options: extra ``torch._inductor.config`` settings for the paths (and the VAE decoder), merged into
            ``mode``'s own, e.g. ``graphs.UNET_INDUCTOR_OPTIONS``.
        compile_vae: also compile ``pipe.vae.decoder`` (without CUDA graphs).
        dynamic_batch: compile one graph per path for every batch size (the batch dimension of every input marked
            dynamic; CUDA graphs are still recorded per batch size; a batch of one gets a graph of its own, as dynamo
            specialises size 1); ``False``: fully static graphs, one compilation per path and batch size. Measured
            on CPU only so far (README, "Cold start").
    """

    interval: int = 3
    branch: int = 0
    schedule: str | Sequence[int] = "uniform"
    center: int = 15
    pow: float = 1.4
    compile: bool = True
    mode: str = "reduce-overhead"
    inductor_options: Mapping[str, Any] | None = None
    compile_vae: bool = False
    dynamic_batch: bool = True

    def __post_init__(self):
        object.__setattr__(self, "interval", as_int(self.interval, "interval", 1))
        object.__setattr__(self, "branch", as_int(self.branch, "branch", 0))
        if not isinstance(self.schedule, str):  # a list of steps: kept as a tuple, so the config stays comparable
            make_schedule(self.schedule, self.interval)  # TypeError/ValueError naming what is valid
            object.__setattr__(self, "schedule", tuple(self.schedule))
        self.plan  # noqa: B018 (validates the schedule with center and pow)
        for name in ("compile", "compile_vae", "dynamic_batch"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False; got {getattr(self, name)!r}.")
        if self.inductor_options is not None and not isinstance(self.inductor_options, Mapping):
            raise TypeError(f"inductor_options must be a mapping of torch._inductor.config settings to values, or "
                            f"None; got {type(self.inductor_options).__name__}.")
        if not self.compile and (self.inductor_options or self.compile_vae):
            raise ValueError("inductor_options and compile_vae need compile=True.")
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"mode must be one of {COMPILE_MODES}; got {self.mode!r}.")
        if self.compile:
            compile_options(self.mode, self.inductor_options)  # unknown inductor options raise here

    @property
    def plan(self) -> Schedule:
        """The schedule of full steps these options describe."""
        return make_schedule(self.schedule, self.interval, self.center, self.pow)

    def replace(self, **changes) -> FastCacheConfig:
        """A copy with ``changes`` applied (validated again); unknown names raise ``TypeError`` naming the valid."""
        unknown = sorted(set(changes) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unknown fastcache options: {listing(unknown, 'name')}; valid: "
                            f"{listing(OPTION_NAMES, 'option', ordered=True)}.")
        return dataclasses.replace(self, **changes)

    def describe(self) -> str:
        """One line for logs and reports."""
        compiled = self.mode if self.compile else "eager"
        return (f"interval={self.interval}, branch={self.branch}, schedule={self.plan.kind}, compile={compiled}, "
                f"inductor_options={dict(self.inductor_options or {})}, compile_vae={self.compile_vae}, "
                f"dynamic_batch={self.dynamic_batch}")


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(FastCacheConfig))
