"""Writing a video's frames: H.264 MP4 through PyAV (FFmpeg in its wheels, no subprocess) or animated WebP (Pillow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".webp")


def check_video_path(path: str | Path) -> None:
    """``ValueError`` naming the formats unless ``path`` ends in one this module writes."""
    if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"a video is written as {' or '.join(VIDEO_SUFFIXES)}; got {str(path)!r}.")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Frames ``(frames, height, width, 3)`` in [0, 1] as 8-bit RGB."""
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: str | Path, fps: int = 8) -> Path:
    """Write ``frames`` (``(frames, height, width, 3)``, floats in [0, 1]) to ``path``: ``.mp4`` or ``.webp``."""
    check_video_path(path)
    path = Path(path)
    pixels = to_uint8(np.asarray(frames))
    if path.suffix.lower() == ".webp":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in pixels]
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                       lossless=True)
        return path
    return _write_mp4(pixels, path, fps)


def _write_mp4(pixels: np.ndarray, path: Path, fps: int) -> Path:
    try:
        import av
    except ImportError:
        raise ImportError('writing MP4 needs PyAV: pip install "fastcache[video]" (or write .webp)') from None
    height, width = pixels.shape[1:3]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("h264", rate=fps)
        # yuv420p halves the chroma planes: odd sizes are padded by one pixel row or column
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
        for frame in pixels:
            frame = np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush
    return path
