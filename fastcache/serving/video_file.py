"""MP4 files of generated frames, encoded with PyAV (FFmpeg's libraries, from the wheels), never by shelling out.

PyAV is the ``video`` extra: imported where it is used, and a server that would serve video without it is refused at
start with one line (``require_av``). H.264 in yuv420p at a constant rate factor plays everywhere; ``crf=0`` writes
lossless RGB (libx264rgb), whose frames decode to exactly the pixels given (fewer players read it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

INSTALL_HINT = 'serving video needs PyAV: pip install "fastcache[video]"'


def require_av():
    """The ``av`` module; ``ImportError`` with one line naming the install that fixes it."""
    try:
        import av
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return av


def as_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames (F, H, W, 3) as bytes: floats in [0, 1] (a pipeline's ``output_type="np"``) rounded as the images API
    rounds its PNGs."""
    if frames.dtype == np.uint8:
        return frames
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int, path: str | os.PathLike, crf: int = 18) -> int:
    """Write ``frames`` (F, H, W, 3; uint8, or floats in [0, 1]; even width and height) to ``path`` as an H.264 MP4
    at ``fps`` frames per second; its size in bytes. ``crf=0``: lossless RGB."""
    av = require_av()
    frames = as_uint8(np.asarray(frames))
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be (frames, height, width, 3); got shape {frames.shape}.")
    height, width = frames.shape[1:3]
    lossless = crf == 0
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264rgb" if lossless else "libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush the encoder's delayed frames
    return Path(path).stat().st_size


def decode_mp4(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """The frames of an MP4 file as uint8 RGB (F, H, W, 3), and its frame rate."""
    av = require_av()
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        rate = float(stream.average_rate or stream.base_rate or 0)
    return np.stack(frames), rate
