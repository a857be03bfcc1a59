"""Writing a video's frames: H.264 MP4 through PyAV (FFmpeg in its wheels, no subprocess) or animated WebP (Pillow).

The one MP4 writer: the main job's output and the server's videos (``serving/video_jobs.py``). ``crf=0`` writes
lossless RGB (libx264rgb), whose frames decode to exactly the bytes given; otherwise yuv420p, which every player reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .extras import require

VIDEO_SUFFIXES = (".mp4", ".webp")


def check_video_path(path: str | Path) -> None:
    """``ValueError`` naming the formats unless ``path`` ends in one this module writes."""
    if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"a video is written as {' or '.join(VIDEO_SUFFIXES)}; got {str(path)!r}.")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames ``(frames, height, width, 3)`` in [0, 1] as 8-bit RGB."""
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8, crf: int | None = None) -> Path:
    """Write ``frames`` (``(frames, height, width, 3)``, floats in [0, 1]) to ``path``: ``.mp4`` or ``.webp``. ``crf``:
    H.264's constant rate factor (None: FFmpeg's default; 0: lossless RGB)."""
    check_video_path(path)
    path = Path(path)
    pixels = to_uint8(np.asarray(frames))
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or not len(pixels):
        raise ValueError(f"frames must be (frames, height, width, 3); got shape {pixels.shape}.")
    if path.suffix.lower() == ".webp":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in pixels]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       lossless=True)
        return path
    return _write_mp4(pixels, path, fps, crf)


def _write_mp4(pixels: np.ndarray, path: Path, fps: int, crf: int | None) -> Path:
    require("video")  # one line naming the pip install, without PyAV
    import av

    height, width = pixels.shape[1:3]
    lossless = crf == 0
    # faststart: the index goes first, so that a player (a browser fetching a served video) starts before the end
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264rgb" if lossless else "h264", rate=fps)
        if lossless:
            stream.width, stream.height, stream.pix_fmt = width, height, "rgb24"
        else:  # yuv420p halves the chroma planes: odd sizes are padded by one pixel row or column
            stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        if crf is not None:
            stream.options = {"crf": str(crf)}
        for frame in pixels:
            if not lossless:
                frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())  # flush
    return path
