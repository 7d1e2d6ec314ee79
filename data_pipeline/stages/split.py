"""Shot split: cut frames of a video, from PySceneDetect (content / adaptive) or TransNetV2.

The detectors are fed frames we decode ourselves (RGB at analysis size), so a video is decoded
once for detection whatever the detector.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


class ShotDetector:
    """Streaming cut detection: call :meth:`push` per frame, then :meth:`finish` for the cuts."""

    def __init__(self, kind: str = "content", *, threshold: float = 27.0, adaptive_threshold: float = 3.0,
                 min_scene_frames: int = 8, transnet_threshold: float = 0.5, fps: float = 25.0):
        self.kind = kind
        self.fps = float(fps)
        self.cuts: list[int] = []
        self.n = 0
        self._frames: list[np.ndarray] = []
        if kind == "content":
            from scenedetect.detectors import ContentDetector

            self._det = ContentDetector(threshold=threshold, min_scene_len=min_scene_frames)
        elif kind == "adaptive":
            from scenedetect.detectors import AdaptiveDetector

            self._det = AdaptiveDetector(adaptive_threshold=adaptive_threshold, min_scene_len=min_scene_frames)
        elif kind == "transnetv2":
            try:
                import transnetv2  # noqa: F401
            except ImportError:
                raise RuntimeError("split.detector='transnetv2' needs the `transnetv2` package; install "
                                   "it or use split.detector=content") from None
            self._det = None
        elif kind == "none":
            self._det = None
        else:
            raise ValueError(f"unknown shot detector {kind!r}")
        self._threshold = transnet_threshold
        self._min = min_scene_frames

    def push(self, rgb: np.ndarray) -> None:
        if self.kind in ("content", "adaptive"):
            bgr = np.ascontiguousarray(rgb[:, :, ::-1])
            self.cuts.extend(_as_frame_numbers(self._det.process_frame(self._timecode(self.n), bgr)))
        elif self.kind == "transnetv2":
            import cv2

            self._frames.append(cv2.resize(rgb, (48, 27), interpolation=cv2.INTER_AREA))
        self.n += 1

    def _timecode(self, n: int):
        try:
            from scenedetect import FrameTimecode
        except ImportError:  # PySceneDetect < 0.6 took frame numbers
            return n
        return FrameTimecode(n, fps=self.fps)

    def finish(self) -> list[int]:
        """Frame indices where a new shot starts (never 0), sorted and unique."""
        if self.kind in ("content", "adaptive") and hasattr(self._det, "post_process"):
            self.cuts.extend(_as_frame_numbers(self._det.post_process(self._timecode(self.n))))
        elif self.kind == "transnetv2" and self._frames:
            self.cuts.extend(_transnet_cuts(np.stack(self._frames), self._threshold, self._min))
        return sorted({c for c in self.cuts if 0 < c < self.n})


def _as_frame_numbers(items: Iterable) -> list[int]:
    out = []
    for it in items or []:
        if hasattr(it, "frame_num"):
            out.append(int(it.frame_num))
        elif hasattr(it, "get_frames"):
            out.append(int(it.get_frames()))
        else:
            out.append(int(it))
    return out


def _transnet_cuts(frames: np.ndarray, threshold: float, min_frames: int) -> list[int]:
    from transnetv2 import TransNetV2  # optional dependency

    model = TransNetV2()
    single, _ = model.predict_frames(frames)
    probs = np.asarray(single).reshape(-1)
    cuts, last = [], 0
    for i in range(1, len(probs)):
        if probs[i] > threshold and probs[i - 1] <= threshold and i - last >= min_frames:
            cuts.append(i)
            last = i
    return cuts


def plan_windows(num_frames: int, cuts: list[int], fps: float, *, min_duration: float,
                 max_duration: float, margin: float) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Clip windows ``[start, end)`` in frames, and the shots dropped as too short.

    Shots are cut at ``cuts``; ``margin`` seconds are trimmed on each side of a cut (not at the
    start and end of the video); a shot shorter than ``min_duration`` after trimming is dropped; a
    longer one than ``max_duration`` is split into equal windows of at most ``max_duration``.
    """
    bounds = [0, *cuts, num_frames]
    m = int(round(margin * fps))
    windows, dropped = [], []
    for i in range(len(bounds) - 1):
        s, e = bounds[i], bounds[i + 1]
        if i > 0:
            s += m
        if i < len(bounds) - 2:
            e -= m
        if e - s < max(1, int(np.ceil(min_duration * fps - 1e-6))):
            dropped.append((bounds[i], bounds[i + 1]))
            continue
        n = int(np.ceil((e - s) / (max_duration * fps) - 1e-9))
        edges = [s + round(k * (e - s) / n) for k in range(n + 1)]
        windows.extend((edges[k], edges[k + 1]) for k in range(n))
    return windows, dropped
