"""Per-video CPU work: probe → shot split → clip windows → cheap filters → H.264 clips.

:func:`process_video` is the unit of work a Ray task runs for one input. It decodes the video
twice: once for shot detection (on strided ~128 px copies of each frame), then once sequentially
while cutting, scoring (blur, motion, perceptual hash and sampled frames for the model stages, at
``split.analysis_size``) and encoding every window. It returns an :class:`InputResult`; nothing
here knows about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

import av
import cv2
import numpy as np

from ..video import even_size, pick_h264_encoder
from . import filters
from .probe import ProbeResult, Rejected, probe
from .split import ShotDetector, plan_windows


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


def detection_frame(frame, fallback_size: tuple[int, int]) -> np.ndarray:
    """A small RGB frame for shot detection, by striding the planes of a yuv420p frame.

    Hard cuts survive subsampling; skipping the scaler makes detection nearly free next to the
    decode itself. Other pixel formats go through the scaler.
    """
    w, h = frame.width, frame.height
    k = max(1, max(w, h) // DETECT_SIZE)
    if frame.format.name not in ("yuv420p", "yuvj420p") or k < 2:
        return frame.to_ndarray(width=fallback_size[0], height=fallback_size[1], format="rgb24")
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
    return cv2.cvtColor(np.dstack([y, u, v]), cv2.COLOR_YUV2RGB)


def _iter_frames(path: str):
    """Decoded frames in order; the position in this sequence is the frame index."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            yield frame


def _cut_and_score(path: str, pr: ProbeResult, item, cfg, res: InputResult) -> None:
    fps = pr.fps
    a_size = analysis_size(pr.width, pr.height, cfg.split.analysis_size)
    sp = cfg.split

    # Pass 1: shot boundaries.
    det = ShotDetector(sp.detector, threshold=sp.threshold, adaptive_threshold=sp.adaptive_threshold,
                       min_scene_frames=sp.min_scene_frames, transnet_threshold=sp.transnet_threshold,
                       fps=fps)
    n = 0
    for frame in _iter_frames(path):
        det.push(detection_frame(frame, a_size))
        n += 1
    if n == 0:
        raise Rejected("zero_duration", "no decodable frames")
    cuts = det.finish()
    cc = cfg.clip
    windows, dropped = plan_windows(n, cuts, fps, min_duration=cc.min_duration,
                                    max_duration=cc.max_duration, margin=cc.margin)
    res.entered["split"] = 1
    res.entered["clip"] = len(windows) + len(dropped)
    for s, e in dropped:
        res.reject("clip", Rejected("shot_too_short", f"{(e - s) / fps:.2f}s < {cc.min_duration}s"),
                   start=s / fps, end=e / fps)
    if not windows:
        return

    # Rules are known before decoding.
    f = cfg.filters
    plans = []
    res.entered["filter"] = len(windows)
    for idx, (s, e) in enumerate(windows):
        try:
            filters.rules((e - s) / fps, pr.width, pr.height, fps, f)
        except Rejected as err:
            res.reject("filter", err, clip=idx, start=s / fps, end=e / fps)
            continue
        plans.append(_WindowWork(idx, s, e, fps, cfg, pr, item))
    if not plans:
        return

    # Pass 2: one sequential decode feeds every window in turn.
    out_size = even_size(pr.width, pr.height, cc.max_size)
    codec = pick_h264_encoder(cc.codec)
    it = iter(plans)
    cur = next(it, None)
    for i, frame in enumerate(_iter_frames(path)):
        while cur is not None and i >= cur.end:
            cur.finish(res)
            cur = next(it, None)
        if cur is None:
            break
        if i >= cur.start:
            cur.add(i, frame, a_size, out_size, codec)
    while cur is not None:
        cur.finish(res)
        cur = next(it, None)


