"""What the runtime did, in one place: tests assert on it, logs and benchmarks report it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counters:
    """UNet evaluations by path, and the compilations, CUDA-graph captures and replays behind them."""

    full: int = 0  # evaluations that ran the full path
    shallow: int = 0  # evaluations that reused a cached feature
    unplaced: int = 0  # full evaluations placed in no denoising loop (direct calls, hand-made timesteps)
    restores: int = 0  # features put back after another loop or a direct call used the buffer
    fallbacks: int = 0  # evaluations that ran the UNet's original forward
    controlnet_shallow: int = 0  # ControlNet evaluations that ran only the residuals a shallow UNet step needs
    controlnet_recomputes: int = 0  # of those, run whole again: the UNet step could not be shallow after all
    shapes: int = 0  # input shapes seen, each with its own feature buffer
    compiles: int = 0  # (shape, path) pairs compiled by torch.compile
    compile_failures: int = 0  # (shape, path) pairs whose compilation or capture failed: they run uncaptured/eagerly
    captures: int = 0  # CUDA graphs captured by hand (mode="static-cudagraphs")
    replays: int = 0  # replays of those graphs
    # graphs made again for a shape already compiled or captured, because a setting it baked in changed (a LoRA
    # weight, an IP-Adapter scale, FreeU values, attention processors, new weights): how many, and why
    recompiles: int = 0  # by torch.compile, its guards having failed (the reason is dynamo's: the failed guard)
    recaptures: int = 0  # by hand (mode="static-cudagraphs"): the settings read before a replay had changed
    recompile_reasons: dict[str, int] = field(default_factory=dict)
    recapture_reasons: dict[str, int] = field(default_factory=dict)

    def recompiled(self, reason: str) -> bool:
        """Count a recompile; True the first time for this reason (log it then)."""
        self.recompiles += 1
        return _add(self.recompile_reasons, reason)

    def recaptured(self, reason: str) -> bool:
        """Count a recapture; True the first time for this reason."""
        self.recaptures += 1
        return _add(self.recapture_reasons, reason)


def _add(reasons: dict[str, int], reason: str) -> bool:
    reasons[reason] = reasons.get(reason, 0) + 1
    return reasons[reason] == 1
