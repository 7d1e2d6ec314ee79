"""Per-video CPU work: probe → shot split → clip windows → cheap filters → H.264 clips.

:func:`process_video` is the unit of work a Ray task runs for one input. It decodes the video
once: each frame goes to the shot detector (a strided ~128 px copy), then, a few frames later
(``clip.margin`` plus the detector's lag, so that the cuts around it are known), to the window
planner, the cheap filters (blur, motion, perceptual hash and sampled frames for the model
stages, at ``split.analysis_size``) and the clip encoder. It returns an :class:`InputResult`; nothing
here knows about Ray.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import av
import cv2
from av.video.reformatter import VideoReformatter
import numpy as np

from ..video import even_size, pick_h264_encoder
from . import filters
from .probe import ProbeResult, Rejected, probe
from .split import LateCut, ShotDetector, WindowPlanner


@dataclass
class Clip:
    clip: int                  # index of the window in the video (stable: sample key suffix)
    start: float               # seconds in the source
    end: float
    meta: dict[str, Any]       # goes into the sample's json
    mp4: bytes = b""
    frames: list[bytes] = field(default_factory=list)  # JPEG, analysis size, for model stages
    phash: list[int] = field(default_factory=list)
    caption: Optional[str] = None
    caption_source: Optional[str] = None
    extra: dict[str, bytes] = field(default_factory=dict)  # more shard members, e.g. latent.npy


@dataclass
class InputResult:
    source_id: str
    uri: str
    probe: Optional[dict] = None
    clips: list[Clip] = field(default_factory=list)
    rejections: list[dict] = field(default_factory=list)
    # stage → number of clips that entered it (for stats): filled as the stages run
    entered: dict[str, int] = field(default_factory=dict)

    def reject(self, stage: str, err: Rejected, clip: Optional[int] = None,
               start: Optional[float] = None, end: Optional[float] = None) -> None:
        rec = {"source_id": self.source_id, "uri": self.uri, "clip": clip, "stage": stage,
               "reason": err.reason, "detail": err.detail}
        if err.score is not None:
            rec["score"] = round(float(err.score), 6)
        if start is not None:
            rec["start"], rec["end"] = round(start, 4), round(end, 4)
        self.rejections.append(rec)


def analysis_size(width: int, height: int, long_side: int) -> tuple[int, int]:
    return even_size(width, height, long_side)


def process_video(local_path: str, item, cfg) -> InputResult:
    """Everything CPU-bound for one input (``item`` is a SourceItem, ``cfg`` a CurateConfig)."""
    res = InputResult(source_id=item.source_id, uri=item.uri)
    try:
        pr = probe(local_path, max_width=cfg.probe.max_width, max_height=cfg.probe.max_height,
                   max_duration=cfg.probe.max_duration)
    except Rejected as err:
        res.reject("probe", err)
        return res
    res.probe = pr.to_dict()
    try:
        _cut_and_score(local_path, pr, item, cfg, res)
    except Rejected as err:
        res.clips.clear()
        res.reject("decode", err)
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        res.clips.clear()
        res.reject("decode", Rejected("decode_error", f"{type(exc).__name__}: {exc}"))
    return res


DETECT_SIZE = 128  # long side (px) of the frames the shot detector sees


def detection_frame(frame, fallback_size: tuple[int, int], bgr: bool = False) -> np.ndarray:
    """A small RGB frame for shot detection, by striding the planes of a yuv420p frame.

    Hard cuts survive subsampling; skipping the scaler makes detection nearly free next to the
    decode itself. Other pixel formats go through the scaler.
    """
    w, h = frame.width, frame.height
    k = max(1, max(w, h) // DETECT_SIZE)
    if frame.format.name not in ("yuv420p", "yuvj420p") or k < 2:
        return frame.to_ndarray(width=fallback_size[0], height=fallback_size[1], format="bgr24" if bgr else "rgb24")
    planes = []
    for idx, step in ((0, k), (1, k // 2), (2, k // 2)):
        p = frame.planes[idx]
        arr = np.frombuffer(p, np.uint8).reshape(p.height, p.line_size)[:, :p.width]
        planes.append(arr[::step, ::step])
    y = planes[0]
    u = planes[1][: y.shape[0], : y.shape[1]]
    v = planes[2][: y.shape[0], : y.shape[1]]
    if u.shape != y.shape or v.shape != y.shape:
        u = cv2.resize(np.ascontiguousarray(planes[1]), (y.shape[1], y.shape[0]), interpolation=cv2.INTER_NEAREST)
        v = cv2.resize(np.ascontiguousarray(planes[2]), (y.shape[1], y.shape[0]), interpolation=cv2.INTER_NEAREST)
    return cv2.cvtColor(np.dstack([y, u, v]), cv2.COLOR_YUV2BGR if bgr else cv2.COLOR_YUV2RGB)


def _iter_frames(path: str):
    """Decoded frames in order; the position in this sequence is the frame index."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame


