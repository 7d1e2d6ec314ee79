"""Decode clips and images into fixed-size uint8 frames: sample at a target fps, resize, centre-crop.

Everything here raises :class:`BadSample` with a reason for data that cannot be used; the caller
counts and skips it. Frames come out as uint8 3×F×H×W (RGB).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .buckets import Bucket, centre_crop, cover_size


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is the metrics key (e.g. ``undecodable``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class VideoInfo:
    width: int
    height: int
    num_frames: int
    fps: float

    @property
    def span(self) -> float:
        """Seconds from the first to the last frame."""
        return (self.num_frames - 1) / self.fps


def _to_planar(frame, sw: int, sh: int, bucket: Bucket, out: np.ndarray) -> None:
    """Resize ``frame`` to sw×sh and write its centre crop into ``out`` (3×H×W, RGB).

    swscale converts straight to planar RGB (``gbrp``: planes G, B, R), which avoids an interleaved
    → planar transpose. Its unscaled fast path leaves the last ``sw % 16`` columns unreliable, so a
    crop that reaches them goes through ``rgb24`` instead.
    """
    top, left = (sh - bucket.height) // 2, (sw - bucket.width) // 2
    bottom, right = top + bucket.height, left + bucket.width
    if sw % 16 and right > sw - sw % 16:
        out[:] = frame.reformat(width=sw, height=sh, format="rgb24").to_ndarray()[
            top:bottom, left:right].transpose(2, 0, 1)
        return
    planar = frame.reformat(width=sw, height=sh, format="gbrp")
    for channel, plane in zip((1, 2, 0), planar.planes):
        rows = np.frombuffer(plane, np.uint8).reshape(sh, plane.line_size)
        out[channel] = rows[top:bottom, left:right]


def frame_indices(info: VideoInfo, frames: int, fps: float, rng: np.random.Generator) -> list[int]:
    """Source frame indices for ``frames`` frames at ``fps``, starting at a random offset."""
    need = (frames - 1) / fps
    start = rng.uniform(0.0, max(0.0, info.span - need))
    times = start + np.arange(frames) / fps
    return [min(info.num_frames - 1, int(round(t * info.fps))) for t in times]


def decode_video(data: bytes, choose: Callable[[VideoInfo], Optional[Bucket]], fps: float,
                 rng: np.random.Generator, threads: int = 1, indices: Optional[list[int]] = None
                 ) -> tuple[np.ndarray, Bucket, list[int]]:
    """Decode the frames ``choose(info)``'s bucket needs → (uint8 3×F×H×W, bucket, the source frame
    index of each of the F frames). ``indices``: decode these source frames instead of drawing them
    (a task's side video, e.g. ``src.mp4``, read at its target's frames; ``rng`` is not used)."""
    import av

    try:
        container = av.open(io.BytesIO(data), mode="r")
    except Exception as exc:
        raise BadSample("undecodable", f"cannot open: {type(exc).__name__}") from None
    try:
        if not container.streams.video:
            raise BadSample("undecodable", "no video stream")
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        if threads != 1:
            stream.thread_type = "AUTO"
        rate = stream.average_rate or stream.guessed_rate
        src_fps = float(rate) if rate else 0.0
        n = stream.frames
        if not n and stream.duration and stream.time_base and src_fps:
            n = int(round(float(stream.duration * stream.time_base) * src_fps))
        w, h = stream.codec_context.width, stream.codec_context.height
        if src_fps <= 0 or n <= 0 or w <= 0 or h <= 0:
            raise BadSample("undecodable", f"no usable stream info (fps={src_fps}, frames={n}, {w}x{h})")
        info = VideoInfo(w, h, n, src_fps)
        bucket = choose(info)
        if bucket is None:
            raise BadSample("no_bucket", f"{w}x{h}, {n} frames at {src_fps:.2f} fps fits no bucket")
        if indices is not None:
            wanted = list(indices)
        elif bucket.is_image:
            wanted = [int(rng.integers(0, n))]
        else:
            wanted = frame_indices(info, bucket.frames, fps, rng)
        sw, sh = cover_size(w, h, bucket)
        slots: dict[int, list[int]] = {}  # source frame → positions in the output clip
        for k, i in enumerate(wanted):
            slots.setdefault(i, []).append(k)
        clip = np.empty((3, len(wanted), bucket.height, bucket.width), np.uint8)  # 3×F×H×W
        last, got = max(wanted), 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in slots:
                    _to_planar(frame, sw, sh, bucket, clip[:, slots[i][0]])
                    for k in slots[i][1:]:
                        clip[:, k] = clip[:, slots[i][0]]
                    got += 1
                if i >= last:
                    break
        except Exception as exc:
            raise BadSample("undecodable", f"decode failed after {got} frames: "
                            f"{type(exc).__name__}") from None
        if got < len(slots):
            raise BadSample("undecodable", f"clip ended before frame {last} ({got} of "
                            f"{len(slots)} sampled frames decoded)")
    finally:
        container.close()
    return clip, bucket, wanted


def decode_image(data: bytes, choose: Callable[[VideoInfo], Optional[Bucket]]) -> tuple[np.ndarray, Bucket]:
    """Decode a jpg/png/webp → (uint8 3×1×H×W, bucket)."""
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img = img.convert("RGB")
    except Exception as exc:
        raise BadSample("undecodable", f"image: {type(exc).__name__}") from None
    bucket = choose(VideoInfo(img.width, img.height, 1, 1.0))
    if bucket is None:
        raise BadSample("no_bucket", f"image {img.width}x{img.height} fits no image bucket")
    img = img.resize(cover_size(img.width, img.height, bucket), Image.BILINEAR)
    arr = centre_crop(np.asarray(img), bucket)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)[:, None]), bucket
