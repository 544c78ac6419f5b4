"""mp4/gif reading and writing with PyAV: uint8 frames (F, H, W, 3) in, uint8 frames out, no rescaling."""

import os

import numpy as np

from .files import atomic_path


class VideoReadError(Exception):
    """A video that cannot be decoded."""


def read_video(path: str) -> np.ndarray:
    """All frames of a video as uint8 (F, H, W, 3)."""
    import av

    try:
        with av.open(path) as container:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.error.FFmpegError, OSError, IndexError, ValueError) as err:
        raise VideoReadError(f"{path}: {err}") from err
    if not frames:
        raise VideoReadError(f"{path}: no video frames")
    return np.stack(frames)


def write_video(path: str, frames: np.ndarray, fps: int = 8, lossless: bool = False) -> None:
    """Write uint8 (F, H, W, 3) frames as H.264 mp4 (or gif, by extension), atomically: a crash leaves no half file.
    `lossless` stores RGB exactly (H.264 RGB at qp 0; fewer players take it than the default yuv420p)."""
    import av

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    ext = os.path.splitext(path)[1].lower()
    height, width = frames.shape[1:3]
    with atomic_path(path) as tmp, av.open(tmp, "w") as container:
        if ext == ".gif":
            stream = container.add_stream("gif", rate=fps)
            stream.pix_fmt = "rgb8"
        elif lossless:
            stream = container.add_stream("libx264rgb", rate=fps)
            stream.pix_fmt = "rgb24"
            stream.options = {"qp": "0"}
        else:
            stream = container.add_stream("libx264", rate=fps)
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "12"}
        # yuv420p needs even sizes: pad by repeating the last row/column rather than resampling.
        pad_h, pad_w = (height % 2, width % 2) if ext != ".gif" and not lossless else (0, 0)
        stream.height, stream.width = height + pad_h, width + pad_w
        for frame in frames:
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
