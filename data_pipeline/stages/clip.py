"""Per-video CPU work: probe → shot split → clip windows → cheap filters → H.264 clips.

:func:`process_video` is the unit of work a Ray task runs for one input. It decodes the video
once: each frame goes to the shot detector (a strided ~128 px copy), then, a few frames later
(``clip.margin`` plus the detector's lag, so that the cuts around it are known), to the window
planner, the cheap filters (blur, motion, perceptual hash and sampled frames for the model
stages, at ``split.analysis_size``) and the clip encoder. It returns an :class:`InputResult`; nothing
here knows about Ray.

Frames are turned upright (:func:`upright_frames`) right after decoding when the source's display
matrix rotates it, so every stage works on the picture as displayed and clips carry no matrix.

Stream copy (``clip.stream_copy=auto``): when the source is mp4-style H.264 (yuv420p) and the
clips keep its size, orientation and fps, the compressed packets are kept (:class:`_PacketLog`)
and a window that starts on an IDR keyframe is written by copying its packets
(:func:`video.remux_packets`) instead of decoding → scaling → re-encoding; the window's end is moved back (by at most the
B-frame reordering depth) to the last frame where the packets in decode order hold exactly the
window's frames. A window that cannot be copied after all is re-decoded and encoded.
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

from ..video import (Orientation, Uprighter, avcc_nal_length_size, even_size, frame_orientation,
                     is_idr_packet, pick_h264_encoder, remux_packets)
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


def detection_frame(frame, fallback_size: tuple[int, int], bgr: bool = False,
                    reformatter: Optional[VideoReformatter] = None) -> np.ndarray:
    """A small RGB frame for shot detection, by striding the planes of a yuv420p frame.

    Hard cuts survive subsampling; skipping the scaler makes detection nearly free next to the
    decode itself. Other pixel formats (and frames already small) go through the scaler
    (``reformatter``: a reused swscale context).
    """
    w, h = frame.width, frame.height
    k = max(1, max(w, h) // DETECT_SIZE)
    if frame.format.name not in ("yuv420p", "yuvj420p") or k < 2:
        fmt = "bgr24" if bgr else "rgb24"
        if reformatter is None:
            return frame.to_ndarray(width=fallback_size[0], height=fallback_size[1], format=fmt)
        return reformatter.reformat(frame, width=fallback_size[0], height=fallback_size[1], format=fmt).to_ndarray()
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
    yuv = np.empty(y.shape + (3,), np.uint8)
    yuv[..., 0], yuv[..., 1], yuv[..., 2] = y, u, v
    return cv2.cvtColor(yuv, cv2.COLOR_YUV2BGR if bgr else cv2.COLOR_YUV2RGB)


def upright_frames(frames, orientation: Orientation):
    """``frames`` turned upright as the display matrix says; every frame must carry the
    orientation the probe saw (a source that changes it midway is rejected, never half turned)."""
    turn = Uprighter(orientation) if not orientation.upright else None
    for frame in frames:
        got = frame_orientation(frame)
        if got != orientation:
            raise Rejected("decode_error", f"the display orientation changes within the video "
                                           f"({orientation} at the start, {got} later)")
        yield turn(frame) if turn is not None else frame


def _iter_frames(path: str, orientation: Orientation):
    """Decoded upright frames in order; the position in this sequence is the frame index."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        yield from upright_frames(container.decode(stream), orientation)


def _decode(container, stream, log: Optional["_PacketLog"]):
    """Decoded frames in order, handing every compressed packet to ``log`` first (when given)."""
    if log is None:
        yield from container.decode(stream)
        return
    for packet in container.demux(stream):
        if packet.size:
            log.add(packet)
        yield from packet.decode()  # the last, empty packet flushes the decoder


