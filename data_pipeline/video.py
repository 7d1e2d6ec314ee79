"""PyAV helpers shared by the stages: H.264 encoder choice, frame decoding, clip encoding,
display orientation."""

from __future__ import annotations

import io
import math
import struct
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Iterator, Optional

import av
import numpy as np

H264_ENCODERS = ("libx264", "libopenh264")


def available_h264_encoders() -> list[str]:
    names = set(av.codecs_available)
    out = []
    for name in H264_ENCODERS:
        if name in names:
            try:
                av.codec.Codec(name, "w")
            except Exception:
                continue
            out.append(name)
    return out


def pick_h264_encoder(preference: str = "auto") -> str:
    """The H.264 encoder to use; a clear error when the PyAV build has none."""
    have = available_h264_encoders()
    if preference != "auto":
        if preference not in have:
            raise RuntimeError(f"clip.codec={preference!r} is not in this PyAV build (it has: "
                               f"{', '.join(have) or 'no H.264 encoder'}); set clip.codec=auto or "
                               "install an `av` wheel built with libx264/libopenh264")
        return preference
    if not have:
        raise RuntimeError("this PyAV build has no H.264 encoder (libx264 or libopenh264); install "
                           "an `av` wheel from PyPI, which ships one")
    return have[0]


def even_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    """Scale (width, height) so the long side is at most ``max_size``; both even (H.264 4:2:0)."""
    scale = min(1.0, max_size / max(width, height))
    w = max(2, int(round(width * scale / 2)) * 2)
    h = max(2, int(round(height * scale / 2)) * 2)
    return w, h


def encode_frames(frames: Iterable[np.ndarray], fps: Fraction | float, codec: str = "auto", *,
                  crf: int = 23, bitrate: int = 2_000_000, preset: str = "veryfast",
                  lossless: bool = False) -> bytes:
    """H.264 mp4 bytes of RGB uint8 frames (H×W×3, even sides). Same input → same bytes.

    ``lossless``: libx264 at ``qp 0`` in 4:4:4 (``yuv444p``, High 4:4:4 Predictive profile): the only
    loss is the 8-bit RGB → YUV → RGB round trip (at most 2 levels per channel), and equal RGB pixels
    decode equal (the synthetic removal pairs rely on it); needs libx264.
    """
    codec = pick_h264_encoder(codec)
    if lossless and codec != "libx264":
        raise RuntimeError(f"encode_frames(lossless=True) needs libx264, this PyAV build picked {codec!r}; "
                           "install an `av` wheel from PyPI, which ships libx264")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = None
        for i, frame in enumerate(frames):
            if stream is None:
                h, w = frame.shape[:2]
                stream = out.add_stream(codec, rate=rate)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
                stream.codec_context.time_base = Fraction(1) / rate
                if lossless:
                    stream.options = {"qp": "0", "preset": preset, "threads": "1"}
                elif codec == "libx264":
                    stream.options = {"crf": str(crf), "preset": preset, "threads": "1"}
                else:
                    stream.bit_rate = bitrate
                stream.codec_context.flags |= getattr(av.codec.context.Flags, "bitexact", 0) or 0
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = i
            vf.time_base = Fraction(1) / rate
            for packet in stream.encode(vf):
                out.mux(packet)
        if stream is None:
            raise ValueError("encode_frames: no frames")
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def encode_grey(frames: Iterable[np.ndarray], fps: Fraction | float, *, preset: str = "veryfast") -> bytes:
    """Lossless H.264 mp4 bytes of grey uint8 frames (H×W, any sides): a depth map, a mask. Same input
    → same bytes; needs libx264.

    :func:`encode_frames` (``lossless``) is not exact for grey: its RGB → limited-range YUV → RGB round
    trip moves about one pixel in seven by one level. Here each frame *is* the luma plane of a
    full-range 4:4:4 picture (``yuvj444p``, chroma 128) coded at ``qp 0``, so a decoder that honours
    the stream's full-range flag (FFmpeg/PyAV, the training loader's ``decode_video``) gives
    R = G = B = the value, exactly.
    """
    if "libx264" not in available_h264_encoders():
        raise RuntimeError(f"encode_grey needs libx264 (lossless 4:4:4), this PyAV build has "
                           f"{available_h264_encoders() or 'no H.264 encoder'}; install an `av` wheel from PyPI, "
                           "which ships libx264")
    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = None
        for i, frame in enumerate(frames):
            frame = np.asarray(frame)
            if frame.ndim != 2 or frame.dtype != np.uint8:
                raise ValueError(f"encode_grey: frame {i} is {frame.dtype}{tuple(frame.shape)}, not uint8 H×W")
            h, w = frame.shape
            if stream is None:
                stream = out.add_stream("libx264", rate=rate)
                stream.width, stream.height = w, h
                stream.pix_fmt = "yuv444p"
                stream.codec_context.color_range = 2  # JPEG (full) range: Y = the value
                stream.codec_context.time_base = Fraction(1) / rate
                stream.options = {"qp": "0", "preset": preset, "threads": "1"}
                stream.codec_context.flags |= getattr(av.codec.context.Flags, "bitexact", 0) or 0
            elif (h, w) != (stream.height, stream.width):
                raise ValueError(f"encode_grey: frame {i} is {w}x{h}, frame 0 {stream.width}x{stream.height}")
            vf = av.VideoFrame(w, h, "yuv444p")
            for k, plane in enumerate(vf.planes):
                rows = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)
                rows[:, :w] = frame if k == 0 else 128
            vf.color_range = 2
            vf.pts = i
            vf.time_base = Fraction(1) / rate
            for packet in stream.encode(vf):
                out.mux(packet)
        if stream is None:
            raise ValueError("encode_grey: no frames")
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def stream_fps(stream) -> Optional[Fraction]:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return Fraction(rate) if rate else None