def _make_detector(cfg, fps: float) -> ShotDetector:
    sp = cfg.split
    return ShotDetector(sp.detector, threshold=sp.threshold, adaptive_threshold=sp.adaptive_threshold,
                        min_scene_frames=sp.min_scene_frames, transnet_threshold=sp.transnet_threshold,
                        fps=fps)


def _detect_all(path: str, cfg, fps: float, a_size) -> tuple[int, list[int]]:
    """A detection-only decode (detectors that only know the cuts at the end, e.g. TransNetV2)."""
    det = _make_detector(cfg, fps)
    n = 0
    for frame in _iter_frames(path):
        det.push(detection_frame(frame, a_size))
        n += 1
    return n, det.finish()


def _cut_and_score(path: str, pr: ProbeResult, item, cfg, res: InputResult) -> None:
    """One decode of the video feeds shot detection, the window planner, the cheap filters and
    the clip encoders (a second, detection-only decode only for detectors without a fixed lag)."""
    fps = pr.fps
    a_size = analysis_size(pr.width, pr.height, cfg.split.analysis_size)
    det = _make_detector(cfg, fps)
    if det.lag is not None:
        try:
            out = _single_pass(path, pr, item, cfg, det=det, cuts=None, a_size=a_size)
        except LateCut:  # a detector reported a cut later than its stated lag: plan from all cuts
            out = None
    else:
        out = None
    if out is None:
        n, cuts = _detect_all(path, cfg, fps, a_size)
        if n == 0:
            raise Rejected("zero_duration", "no decodable frames")
        out = _single_pass(path, pr, item, cfg, det=None, cuts=cuts, a_size=a_size)
    clips, rejections, entered = out
    res.clips.extend(clips)
    res.rejections.extend(rejections)
    res.entered.update(entered)


def _single_pass(path: str, pr: ProbeResult, item, cfg, *, det: Optional[ShotDetector],
                 cuts: Optional[list[int]], a_size) -> tuple[list, list, dict]:
    fps = pr.fps
    cc, f = cfg.clip, cfg.filters
    planner = WindowPlanner(fps, min_duration=cc.min_duration, max_duration=cc.max_duration, margin=cc.margin)
    if cuts is not None:
        planner.add_cuts(cuts)
    lookahead = planner.m + (det.lag if det is not None else 0)
    # Rules that do not depend on the window (resolution, fps, aspect): when they fail, every
    # window is rejected without decoding work beyond shot detection.
    try:
        filters.rules(min(max(cc.max_duration, f.min_duration), f.max_duration), pr.width, pr.height, fps, f)
        source_err = None
    except Rejected as err:
        source_err = err if err.reason != "duration" else None
    out_size = even_size(pr.width, pr.height, cc.max_size)
    codec = pick_h264_encoder(cc.codec) if source_err is None else None
    # A scratch InputResult collects clips and rejections (discarded if the pass is redone).
    res = InputResult(source_id=item.source_id, uri=item.uri)
    state = {"cur": None, "idx": 0, "windows": 0, "dropped": 0}
    scalers = (VideoReformatter(), VideoReformatter())

    def handle(events, frames_by_index):
        for ev in events:
            kind = ev[0]
            if kind == "open":
                state["cur"] = (_WindowWork(ev[1], fps, cfg, pr, item, a_size, out_size, codec,
                                            planner.max_frames, planner.min_frames, scalers)
                                if source_err is None else None)
            elif kind == "frame":
                if state["cur"] is not None:
                    state["cur"].add(ev[1], frames_by_index(ev[1]))
            elif kind == "close":
                s, e = ev[1], ev[2]
                idx = state["idx"]
                state["idx"] += 1
                state["windows"] += 1
                work, state["cur"] = state["cur"], None
                err = source_err
                if err is None:
                    try:
                        filters.rules((e - s) / fps, pr.width, pr.height, fps, f)
                    except Rejected as exc:
                        err = exc
                if err is not None:
                    if work is not None:
                        work.abort()
                    res.reject("filter", err, clip=idx, start=s / fps, end=e / fps)
                else:
                    work.finish(idx, e, res)
            elif kind == "drop":
                s, e, reason = ev[1], ev[2], ev[3]
                if state["cur"] is not None:
                    state["cur"].abort()
                    state["cur"] = None
                state["dropped"] += 1
                what = "shot" if reason == "shot_too_short" else "last piece of a split shot"
                res.reject("clip", Rejected(reason, f"{what}: {(e - s) / fps:.2f}s < {cc.min_duration}s"),
                           start=s / fps, end=e / fps)

    buf: deque = deque()
    n = 0
    for frame in _iter_frames(path):
        if det is not None:
            planner.add_cuts(det.push_bgr(detection_frame(frame, a_size, bgr=True)))
        buf.append((n, frame))
        n += 1
        while buf and buf[0][0] <= n - 1 - lookahead:
            j, fr = buf.popleft()
            handle(planner.step(j), lambda _j, fr=fr: fr)
    if n == 0:
        raise Rejected("zero_duration", "no decodable frames")
    if det is not None:
        planner.add_cuts(det.finish())
    while buf:
        j, fr = buf.popleft()
        handle(planner.step(j), lambda _j, fr=fr: fr)
    handle(planner.end(n), None)
    entered = {"split": 1, "clip": state["windows"] + state["dropped"]}
    if state["windows"]:
        entered["filter"] = state["windows"]
    return res.clips, res.rejections, entered


