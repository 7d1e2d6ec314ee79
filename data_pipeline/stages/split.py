"""Shot split: cut frames of a video, from PySceneDetect (content / adaptive) or TransNetV2.

``content_fast`` computes PySceneDetect's content score (mean absolute HSV change between
consecutive frames) and its ``SUPPRESS`` minimum-scene-length rule with a few OpenCV calls per
frame instead of going through PySceneDetect's per-frame objects: same cuts, a fraction of the CPU.

The detectors are fed frames we decode ourselves (small RGB copies), so one decode of a video
feeds detection, the cheap filters and the clip encoder whatever the detector. The content and
adaptive detectors report a cut a fixed number of frames after it happens (:attr:`ShotDetector.lag`:
0 and ``window_width``), which is what lets :class:`WindowPlanner` cut clips while decoding.
"""

from __future__ import annotations

import bisect
from typing import Iterable, Optional

import numpy as np


class ShotDetector:
    """Streaming cut detection: call :meth:`push` per frame, then :meth:`finish` for the cuts."""

    def __init__(self, kind: str = "content", *, threshold: float = 27.0, adaptive_threshold: float = 3.0,
                 min_scene_frames: int = 8, transnet_threshold: float = 0.5, fps: float = 25.0):
        self.kind = kind
        self.fps = float(fps)
        # Frames between a cut and the push() that reports it; None = only finish() knows the cuts.
        self.lag: "int | None" = 0 if kind == "none" else None
        self.cuts: list[int] = []
        self.n = 0
        self._frames: list[np.ndarray] = []
        if kind == "content":
            from scenedetect.detectors import ContentDetector

            # SUPPRESS reports a cut on the frame it happens (MERGE may hold it back for many
            # frames); both drop cuts closer than `min_scene_frames` to the previous one.
            try:
                from scenedetect.detector import FlashFilter

                self._det = ContentDetector(threshold=threshold, min_scene_len=min_scene_frames,
                                            filter_mode=FlashFilter.Mode.SUPPRESS)
                self.lag = 0
            except (ImportError, TypeError, AttributeError):  # older PySceneDetect: lag unknown
                self._det = ContentDetector(threshold=threshold, min_scene_len=min_scene_frames)
        elif kind == "content_fast":
            self._det = FastContentDetector(threshold, min_scene_frames)
            self.lag = 0
        elif kind == "adaptive":
            from scenedetect.detectors import AdaptiveDetector

            self._det = AdaptiveDetector(adaptive_threshold=adaptive_threshold, min_scene_len=min_scene_frames)
            self.lag = int(getattr(self._det, "window_width", 2))
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

    def push(self, rgb: np.ndarray) -> list[int]:
        """Feed the next frame (RGB); returns the cuts reported by this frame (maybe none)."""
        if self.kind in ("content", "adaptive", "content_fast"):
            return self.push_bgr(np.ascontiguousarray(rgb[:, :, ::-1]))
        return self._push(rgb, None)

    def push_bgr(self, bgr: np.ndarray) -> list[int]:
        """:meth:`push` for a BGR frame (what PySceneDetect works on)."""
        if self.kind == "transnetv2":
            return self._push(np.ascontiguousarray(bgr[:, :, ::-1]), None)
        if self.kind == "content_fast":
            new = self._det.push(bgr, self.n)
            self.cuts.extend(new)
            self.n += 1
            return new
        return self._push(None, bgr)

    def _push(self, rgb, bgr) -> list[int]:
        new: list[int] = []
        if self.kind in ("content", "adaptive"):
            new = [c for c in _as_frame_numbers(self._det.process_frame(self._timecode(self.n), bgr)) if c > 0]
            self.cuts.extend(new)
        elif self.kind == "transnetv2":
            import cv2

            self._frames.append(cv2.resize(rgb, (48, 27), interpolation=cv2.INTER_AREA))
        self.n += 1
        return new

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