class _WindowWork:
    """One clip window being decoded: encoder, sampled frames, scores."""

    def __init__(self, idx: int, start: int, end: int, fps: float, cfg, pr: ProbeResult, item):
        self.idx, self.start, self.end, self.fps = idx, start, end, fps
        self.cfg, self.pr, self.item = cfg, pr, item
        f = cfg.filters
        n = end - start
        k = f.frames_per_clip
        self.sample_at = {start + min(n - 1, int((j + 0.5) * n / k)) for j in range(k)}
        m = f.motion_frames
        self.pair_at = {start + min(n - 2, int((j + 0.5) * (n - 1) / m)) for j in range(m)} if n >= 2 else set()
        self.gray: dict[int, np.ndarray] = {}
        self.rgb: dict[int, np.ndarray] = {}
        self.encoder = None
        self.out_frames = 0
        self.out_rate = (Fraction(cfg.clip.fps).limit_denominator(1001) if cfg.clip.fps
                         else Fraction(pr.fps_num, pr.fps_den))

    # -- streaming
    def add(self, i: int, frame, a_size, out_size, codec) -> None:
        need_gray = i in self.sample_at or i in self.pair_at or (i - 1) in self.pair_at
        if need_gray or i in self.sample_at:
            rgb = frame.to_ndarray(width=a_size[0], height=a_size[1], format="rgb24", interpolation="AREA")
            self.gray[i] = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
            if i in self.sample_at:
                self.rgb[i] = rgb
        if self.encoder is None:
            self.encoder = _ClipEncoder(codec, self.out_rate, out_size, self.cfg.clip)
        # Frame-rate conversion by nearest frame: emit output frames whose time falls in this frame.
        t_rel = (i - self.start + 1) / self.fps
        while self.out_frames / float(self.out_rate) < t_rel - 1e-9:
            self.encoder.add(frame)
            self.out_frames += 1

    def finish(self, res: InputResult) -> None:
        f, cfg = self.cfg.filters, self.cfg
        s_sec, e_sec = self.start / self.fps, self.end / self.fps
        scores: dict[str, float] = {}
        try:
            if not self.gray:
                raise Rejected("decode_error", "no frames decoded in the window")
            sampled = [self.gray[i] for i in sorted(self.sample_at) if i in self.gray]
            scores["sharpness"] = round(filters.sharpness(sampled), 4)
            if f.blur:
                filters.check("blur", scores["sharpness"], f.min_sharpness)
            pairs = [(self.gray[i], self.gray[i + 1]) for i in sorted(self.pair_at)
                     if i in self.gray and i + 1 in self.gray]
            scores["motion"] = round(filters.motion(pairs, 1.0 / self.fps), 6)
            if f.motion:
                filters.check("motion", scores["motion"], f.min_motion, f.max_motion)
        except Rejected as err:
            if self.encoder is not None:
                self.encoder.abort()
            res.reject("filter", err, clip=self.idx, start=s_sec, end=e_sec)
            return
        mp4 = self.encoder.close()
        out_w, out_h = self.encoder.size
        frames_jpeg = [cv2.imencode(".jpg", cv2.cvtColor(self.rgb[i], cv2.COLOR_RGB2BGR),
                                    [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
                       for i in sorted(self.rgb)]
        hashes = [h for i in sorted(self.rgb) for h in filters.phash_rgb(self.rgb[i])]
        meta = {
            "source_uri": self.item.uri, "source_id": self.item.source_id, "clip": self.idx,
            "start": round(s_sec, 4), "end": round(e_sec, 4),
            "fps": round(float(self.out_rate), 6), "width": out_w, "height": out_h,
            "num_frames": self.out_frames,
            "source": {"width": self.pr.width, "height": self.pr.height, "fps": round(self.pr.fps, 6),
                       "codec": self.pr.codec, "has_audio": self.pr.has_audio,
                       "duration": round(self.pr.duration, 4)},
            "scores": scores,
            "camera_motion": describe_motion(scores["motion"]),
        }
        res.clips.append(Clip(clip=self.idx, start=s_sec, end=e_sec, meta=meta, mp4=mp4,
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
            vf.pict_type = 0  # AV_PICTURE_TYPE_NONE: let x264 choose frame types, not the source's
        else:
            vf = frame.reformat(width=self.size[0], height=self.size[1], format="yuv420p")
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