def decode_rgb(path: str, size: Optional[tuple[int, int]] = None, start: float = 0.0,
               end: Optional[float] = None) -> Iterator[tuple[float, np.ndarray]]:
    """(time in s, RGB frame) from ``start`` (inclusive) to ``end`` (exclusive), resized to ``size``."""
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        tb = stream.time_base
        if start > 0:
            container.seek(int(start / tb), stream=stream, backward=True, any_frame=False)
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            t = float(frame.pts * tb)
            if t < start - 1e-6:
                continue
            if end is not None and t >= end - 1e-6:
                break
            if size is not None:
                img = frame.to_ndarray(width=size[0], height=size[1], format="rgb24")
            else:
                img = frame.to_ndarray(format="rgb24")
            yield t, img


# ----------------------------------------------------------------------------- stream copy


def avcc_nal_length_size(extradata: Optional[bytes]) -> Optional[int]:
    """Bytes of the NAL length prefix of an mp4-style (``avcC``) H.264 stream; None otherwise
    (Annex B streams, e.g. raw .h264 or some .ts/.mkv, are not stream-copied)."""
    if not extradata or len(extradata) < 7 or extradata[0] != 1:
        return None
    return (extradata[4] & 0x3) + 1


def is_idr_packet(data: bytes, nal_length_size: int) -> bool:
    """True when an avcC H.264 access unit holds an IDR slice (NAL type 5): decoding can start
    there and nothing after it refers to a frame before it."""
    pos, n = 0, len(data)
    while pos + nal_length_size < n:
        size = int.from_bytes(data[pos:pos + nal_length_size], "big")
        pos += nal_length_size
        if size <= 0 or pos + size > n:
            return False
        if data[pos] & 0x1F == 5:
            return True
        pos += size
    return False


def remux_packets(template_stream, packets: Iterable, pts0: int) -> bytes:
    """An mp4 (bytes) of compressed packets copied from ``template_stream`` without re-encoding.

    ``packets``: (pts, dts, duration, is_keyframe, data) in decode order, in the template's time
    base; timestamps are shifted by ``pts0`` so that the first displayed frame is at 0 (decode
    timestamps of leading frames may be negative, as in the source). Same packets → same bytes.
    """
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4", options={"fflags": "+bitexact"}) as out:
        stream = out.add_stream_from_template(template_stream)
        tb = template_stream.time_base
        for pts, dts, duration, key, data in packets:
            pkt = av.Packet(data)
            pkt.pts, pkt.dts = pts - pts0, dts - pts0
            if duration:
                pkt.duration = duration
            pkt.time_base = tb
            pkt.is_keyframe = key
            pkt.stream = stream
            out.mux(pkt)
    return buf.getvalue()