class FastContentDetector:
    """PySceneDetect's ``ContentDetector`` (default weights: hue, saturation and value, no edges)
    with its ``FlashFilter`` in ``SUPPRESS`` mode, computed with OpenCV on the same BGR frames.

    The score is the mean absolute difference of each HSV channel between a frame and the one
    before, averaged over the three channels, in the same floating-point order as PySceneDetect;
    frame ``n`` is a cut when its score is at least ``threshold`` and it is at least
    ``min_scene_len`` frames after the previous cut (or frame 0).
    """

    def __init__(self, threshold: float, min_scene_len: int):
        self.threshold = float(threshold)
        self.min_scene_len = int(min_scene_len)
        self._prev = None
        self._last_above = None
        self.score_last = 0.0

    def score(self, hsv: np.ndarray) -> float:
        prev, self._prev = self._prev, hsv
        if prev is None:
            return 0.0
        import cv2

        h, s, v, _ = cv2.sumElems(cv2.absdiff(hsv, prev))  # exact integer sums
        n = float(hsv.shape[0] * hsv.shape[1])
        return (0 + (h / n) * 1.0 + (s / n) * 1.0 + (v / n) * 1.0 + 0.0 * 0.0) / 3.0

    def push(self, bgr: np.ndarray, n: int) -> list[int]:
        import cv2

        self.score_last = self.score(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV))
        above = self.score_last >= self.threshold
        if self._last_above is None:
            self._last_above = n
        if self.min_scene_len <= 0:
            return [n] if above else []
        if above and n - self._last_above >= self.min_scene_len:
            self._last_above = n
            return [n] if n > 0 else []
        return []


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


class LateCut(Exception):
    """A cut arrived after frames it should have excluded were already planned."""


