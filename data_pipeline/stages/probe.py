"""Probe: container metadata from PyAV, and the display orientation of the first frame.

Rejects (with a reason) inputs that are not regular files (from ``stat``, before anything opens
them), cannot be read (``permission_denied`` from the real open), are not video, have no duration,
or whose frame size is beyond the configured limits, so that nothing downstream allocates frames
for them.
Width and height are the *display* size: a source whose display matrix rotates it (phones record
portrait video as landscape pictures turned by the matrix) reports its size after rotation, and
the clip stage turns its frames upright (``rotation``/``mirrored``; ``coded_*``: before rotation).
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Optional


class Rejected(Exception):
    """An input or clip is dropped; ``reason`` is a short key counted in stats.json."""

    def __init__(self, reason: str, detail: str = "", score: Optional[float] = None):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.score = score


@dataclass
class ProbeResult:
    duration: float
    fps: float
    fps_num: int
    fps_den: int
    width: int
    height: int
    codec: str
    has_audio: bool
    num_frames: int
    size_bytes: int
    coded_width: int = 0      # as stored (0: same as width/height)
    coded_height: int = 0
    rotation: int = 0         # display matrix: degrees counter-clockwise (0, 90, 180, 270) …
    mirrored: bool = False    # … then mirrored left-right

    def __post_init__(self):
        if not self.coded_width:
            self.coded_width, self.coded_height = self.orientation.display_size(self.width, self.height)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def orientation(self):
        from ..video import Orientation

        return Orientation(self.rotation, self.mirrored)

    @property
    def fps_fraction(self) -> Fraction:
        return Fraction(self.fps_num, self.fps_den)


def probe(path: str, *, max_width: int = 8192, max_height: int = 8192,
          max_duration: float = 4 * 3600.0) -> ProbeResult:
    """Metadata of the video at local ``path``; raises :class:`Rejected` with a reason."""
    import av

    size, track_sizes = _open_regular_file(path)
    # Opening a container makes FFmpeg decode a first frame for some codecs; an absurd frame size
    # must be caught before that, from the ISO-BMFF (mp4/mov) track headers.
    for w, h in track_sizes:
        if w > max_width or h > max_height:
            raise Rejected("frame_too_large", f"{w}x{h} exceeds {max_width}x{max_height} (track header)")
    try:
        container = av.open(path, metadata_errors="ignore")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError, ValueError) as exc:
        raise Rejected("not_a_video", f"cannot open container: {type(exc).__name__}: {exc}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise Rejected("no_video_stream", f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        if width <= 0 or height <= 0:
            raise Rejected("not_a_video", "video stream without a frame size")
        if width > max_width or height > max_height:
            raise Rejected("frame_too_large", f"{width}x{height} exceeds {max_width}x{max_height}")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        if not rate or float(rate) <= 0:
            raise Rejected("no_frame_rate", "the video stream reports no frame rate")
        rate = Fraction(rate).limit_denominator(100000)
        duration = 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / 1_000_000
        frames = int(stream.frames or 0)
        if frames == 0 and duration > 0:
            frames = int(round(duration * float(rate)))
        if duration <= 0 or frames == 0:
            raise Rejected("zero_duration", f"duration {duration:.3f}s, {frames} frames")
        if duration > max_duration:
            raise Rejected("too_long", f"{duration:.0f}s exceeds {max_duration:.0f}s")
        codec = ctx.name or "unknown"
        has_audio = bool(container.streams.audio)
        orientation = _first_frame_orientation(container, stream)
    display_w, display_h = orientation.display_size(width, height)
    return ProbeResult(duration=duration, fps=float(rate), fps_num=rate.numerator,
                       fps_den=rate.denominator, width=display_w, height=display_h, codec=codec,
                       has_audio=has_audio, num_frames=frames, size_bytes=size, coded_width=width,
                       coded_height=height, rotation=orientation.rotation, mirrored=orientation.mirrored)


def _first_frame_orientation(container, stream):
    """The display orientation of the first decoded frame (the display matrix is stream side
    data that PyAV shows on frames only); upright when no frame decodes here, the clip stage
    checks every frame against it anyway."""
    import av

    from ..video import Orientation, frame_orientation

    try:
        frame = next(iter(container.decode(stream)), None)
    except (av.error.FFmpegError, OSError):
        frame = None
    if frame is None:
        return Orientation()
    try:
        return frame_orientation(frame)
    except ValueError as exc:
        raise Rejected("unsupported_rotation", str(exc)) from None


def _error_detail(exc: OSError) -> str:
    code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
    return f"{code + ': ' if code else ''}{exc.strerror or exc}"


def _kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a unix socket")):
        if test(mode):
            return kind
    return "not a regular file"


def _open_regular_file(path: str) -> tuple[int, list[tuple[int, int]]]:
    """(size, mp4 track sizes) of a regular, readable file; raises :class:`Rejected` otherwise.

    What is not a regular file (a FIFO, whose open would block forever, a device, a socket, a
    directory; after following symlinks) is rejected from ``stat`` before anything opens it.
    Permission errors come from the real ``open`` (``os.access`` says yes to root for anything).
    """
    try:
        st = os.stat(path)
    except PermissionError as exc:
        raise Rejected("permission_denied", _error_detail(exc)) from None
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = _kind(st.st_mode)
        if os.path.islink(path):
            kind += f" (through the link to {os.path.realpath(path)})"
        if stat.S_ISDIR(st.st_mode):
            try:
                os.scandir(path).close()
            except PermissionError as exc:
                raise Rejected("permission_denied", f"{kind} that cannot be listed: {_error_detail(exc)}") from None
        raise Rejected("not_a_regular_file", kind)
    if st.st_size == 0:
        raise Rejected("empty_file", "zero bytes")
    try:  # O_NONBLOCK: should the path have become a FIFO since the stat, this open does not block
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except PermissionError as exc:
        raise Rejected("permission_denied", _error_detail(exc)) from None
    except OSError as exc:
        raise Rejected("unreadable", f"{type(exc).__name__}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise Rejected("not_a_regular_file", _kind(st.st_mode))
        return st.st_size, mp4_track_sizes(f)


def mp4_track_sizes(f, max_moov: int = 64 << 20) -> list[tuple[int, int]]:
    """(width, height) of every track header in an mp4/mov file (open, binary); [] for other formats.

    Reads only box headers and the ``moov`` box (which holds no frame data).
    """
    out: list[tuple[int, int]] = []
    try:
        end = os.fstat(f.fileno()).st_size
        pos = 0
        while pos + 8 <= end:
            f.seek(pos)
            head = f.read(16)
            size, kind = struct.unpack(">I4s", head[:8])
            hdr = 8
            if size == 1 and len(head) >= 16:
                size, hdr = struct.unpack(">Q", head[8:16])[0], 16
            elif size == 0:
                size = end - pos
            if size < hdr:
                return out
            if pos == 0 and kind not in (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip"):
                return out  # not ISO-BMFF
            if kind == b"moov":
                if size > max_moov:
                    return out
                f.seek(pos + hdr)
                _walk(f.read(size - hdr), out)
                return out
            pos += size
    except (OSError, struct.error):
        return out
    return out


def _walk(buf: bytes, out: list) -> None:
    pos = 0
    while pos + 8 <= len(buf):
        size, kind = struct.unpack(">I4s", buf[pos:pos + 8])
        hdr = 8
        if size == 1:
            size, hdr = struct.unpack(">Q", buf[pos + 8:pos + 16])[0], 16
        if size < hdr or pos + size > len(buf):
            return
        body = buf[pos + hdr:pos + size]
        if kind in (b"trak", b"mdia", b"minf", b"stbl"):
            _walk(body, out)
        elif kind == b"tkhd" and body:
            off = 76 if body[0] == 0 else 88
            if len(body) >= off + 8:
                w, h = struct.unpack(">II", body[off:off + 8])
                if w or h:
                    out.append((w >> 16, h >> 16))
        pos += size