# ----------------------------------------------------------------------------- display orientation


@dataclass(frozen=True)
class Orientation:
    """How a video's display matrix turns its coded pictures for display: a rotation by
    ``rotation`` degrees counter-clockwise (0, 90, 180 or 270; what PyAV's ``frame.rotation`` and
    ``stream.set_display_rotation`` mean), then a left-right mirror when ``mirrored``."""

    rotation: int = 0
    mirrored: bool = False

    @property
    def upright(self) -> bool:
        return self.rotation == 0 and not self.mirrored

    def display_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.rotation in (90, 270) else (width, height)

    def filters(self) -> list[tuple[str, str]]:
        """FFmpeg filters that turn a coded picture into the displayed one (as `ffmpeg` autorotates).

        ``transpose`` swaps the axes (``cclock_flip``), then flips columns (``clock``), rows
        (``cclock``) or both (``clock_flip``); a rotation by 90° counter-clockwise is the transpose
        with its rows flipped, and a mirror flips the columns once more.
        """
        return {(0, False): [], (0, True): [("hflip", "")],
                (90, False): [("transpose", "cclock")], (90, True): [("transpose", "clock_flip")],
                (180, False): [("hflip", ""), ("vflip", "")], (180, True): [("vflip", "")],
                (270, False): [("transpose", "clock")], (270, True): [("transpose", "cclock_flip")],
                }[(self.rotation, self.mirrored)]


def orientation_from_matrix(matrix: bytes) -> Orientation:
    """The orientation of an FFmpeg display matrix (``AV_FRAME_DATA_DISPLAYMATRIX``: 9 native int32,
    a, b, c, d in 16.16 fixed point, mapping a coded point (x, y) to (a·x + c·y, b·x + d·y)).

    Raises ValueError for matrices that are not a multiple of 90° (with or without a mirror).
    """
    if len(matrix) != 36:
        raise ValueError(f"a display matrix has 36 bytes, not {len(matrix)}")
    m = struct.unpack("=9i", matrix)
    a, b, c, d = (m[0] / 65536, m[1] / 65536, m[3] / 65536, m[4] / 65536)
    scale = max(abs(a), abs(b), abs(c), abs(d))
    if scale == 0:
        raise ValueError("a singular display matrix")
    a, b, c, d = (round(v / scale, 3) for v in (a, b, c, d))
    if not ((b == c == 0 and abs(a) == abs(d) == 1) or (a == d == 0 and abs(b) == abs(c) == 1)):
        raise ValueError(f"a display matrix that is not a multiple of 90 degrees ({a} {b} {c} {d})")
    mirrored = a * d - b * c < 0
    if mirrored:  # undo the mirror (x → -x) applied after the rotation
        a, c = -a, -c
    # a rotation by θ counter-clockwise: a = cos θ, c = sin θ (y grows downwards)
    return Orientation(rotation=int(round(math.degrees(math.atan2(c, a)))) % 360, mirrored=mirrored)


def frame_orientation(frame) -> Orientation:
    """The display orientation a decoded frame carries (upright when it has no display matrix)."""
    sd = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
    return orientation_from_matrix(bytes(sd)) if sd is not None else Orientation()


class Uprighter:
    """Turns decoded frames of one orientation upright, with FFmpeg's transpose/flip filters, and
    drops their display matrix so that nothing downstream turns them again."""

    def __init__(self, orientation: Orientation):
        self.orientation = orientation
        self._graph = None
        self._key = None

    def __call__(self, frame):
        key = (frame.width, frame.height, frame.format.name)
        if self._graph is None or key != self._key:
            import av.filter

            g = av.filter.Graph()
            node = g.add_buffer(width=frame.width, height=frame.height, format=frame.format,
                                time_base=frame.time_base or Fraction(1, 1))
            chain = [*self.orientation.filters(), ("sidedata", "mode=delete:type=DISPLAYMATRIX")]
            for name, args in chain:
                nxt = g.add(name, args) if args else g.add(name)
                node.link_to(nxt)
                node = nxt
            node.link_to(g.add("buffersink"))
            g.configure()
            self._graph, self._key = g, key
        self._graph.push(frame)
        return self._graph.pull()