class WindowPlanner:
    """Streaming clip windows: feed frame indices in order with :meth:`step`, cuts with :meth:`add_cuts`.

    ``margin`` seconds are trimmed on each side of a cut (not at the start and end of the video);
    windows are cut greedily: a window closes when it reaches ``max_duration`` and the next one
    starts on the following frame. A shot whose usable frames are fewer than ``min_duration``
    is dropped (``shot_too_short``), and so is the last, shorter piece of a long shot
    (``tail_too_short``). Before ``step(j)`` every cut at or before ``j + margin`` must be known
    (the caller keeps that many frames of lookahead plus the detector's lag); otherwise
    :class:`LateCut` is raised.

    Cuts passed as ``exact`` (stream-copy mode: the source has an IDR keyframe on that very frame,
    so the encoder's scene-cut decision agrees with the detector's) are not trimmed: the shot
    before ends on the frame before the cut and the next one starts on it, so a clip window can
    start on the keyframe and be copied without re-encoding.

    ``keyframes`` (stream-copy mode: the IDR frames of the source, known before decoding) move the
    greedy split of long shots onto keyframes, so that the next window can be copied: a window
    closes early on an IDR frame ``j`` (at least ``min_duration`` after its start) when it did not
    start on one, or when no later IDR frame falls within its ``max_duration`` (and the video is
    longer than that). Everything depends only on the frame indices, so the streaming and the
    offline plan agree.

    Events returned by :meth:`step` / :meth:`end`: ``("open", j)`` a window starts at frame j;
    ``("frame", j)`` frame j belongs to the open window; ``("close", s, e)`` the window
    ``[s, e)`` is complete; ``("drop", s, e, reason)`` the open window (if any) is abandoned and
    ``[s, e)`` is reported as dropped.
    """

    def __init__(self, fps: float, *, min_duration: float, max_duration: float, margin: float,
                 keyframes: Iterable[int] = (), num_frames: Optional[int] = None):
        self.keyframes = sorted(set(int(k) for k in keyframes))
        self._kset = set(self.keyframes)
        self.num_frames = num_frames
        self.m = int(round(margin * fps))
        self.min_frames = max(1, int(np.ceil(min_duration * fps - 1e-6)))
        self.max_frames = max(1, int(np.floor(max_duration * fps + 1e-6)))
        self.cuts: list[int] = []
        self.exact: set[int] = set()  # cuts trimmed by 0 frames instead of `m`
        self._ci = 0           # index in self.cuts of the next cut after the current shot's start
        self._last = -1        # last frame stepped
        self.shot_b = 0
        self.shot_windows = 0  # windows kept in the current shot
        self.cur: "list[int] | None" = None

    def add_cuts(self, cuts: Iterable[int], exact: Iterable[int] = ()) -> None:
        exact = set(exact)
        for c in sorted(set(int(c) for c in cuts)):
            if c <= 0 or (self.cuts and c <= self.cuts[-1]) or c <= self.shot_b:
                continue  # already known (finish() repeats them)
            if max(0, c - (0 if c in exact else self.m)) <= self._last:  # a planned frame was in its margin
                raise LateCut(f"cut at frame {c} reported after frame {self._last} was planned")
            self.cuts.append(c)
            if c in exact:
                self.exact.add(c)

    def _margin(self, cut: int) -> int:
        return 0 if cut in self.exact else self.m

    def step(self, j: int) -> list[tuple]:
        self._last = j
        ev: list[tuple] = []
        if self._ci < len(self.cuts) and self.cuts[self._ci] == j:
            ev += self._end_shot(j)
            self.shot_b, self.shot_windows = j, 0
            self._ci += 1
        nxt = self.cuts[self._ci] if self._ci < len(self.cuts) else None
        usable = ((self.shot_b == 0 or j >= self.shot_b + self._margin(self.shot_b))
                  and (nxt is None or j < nxt - self._margin(nxt)))
        if usable:
            if self.cur is not None and j in self._kset and self._split_at_keyframe(j):
                ev.append(("close", self.cur[0], j))
                self.shot_windows += 1
                self.cur = None
            if self.cur is None:
                self.cur = [j, j]
                ev.append(("open", j))
            self.cur[1] = j + 1
            ev.append(("frame", j))
            if self.cur[1] - self.cur[0] >= self.max_frames:
                ev.append(("close", self.cur[0], self.cur[1]))
                self.shot_windows += 1
                self.cur = None
        return ev

    def _split_at_keyframe(self, j: int) -> bool:
        s = self.cur[0]
        if j - s < self.min_frames:
            return False
        if s not in self._kset:
            return True  # this window is encoded anyway; the next one starts on a keyframe
        reach = s + self.max_frames
        if self.num_frames is not None and reach >= self.num_frames:
            return False  # the video ends within this window's reach
        i = bisect.bisect_right(self.keyframes, j)
        return i == len(self.keyframes) or self.keyframes[i] > reach

    def end(self, num_frames: int) -> list[tuple]:
        return self._end_shot(num_frames)

    def _end_shot(self, c: int) -> list[tuple]:
        cur, self.cur = self.cur, None
        if cur is not None and cur[1] - cur[0] >= self.min_frames:
            self.shot_windows += 1
            return [("close", cur[0], cur[1])]
        if self.shot_windows == 0:
            return [("drop", self.shot_b, c, "shot_too_short")]
        if cur is not None:
            return [("drop", cur[0], cur[1], "tail_too_short")]
        return []


def plan_windows(num_frames: int, cuts: list[int], fps: float, *, min_duration: float,
                 max_duration: float, margin: float,
                 exact_cuts: Iterable[int] = (),
                 keyframes: Iterable[int] = ()) -> tuple[list[tuple[int, int]], list[tuple[int, int, str]]]:
    """Clip windows ``[start, end)`` in frames, and the dropped spans ``(start, end, reason)``.

    The offline form of :class:`WindowPlanner` (same windows as the streaming pass).
    """
    wp = WindowPlanner(fps, min_duration=min_duration, max_duration=max_duration, margin=margin,
                       keyframes=keyframes, num_frames=num_frames)
    wp.add_cuts(cuts, exact=exact_cuts)
    windows, dropped = [], []
    events = [e for j in range(num_frames) for e in wp.step(j)] + wp.end(num_frames)
    for ev in events:
        if ev[0] == "close":
            windows.append((ev[1], ev[2]))
        elif ev[0] == "drop":
            dropped.append((ev[1], ev[2], ev[3]))
    return windows, dropped
