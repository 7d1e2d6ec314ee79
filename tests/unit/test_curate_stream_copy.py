"""Stream copy of clip windows (``clip.stream_copy=auto``): packets copied, frames identical."""

from __future__ import annotations

import io
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest

from data_pipeline.config import load_curate_config
from data_pipeline.sources import SourceItem
from data_pipeline.stages import clip as clip_stage
from data_pipeline.stages.clip import process_video
from data_pipeline.stages.split import plan_windows
from data_pipeline.video import avcc_nal_length_size, encode_frames, is_idr_packet

FPS = 24
CUTS = (30, 100)      # shots [0, 30), [30, 100) (longer than clip.max_duration), [100, 140)
N = 140


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """An x264 mp4 with B-frames, hard cuts and a panning texture per shot (like real footage)."""
    rng = np.random.default_rng(7)
    w, h = 192, 112
    frames = []
    bounds = (0, *CUTS, N)
    for a, b in zip(bounds, bounds[1:]):
        tex = cv2.resize(rng.integers(0, 255, (h // 8 + 20, w // 8 + 20, 3), dtype=np.uint8),
                         (w + 160, h + 160), interpolation=cv2.INTER_CUBIC)
        for i in range(b - a):
            frames.append(np.ascontiguousarray(tex[40 + i // 2:40 + i // 2 + h, 40 + i:40 + i + w]))
    path = tmp_path_factory.mktemp("copy") / "multi_shot.mp4"
    path.write_bytes(encode_frames(frames, Fraction(FPS), crf=23, preset="veryfast"))
    return str(path)


def _decode(data_or_path) -> list[np.ndarray]:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    with av.open(src) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def _cfg(*more):
    return load_curate_config(None, ["input.path=/unused", "output.path=/unused", "clip.min_duration=0.5",
                                     "clip.max_duration=2.0", "clip.margin=0.125", "filters.min_sharpness=0",
                                     "filters.min_motion=0", "filters.min_duration=0.5", *more])


def _run(path, cfg):
    item = SourceItem(uri=path, source_id="multi_shot")
    return process_video(path, item, cfg)


def test_the_fixture_has_b_frames_and_idr_frames_at_the_cuts(source):
    with av.open(source) as c:
        s = c.streams.video[0]
        nal = avcc_nal_length_size(s.codec_context.extradata)
        packets = [(p.pts, p.dts, bytes(p)) for p in c.demux(s) if p.size]
    order = sorted(p[0] for p in packets)
    idr = sorted(order.index(pts) for pts, _, data in packets if is_idr_packet(data, nal))
    assert idr == [0, *CUTS]
    assert any(pts != dts for pts, dts, _ in packets)  # reordered (B-)frames: decode ≠ display order


def test_copied_clips_decode_to_exactly_the_source_frames(source):
    cfg = _cfg()
    res = _run(source, cfg)
    src = _decode(source)
    copied = [c for c in res.clips if c.meta["transcode"] == "copy"]
    # windows on the IDR frames 0, 30 and 100 are copied; the second window of the long shot
    # (starting mid-GOP) is re-encoded
    assert [round(c.start * FPS) for c in copied] == [0, 30, 100]
    assert [c.meta["transcode"] for c in res.clips] == ["copy", "copy", "libx264", "copy"]
    for c in copied:
        s, e = round(c.start * FPS), round(c.end * FPS)
        frames = _decode(c.mp4)
        assert len(frames) == e - s == c.meta["num_frames"]
        assert all(np.array_equal(a, b) for a, b in zip(frames, src[s:e]))
        with av.open(io.BytesIO(c.mp4)) as cont:
            st = cont.streams.video[0]
            assert st.frames == e - s and st.average_rate == FPS  # what the training loader reads
            assert next(cont.decode(st)).pts == 0                  # the clip starts at 0
        assert (c.meta["width"], c.meta["height"]) == (192, 112)
    # no margin at cuts that sit on an IDR frame: the shot before ends right before the cut
    assert round(copied[0].end * FPS) == 30 and round(copied[2].end * FPS) == N
    # a greedy window is cut back to where its packets are self-contained (B-frames)
    long0 = copied[1]
    assert 30 + 48 - 4 <= round(long0.end * FPS) <= 30 + 48
    assert _run(source, cfg).clips[1].mp4 == long0.mp4  # deterministic bytes


def test_stream_copy_never_and_resized_clips_reencode_with_margins(source):
    for cfg in (_cfg("clip.stream_copy=never"), _cfg("clip.max_size=128")):
        res = _run(source, cfg)
        assert {c.meta["transcode"] for c in res.clips} == {"libx264"}
        # margin (3 frames at 24 fps) trimmed at every cut
        assert [round(c.start * FPS) for c in res.clips] == [0, 33, 81, 103]
        assert round(res.clips[0].end * FPS) == 27


def test_a_window_that_cannot_be_copied_is_decoded_again_and_encoded(source, monkeypatch):
    monkeypatch.setattr(clip_stage._PacketLog, "window", lambda self, s, e, m: None)
    res = _run(source, _cfg())
    src = _decode(source)
    assert [c.meta["transcode"] for c in res.clips] == ["libx264"] * 4
    first = res.clips[0]
    frames = _decode(first.mp4)
    assert len(frames) == first.meta["num_frames"] == 30  # same window as the copy would have been
    assert np.abs(frames[10].astype(int) - src[10].astype(int)).mean() < 6  # a lossy copy of it


def test_exact_cuts_are_not_trimmed_by_the_margin():
    windows, _ = plan_windows(100, [40, 70], 10.0, min_duration=1.0, max_duration=5.0, margin=0.2,
                              exact_cuts=[40])
    assert windows == [(0, 40), (40, 68), (72, 100)]


def test_long_shots_are_split_on_keyframes_in_copy_mode():
    kf = [0, 40, 100, 125, 180, 240]
    plan = dict(min_duration=1.0, max_duration=5.0, margin=0.2, exact_cuts=[100])
    windows, _ = plan_windows(300, [100], 10.0, keyframes=kf, **plan)
    # [0, 40): the next keyframe after 40 (100) is beyond 0 + 50, so close on 40; [90, 100) and
    # [175, 225) do not start on a keyframe (GOP longer than max_duration) and close on the first
    # keyframe at least min_duration in; the last window reaches the end of the video
    assert windows == [(0, 40), (40, 90), (90, 100), (100, 125), (125, 175), (175, 225), (225, 240),
                       (240, 290), (290, 300)]
    assert plan_windows(300, [100], 10.0, **plan)[0] == [(0, 50), (50, 100), (100, 150), (150, 200),
                                                          (200, 250), (250, 300)]
    # streaming (cuts known `margin` frames ahead, or on the frame for exact cuts) = offline
    from data_pipeline.stages.split import WindowPlanner

    wp = WindowPlanner(10.0, min_duration=1.0, max_duration=5.0, margin=0.2, keyframes=kf, num_frames=300)
    events = []
    for j in range(300):
        if j == 100:
            wp.add_cuts([100], exact=[100])
        events += wp.step(j)
    events += wp.end(300)
    assert [e[1:] for e in events if e[0] == "close"] == windows


@pytest.fixture(scope="module")
def long_shot(tmp_path_factory):
    """One 120-frame panning shot, x264 with an IDR frame every 20 frames (closed GOPs)."""
    rng = np.random.default_rng(3)
    w, h = 160, 96
    tex = cv2.resize(rng.integers(0, 255, (h // 8 + 20, w // 8 + 20, 3), dtype=np.uint8),
                     (w + 160, h + 160), interpolation=cv2.INTER_CUBIC)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        st = out.add_stream("libx264", rate=FPS)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.options = {"crf": "23", "preset": "veryfast", "x264-params": "keyint=20:min-keyint=20:scenecut=0"}
        for i in range(120):
            vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(tex[40:40 + h, i:i + w]), format="rgb24")
            vf.pts = i
            for p in st.encode(vf):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    path = tmp_path_factory.mktemp("long") / "long_shot.mp4"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_a_long_shot_is_copied_window_by_window_on_its_keyframes(long_shot):
    src = _decode(long_shot)
    res = _run(long_shot, _cfg())
    assert [(round(c.start * FPS), c.meta["transcode"]) for c in res.clips] == [(0, "copy"), (40, "copy"), (80, "copy")]
    assert round(res.clips[-1].end * FPS) == 120
    for c in res.clips:
        s = round(c.start * FPS)
        frames = _decode(c.mp4)
        assert len(frames) == c.meta["num_frames"] and all(np.array_equal(a, b) for a, b in zip(frames, src[s:]))
    never = _run(long_shot, _cfg("clip.stream_copy=never"))
    assert [(round(c.start * FPS), round(c.end * FPS)) for c in never.clips] == [(0, 48), (48, 96), (96, 120)]