def _scan_idr_frames(path: str, nal_length_size: int) -> Optional[tuple[list[int], int]]:
    """(display indices of the IDR frames, number of frames) from the packets alone (no decoding),
    so that the window planner can split long shots on keyframes; None if packets lack timestamps."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        pts_all, idr_pts = [], []
        for packet in container.demux(stream):
            if not packet.size:
                continue
            if packet.pts is None or packet.dts is None:
                return None  # the packet log will not copy either
            pts_all.append(packet.pts)
            if packet.is_keyframe and is_idr_packet(bytes(packet), nal_length_size):
                idr_pts.append(packet.pts)
    rank = {p: i for i, p in enumerate(sorted(pts_all))}
    return sorted(rank[p] for p in idr_pts), len(pts_all)


class _Packet:
    __slots__ = ("pts", "dts", "duration", "key", "data", "disp", "idr")

    def __init__(self, packet):
        self.pts, self.dts = packet.pts, packet.dts
        self.duration = packet.duration or 0
        self.key = bool(packet.is_keyframe)
        self.data = bytes(packet)
        self.disp: Optional[int] = None   # frame index (display order), once decoded
        self.idr: Optional[bool] = None


class _PacketLog:
    """The source's compressed packets (decode order) from the first frame a stream-copied clip
    may still need; ``ok`` turns False (and copying stops) at anything unexpected: a packet
    without timestamps, two packets with one pts, a decoded frame that matches no packet."""

    def __init__(self, stream, nal_length_size: int):
        self.stream, self.nal = stream, nal_length_size
        self.recs: deque = deque()
        self.by_pts: dict[int, _Packet] = {}
        self.by_disp: dict[int, _Packet] = {}
        self.ok = True

    @classmethod
    def for_stream(cls, stream, pr: ProbeResult, cfg, out_size) -> Optional["_PacketLog"]:
        """A log when this source's clips may be stream-copied, else None."""
        cc = cfg.clip
        if cc.stream_copy != "auto" or stream.codec_context.name != "h264":
            return None
        if not pr.orientation.upright:
            return None  # copied packets keep the coded orientation: turn the frames and encode
        if stream.format is None or stream.format.name != "yuv420p" or (pr.width, pr.height) != tuple(out_size):
            return None  # other pixel formats, or a resize: re-encode
        if cc.fps and Fraction(cc.fps).limit_denominator(1001) != pr.fps_fraction:
            return None
        nal = avcc_nal_length_size(stream.codec_context.extradata)
        return cls(stream, nal) if nal else None

    def _give_up(self) -> None:
        self.ok = False
        self.recs.clear()
        self.by_pts.clear()
        self.by_disp.clear()

    def add(self, packet) -> None:
        if not self.ok:
            return
        if packet.pts is None or packet.dts is None or packet.pts in self.by_pts:
            self._give_up()
            return
        rec = _Packet(packet)
        self.recs.append(rec)
        self.by_pts[rec.pts] = rec

    def frame_out(self, pts: Optional[int], n: int) -> None:
        """Frame ``n`` (display order) came out of the decoder with timestamp ``pts``."""
        if not self.ok:
            return
        rec = self.by_pts.get(pts) if pts is not None else None
        if rec is None or rec.disp is not None:
            self._give_up()
            return
        rec.disp = n
        self.by_disp[n] = rec

    def is_idr(self, n: int) -> bool:
        rec = self.by_disp.get(n) if self.ok else None
        if rec is None or not rec.key:
            return False
        if rec.idr is None:
            rec.idr = is_idr_packet(rec.data, self.nal)
        return rec.idr

    def prune(self, keep_from: int) -> None:
        """Forget packets of frames before ``keep_from`` (at the front of decode order)."""
        while self.recs and self.recs[0].disp is not None and self.recs[0].disp < keep_from:
            rec = self.recs.popleft()
            del self.by_pts[rec.pts], self.by_disp[rec.disp]

    def window(self, s: int, e: int, min_frames: int):
        """(packets, end, pts0) to copy the longest window ``[s, end)``, ``end <= e`` and at least
        ``min_frames`` long, whose packets are a run of decode order starting at frame ``s``'s
        (an IDR) holding exactly frames s … end-1 at a constant frame duration; None if none."""
        first = self.by_disp.get(s) if self.ok else None
        if first is None or not self.is_idr(s):
            return None
        taken, best, hi, on = [], 0, -1, False
        for rec in self.recs:
            if not on:
                on = rec is first
                if not on:
                    continue
            if rec.disp is None or rec.disp < s or rec.disp >= e:
                break
            taken.append(rec)
            hi = max(hi, rec.disp)
            if hi == s + len(taken) - 1 and len(taken) >= min_frames:
                best = len(taken)
        if not best:
            return None
        taken = taken[:best]
        pts = sorted(r.pts for r in taken)
        if len({b - a for a, b in zip(pts, pts[1:])}) > 1:
            return None  # variable frame rate: the clip's fps and frame count would disagree
        return [(r.pts, r.dts, r.duration, r.key, r.data) for r in taken], s + best, first.pts


