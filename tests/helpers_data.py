"""Tiny shards in the curation contract's format, for tests and benchmarks (PyAV + webdataset)."""

from __future__ import annotations

import io
import json
import os
import zlib
from typing import Optional

import numpy as np


def make_clip(width: int, height: int, frames: int, fps: int = 24, pattern: str = "level",
              crf: int = 23) -> bytes:
    """An H.264 mp4. ``level``: frame i is flat grey 8·i mod 256 (its index can be read back from
    the decoded pixels); anything else: a smooth moving texture, varied by the name (a realistic
    bitrate for benchmarks)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.options = {"crf": str(crf), "preset": "veryfast"}
        yy, xx = np.mgrid[0:height, 0:width]
        xx = xx + zlib.crc32(pattern.encode()) % 97  # different patterns, different textures
        for i in range(frames):
            if pattern == "level":
                img = np.full((height, width, 3), (8 * i) % 256, np.uint8)
            else:
                v = 127 + 60 * np.sin((xx + 3 * i) / 9.0) + 60 * np.cos((yy - 2 * i) / 13.0)
                img = np.stack([v, np.roll(v, i, 1), 255 - v], -1).clip(0, 255).astype(np.uint8)
            for pkt in st.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(pkt)
        for pkt in st.encode():
            out.mux(pkt)
    return buf.getvalue()


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def sample(key: str, width: int, height: int, frames: int, fps: int = 24, caption: Optional[str] = None,
           clip: Optional[bytes] = None, **extra) -> dict:
    """One sample dict for ``webdataset.TarWriter`` (mp4 + json + txt, plus ``extra`` members)."""
    s = {"__key__": key, "mp4": clip if clip is not None else make_clip(width, height, frames, fps),
         "json": json.dumps({"source_uri": f"synthetic://{key}", "fps": fps, "width": width,
                             "height": height, "num_frames": frames}).encode(),
         "txt": (caption if caption is not None else f"caption of {key}").encode()}
    s.update(extra)
    return s


def write_shard(path: str, samples: list[dict]) -> str:
    import webdataset as wds

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with wds.TarWriter(path) as w:
        for s in samples:
            w.write(s)
    return path
