"""What the runtime did, in one place: tests assert on it, logs and benchmarks report it."""

from __future__ import annotations

from dataclasses import dataclass


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