class _WindowWork:
    """One clip window being decoded: encoder, analysis frames, scores.

    The window's length is only known when it closes, so analysis frames are kept on a grid:
    every ``g``-th frame from the start (and the frame after every other one, for optical-flow pairs), with
    ``g = max_frames // 24`` (every frame for short windows); the sampled frames are then the grid
    frames nearest to evenly spread positions. Frames are held (scaled to the clip size) until
    the window is known to be at least ``min_frames`` long, so dropped shots are never encoded.
    """

    def __init__(self, start: int, fps: float, cfg, pr: ProbeResult, item, a_size, out_size, codec,
                 max_frames: int, min_frames: int, scalers):
        self.start, self.fps = start, fps
        self.scalers = scalers  # (clip size, analysis size): reused swscale contexts
        self.cfg, self.pr, self.item = cfg, pr, item
        self.a_size, self.out_size, self.codec = a_size, out_size, codec
        self.min_frames = min_frames
        self.g = max(1, max_frames // 24)
        self.small: dict[int, Any] = {}   # frame index → analysis-size yuv420p VideoFrame
        self.n = 0
        self.encoder = None
        self.pending: list = []           # (VideoFrame at clip size, repeats) before min_frames
        self.out_frames = 0
        self.out_rate = (Fraction(cfg.clip.fps).limit_denominator(1001) if cfg.clip.fps
                         else Fraction(pr.fps_num, pr.fps_den))
        self.interp = cfg.clip.scaler.upper()

    # -- streaming
    def add(self, i: int, frame) -> None:
        off = i - self.start
        self.n += 1
        # Frame-rate conversion by nearest frame: emit output frames whose time falls in this frame.
        t_rel = (off + 1) / self.fps
        reps = 0
        while (self.out_frames + reps) / float(self.out_rate) < t_rel - 1e-9:
            reps += 1
        vf = None
        if reps:
            if (frame.width, frame.height) == self.out_size and frame.format.name == "yuv420p":
                vf = frame
            else:
                vf = self.scalers[0].reformat(frame, width=self.out_size[0], height=self.out_size[1],
                                              format="yuv420p", interpolation=self.interp)
        if self.g == 1 or off % self.g == 0 or off % (2 * self.g) == 1:
            # analysis copy: from the (smaller) clip-size frame when there is one
            src = vf if vf is not None and vf.width >= self.a_size[0] else frame
            self.small[i] = self.scalers[1].reformat(src, width=self.a_size[0], height=self.a_size[1],
                                                     format="yuv420p", interpolation="AREA")
        if reps == 0:
            return
        self.out_frames += reps
        if self.encoder is None and self.n < self.min_frames:
            self.pending.append((vf, reps))
            return
        self._encode_pending()
        for _ in range(reps):
            self.encoder.add(vf)

    def _encode_pending(self) -> None:
        if self.encoder is None:
            self.encoder = _ClipEncoder(self.codec, self.out_rate, self.out_size, self.cfg.clip)
        for vf, reps in self.pending:
            for _ in range(reps):
                self.encoder.add(vf)
        self.pending.clear()

    def abort(self) -> None:
        self.pending.clear()
        self.small.clear()
        if self.encoder is not None:
            self.encoder.abort()

    def _pick(self, ideal: list[int], candidates: list[int]) -> list[int]:
        return sorted({min(candidates, key=lambda c: (abs(c - p), c)) for p in ideal}) if candidates else []

    def finish(self, idx: int, end: int, res: InputResult) -> None:
        f, cfg = self.cfg.filters, self.cfg
        start = self.start
        s_sec, e_sec = start / self.fps, end / self.fps
        n = end - start
        k, m = f.frames_per_clip, f.motion_frames
        grid = [i for i in sorted(self.small) if (i - start) % self.g == 0]
        sample_at = self._pick([start + min(n - 1, int((j + 0.5) * n / k)) for j in range(k)], grid)
        pair_grid = [i for i in grid if i + 1 in self.small]
        pair_at = (self._pick([start + min(n - 2, int((j + 0.5) * (n - 1) / m)) for j in range(m)], pair_grid)
                   if n >= 2 else [])
        rgb: dict[int, np.ndarray] = {}
        gray: dict[int, np.ndarray] = {}

        def g_of(i):
            if i not in gray:
                if i not in rgb:
                    rgb[i] = self.small[i].to_ndarray(format="rgb24")
                gray[i] = cv2.cvtColor(rgb[i], cv2.COLOR_RGB2GRAY)
            return gray[i]

        scores: dict[str, float] = {}
        try:
            if not self.small:
                raise Rejected("decode_error", "no frames decoded in the window")
            scores["sharpness"] = round(filters.sharpness([g_of(i) for i in sample_at]), 4)
            if f.blur:
                filters.check("blur", scores["sharpness"], f.min_sharpness)
            pairs = [(g_of(i), g_of(i + 1)) for i in pair_at]
            scores["motion"] = round(filters.motion(pairs, 1.0 / self.fps), 6)
            if f.motion:
                filters.check("motion", scores["motion"], f.min_motion, f.max_motion)
        except Rejected as err:
            self.abort()
            res.reject("filter", err, clip=idx, start=s_sec, end=e_sec)
            return
        self._encode_pending()
        mp4 = self.encoder.close()
        out_w, out_h = self.encoder.size
        frames_jpeg = [cv2.imencode(".jpg", cv2.cvtColor(rgb[i], cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                       for i in sample_at]
        hashes = [h for i in sample_at for h in filters.phash_rgb(rgb[i])]
        self.small.clear()
        meta = {
            "source_uri": self.item.uri, "source_id": self.item.source_id, "clip": idx,
            "start": round(s_sec, 4), "end": round(e_sec, 4),
            "fps": round(float(self.out_rate), 6), "width": out_w, "height": out_h,
            "num_frames": self.out_frames,
            "source": {"width": self.pr.width, "height": self.pr.height, "fps": round(self.pr.fps, 6),
                       "codec": self.pr.codec, "has_audio": self.pr.has_audio,
                       "duration": round(self.pr.duration, 4)},
            "scores": scores,
            "camera_motion": describe_motion(scores["motion"]),
        }
        res.clips.append(Clip(clip=idx, start=s_sec, end=e_sec, meta=meta, mp4=mp4,
                              frames=frames_jpeg, phash=hashes))


def describe_motion(score: float) -> str:
    if score < 0.02:
        return "static"
    if score < 0.3:
        return "slow"
    if score < 1.0:
        return "moderate"
    return "fast"


class _ClipEncoder:
    """Streams frames into an in-memory H.264 mp4 (deterministic bytes for the same frames)."""

    def __init__(self, codec: str, rate: Fraction, size: tuple[int, int], cc):
        import io

        self.buf = io.BytesIO()
        self.size = size
        self.out = av.open(self.buf, mode="w", format="mp4", options={"fflags": "+bitexact"})
        self.stream = self.out.add_stream(codec, rate=rate)
        self.stream.width, self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.codec_context.time_base = Fraction(1) / rate
        if codec == "libx264":
            self.stream.options = {"crf": str(cc.crf), "preset": cc.preset, "threads": "1"}
        else:
            self.stream.bit_rate = cc.bitrate
        self.rate = rate
        self.n = 0

    def add(self, frame) -> None:
        if (frame.width, frame.height) == self.size and frame.format.name == "yuv420p":
            vf = frame
        else:
            vf = frame.reformat(width=self.size[0], height=self.size[1], format="yuv420p")
        vf.pict_type = 0  # AV_PICTURE_TYPE_NONE: let x264 choose frame types, not the source's
        vf.pts = self.n
        vf.time_base = Fraction(1) / self.rate
        for p in self.stream.encode(vf):
            self.out.mux(p)
        self.n += 1

    def close(self) -> bytes:
        for p in self.stream.encode(None):
            self.out.mux(p)
        self.out.close()
        return self.buf.getvalue()

    def abort(self) -> None:
        try:
            self.out.close()
        except Exception:
            pass


def sample_frames_rgb(clip: Clip) -> list[np.ndarray]:
    return [cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            for b in clip.frames]