def _make_detector(cfg, fps: float) -> ShotDetector:
    sp = cfg.split
    return ShotDetector(sp.detector, threshold=sp.threshold, adaptive_threshold=sp.adaptive_threshold,
                        min_scene_frames=sp.min_scene_frames, transnet_threshold=sp.transnet_threshold,
                        fps=fps)


def _detect_all(path: str, cfg, fps: float, a_size, orientation: Orientation) -> tuple[int, list[int]]:
    """A detection-only decode (detectors that only know the cuts at the end, e.g. TransNetV2)."""
    det = _make_detector(cfg, fps)
    n = 0
    for frame in _iter_frames(path, orientation):
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
        n, cuts = _detect_all(path, cfg, fps, a_size, pr.orientation)
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
    # Rules that do not depend on the window (resolution, fps, aspect): when they fail, every
    # window is rejected without decoding work beyond shot detection.
    try:
        filters.rules(min(max(cc.max_duration, f.min_duration), f.max_duration), pr.width, pr.height, fps, f)
        source_err = None
    except Rejected as err:
        source_err = err if err.reason != "duration" else None
    out_size = even_size(pr.width, pr.height, cc.max_size)
    codec = pick_h264_encoder(cc.codec) if source_err is None else None
    container = av.open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        log = _PacketLog.for_stream(stream, pr, cfg, out_size) if source_err is None else None
        scan = _scan_idr_frames(path, log.nal) if log is not None else None
    except BaseException:
        container.close()
        raise
    planner = WindowPlanner(fps, min_duration=cc.min_duration, max_duration=cc.max_duration, margin=cc.margin,
                            keyframes=scan[0] if scan else (), num_frames=scan[1] if scan else None)
    if cuts is not None:
        planner.add_cuts(cuts)  # nothing planned yet: never late
    lookahead = planner.m + (det.lag if det is not None else 0)
    # A scratch InputResult collects clips and rejections (discarded if the pass is redone).
    res = InputResult(source_id=item.source_id, uri=item.uri)
    state = {"cur": None, "idx": 0, "windows": 0, "dropped": 0}
    scalers = (VideoReformatter(), VideoReformatter(), VideoReformatter())
    detect_scaler = VideoReformatter()

    def handle(events, frames_by_index):
        for ev in events:
            kind = ev[0]
            if kind == "open":
                state["cur"] = (_WindowWork(ev[1], fps, cfg, pr, item, a_size, out_size, codec,
                                            planner.max_frames, planner.min_frames, scalers,
                                            log=log, path=path, stream=stream)
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

    def exact(cuts):  # stream copy: cuts on an IDR keyframe are not trimmed
        return [c for c in cuts if log.is_idr(c)] if log is not None and log.ok else ()

    def prune():  # keep the packets of the open copied window, or from the next frame to plan
        if log is not None:
            cur = state["cur"]
            log.prune(cur.start if cur is not None and cur.copy else (buf[0][0] if buf else n))

    buf: deque = deque()
    n = 0
    try:
        for frame in upright_frames(_decode(container, stream, log), pr.orientation):
            if log is not None:
                log.frame_out(frame.pts, n)
            if det is not None:
                new = det.push_bgr(detection_frame(frame, a_size, bgr=True, reformatter=detect_scaler))
                if new:
                    planner.add_cuts(new, exact=exact(new))
            buf.append((n, frame))
            n += 1
            while buf and buf[0][0] <= n - 1 - lookahead:
                j, fr = buf.popleft()
                handle(planner.step(j), lambda _j, fr=fr: fr)
                prune()
        if n == 0:
            raise Rejected("zero_duration", "no decodable frames")
        if det is not None:
            new = det.finish()
            planner.add_cuts(new, exact=exact(new))
        while buf:
            j, fr = buf.popleft()
            handle(planner.step(j), lambda _j, fr=fr: fr)
        handle(planner.end(n), None)
        entered = {"split": 1, "clip": state["windows"] + state["dropped"]}
        if state["windows"]:
            entered["filter"] = state["windows"]
        return res.clips, res.rejections, entered
    finally:
        container.close()


class _WindowWork:
    """One clip window being decoded: encoder, analysis frames, scores.

    The window's length is only known when it closes, so analysis frames are kept on a grid:
    every ``g``-th frame from the start (and the frame after every other one, for optical-flow pairs), with
    ``g = max_frames // 24`` (every frame for short windows); the sampled frames are then the grid
    frames nearest to evenly spread positions. Frames are held (scaled to the clip size) until
    the window is known to be at least ``min_frames`` long, so dropped shots are never encoded.

    A window that starts on an IDR frame of a source whose packets are logged (``log``) is
    stream-copied: no frame is scaled or encoded, only the analysis frames are made.
    """

    def __init__(self, start: int, fps: float, cfg, pr: ProbeResult, item, a_size, out_size, codec,
                 max_frames: int, min_frames: int, scalers, *, log: Optional[_PacketLog] = None,
                 path: str = "", stream=None):
        self.start, self.fps = start, fps
        self.log, self.path, self.stream = log, path, stream
        self.copy = log is not None and log.is_idr(start)
        self.pts: list[int] = []          # copy: source timestamps of the window's frames
        self.scalers = scalers  # (clip size, analysis size, analysis rgb): reused swscale contexts
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
        if self.copy:
            self.pts.append(frame.pts)
            self.out_frames += 1
            if self.g == 1 or off % self.g == 0 or off % (2 * self.g) == 1:
                self.small[i] = self.scalers[1].reformat(frame, width=self.a_size[0], height=self.a_size[1],
                                                         format="yuv420p", interpolation="AREA")
            return
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

    def _reencode_from_source(self) -> None:
        """Copy mode fallback: decode the window's frames again (from its IDR frame) into the encoder."""
        if any(p is None for p in self.pts):
            raise Rejected("decode_error", "frames without timestamps in a window to re-decode")
        want = set(self.pts)
        self.encoder = _ClipEncoder(self.codec, self.out_rate, self.out_size, self.cfg.clip)
        got = 0
        with av.open(self.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            container.seek(self.pts[0], stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                if frame.pts in want:
                    self.encoder.add(frame)
                    got += 1
                if frame.pts is not None and frame.pts >= self.pts[-1]:
                    break
        if got != len(self.pts):
            raise Rejected("decode_error", f"re-decoding the window gave {got} of {len(self.pts)} frames")

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
        copied = None
        if self.copy:
            # the longest copyable window [start, end'), end' <= end, still long enough for the rules
            min_keep = max(self.min_frames, int(np.ceil(f.min_duration * self.fps - 1e-6)))
            copied = self.log.window(start, end, min_keep) if self.log.ok else None
            if copied is not None:
                end = copied[1]
                self.out_frames = end - start
        s_sec, e_sec = start / self.fps, end / self.fps
        n = end - start
        k, m = f.frames_per_clip, f.motion_frames
        grid = [i for i in sorted(self.small) if (i - start) % self.g == 0 and i < end]
        sample_at = self._pick([start + min(n - 1, int((j + 0.5) * n / k)) for j in range(k)], grid)
        pair_grid = [i for i in grid if i + 1 in self.small and i + 1 < end]
        pair_at = (self._pick([start + min(n - 2, int((j + 0.5) * (n - 1) / m)) for j in range(m)], pair_grid)
                   if n >= 2 else [])
        rgb: dict[int, np.ndarray] = {}
        gray: dict[int, np.ndarray] = {}

        def g_of(i):
            if i not in gray:
                if i not in rgb:
                    rgb[i] = self.scalers[2].reformat(self.small[i], format="rgb24").to_ndarray()
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
        if copied is not None:
            mp4 = remux_packets(self.stream, copied[0], copied[2])
            out_w, out_h = self.pr.width, self.pr.height
            transcode = "copy"
        else:
            if self.copy:  # not copyable after all: decode the window again and encode it
                try:
                    self._reencode_from_source()
                except Rejected as err:
                    self.abort()
                    res.reject("filter", err, clip=idx, start=s_sec, end=e_sec)
                    return
            self._encode_pending()
            mp4 = self.encoder.close()
            out_w, out_h = self.encoder.size
            transcode = self.codec
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
            "transcode": transcode,
            "source": {"width": self.pr.width, "height": self.pr.height, "fps": round(self.pr.fps, 6),
                       "codec": self.pr.codec, "has_audio": self.pr.has_audio,
                       "duration": round(self.pr.duration, 4), "rotation": self.pr.rotation,
                       "mirrored": self.pr.mirrored},
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

