"""Curation faults without Ray: completion records that must not run code, rotated sources,
non-regular inputs and permission errors (issue #14)."""

from __future__ import annotations

import io
import json
import os

import av
import numpy as np
import pytest

from data_pipeline.stages.clip import Clip, InputResult
from data_pipeline.stages.probe import ProbeResult, Rejected
from data_pipeline.writer import (DATA, WORK, RecordError, data_path, finished_ids, read_record,
                                  record_path, write_record)
from tests.helpers_curate import crafted_pickle

# ----------------------------------------------------------------------------- completion records


def _result(source_id="vid-0000abcd") -> InputResult:
    res = InputResult(source_id=source_id, uri=f"/raw/{source_id}.mp4",
                      probe=ProbeResult(duration=4.0, fps=12.0, fps_num=12, fps_den=1, width=96, height=160,
                                        codec="h264", has_audio=False, num_frames=48, size_bytes=1234).to_dict(),
                      entered={"split": 1, "clip": 3, "filter": 2})
    res.clips = [Clip(clip=0, start=0.1, end=2.25, meta={"scores": {"motion": 0.123456, "sharpness": 1e3},
                                                          "fps": 12.0, "source": {"has_audio": False}},
                      mp4=b"\x00mp4-zero", phash=[2**63 - 1, 0, 17], caption="a red circle moves right",
                      caption_source="source", extra={"latent.npy": b"\x93NUMPY", "text.npy": b""}),
                 Clip(clip=2, start=2.35, end=4.0, meta={"k": [1, None, "é"]}, mp4=b"mp4-two")]
    res.reject("clip", Rejected("shot_too_short", "shot: 0.50s < 1.0s", score=0.5), start=1.0, end=1.5)
    return res


def test_completion_records_are_json_and_round_trip(tmp_path):
    out = str(tmp_path)
    res = _result()
    write_record(out, res)
    raw = open(record_path(out, res.source_id), "rb").read()
    rec = json.loads(raw)  # plain JSON, with its format and version
    assert (rec["format"], rec["version"]) == ("vchitect-curate-record", 2)
    assert b"mp4-two" not in raw and os.path.getsize(data_path(out, res.source_id)) == rec["data"]["size"]
    assert finished_ids(out) == {res.source_id}
    back = read_record(out, res.source_id)
    assert back == res  # every field, clip bytes and extra members included
    assert read_record(out, res.source_id, with_data=False).clips[0].mp4 == b""
    rejected_only = InputResult(source_id="bad-1", uri="/raw/bad.mp4", rejections=res.rejections)
    write_record(out, rejected_only)
    assert read_record(out, "bad-1") == rejected_only and not os.path.exists(data_path(out, "bad-1"))


def _corrupt(rec: dict, how: str) -> bytes:
    if how == "truncated":
        return json.dumps(rec).encode()[:-10]
    if how == "not utf-8":
        return b"\xff\xfe" + json.dumps(rec).encode()
    if how == "deeply nested":
        return b"[" * 200_000 + b"]" * 200_000
    if how == "a list":
        return b"[]"
    rec = json.loads(json.dumps(rec))
    if how == "old version":
        rec["version"] = 1
    elif how == "version true":
        rec["version"] = True
    elif how == "other source":
        rec["source_id"] = "someone-else"
    elif how == "extra key":
        rec["__reduce__"] = "os.system"
    elif how == "missing key":
        del rec["entered"]
    elif how == "member path":
        rec["clips"][0]["members"]["../../evil"] = [0, 1]
    elif how == "member outside data":
        rec["clips"][0]["members"]["mp4"] = [0, 10**9]
    elif how == "json member":
        rec["clips"][0]["members"]["json"] = [0, 1]
    elif how == "clip index twice":
        rec["clips"][1]["clip"] = 0
    elif how == "phash float":
        rec["clips"][0]["phash"] = [1.5]
    elif how == "rejection clip string":
        rec["rejections"][0]["clip"] = "0"
    elif how == "probe field":
        rec["probe"]["width"] = "96"
    elif how == "bad sha":
        rec["data"]["sha256"] = "x" * 64
    else:
        raise AssertionError(how)
    return json.dumps(rec).encode()


CORRUPTIONS = ["truncated", "not utf-8", "deeply nested", "a list", "old version", "version true", "other source",
               "extra key", "missing key", "member path", "member outside data", "json member", "clip index twice",
               "phash float", "rejection clip string", "probe field", "bad sha"]


def test_unusable_records_are_ignored_with_one_warning_and_never_executed(tmp_path):
    out = str(tmp_path / "out")
    marker = tmp_path / "marker"
    good = _result("good-00000001")
    write_record(out, good)
    rec = json.loads(open(record_path(out, good.source_id), "rb").read())
    bad_ids = []
    for i, how in enumerate(CORRUPTIONS):
        sid = f"bad-{i:02d}"
        res = _result(sid)
        write_record(out, res)  # a data file of the right size next to each
        with open(record_path(out, sid), "wb") as f:
            f.write(_corrupt(dict(rec, source_id=sid), how))
        bad_ids.append(sid)
    # a crafted pickle posing as a JSON record, a data file gone, one of another size
    for sid, what in (("pickle-json", "pickle"), ("no-data", "rm"), ("short-data", "short")):
        write_record(out, _result(sid))
        if what == "pickle":
            open(record_path(out, sid), "wb").write(crafted_pickle(marker))
        elif what == "rm":
            os.remove(data_path(out, sid))
        else:
            open(data_path(out, sid), "ab").write(b"+")
        bad_ids.append(sid)
    # old-format records: never unpickled, one line for all of them
    for sid in ("old-1", "old-2", good.source_id):
        open(os.path.join(out, WORK, f"{sid}.pkl"), "wb").write(crafted_pickle(marker))
    warnings = []
    assert finished_ids(out, warn=warnings.append) == {good.source_id}
    assert not marker.exists()
    assert len(warnings) == len(bad_ids) + 1
    pkl = [w for w in warnings if "pickle format" in w]
    assert len(pkl) == 1 and "3 completion record(s)" in pkl[0] and "redone" in pkl[0]
    for sid in bad_ids:  # one line per bad record, naming its file
        assert sum(record_path(out, sid) in w for w in warnings) == 1, sid
    for sid in bad_ids[:-3]:
        with pytest.raises(RecordError):
            read_record(out, sid)
    assert read_record(out, good.source_id) == good


def test_a_data_file_changed_behind_its_record_is_caught_when_read(tmp_path):
    out = str(tmp_path)
    res = _result()
    write_record(out, res)
    path = data_path(out, res.source_id)
    data = bytearray(open(path, "rb").read())
    data[3] ^= 1  # same size: only the sha256 tells
    open(path, "wb").write(bytes(data))
    assert finished_ids(out) == {res.source_id}  # the startup check is a listing (sizes), no data read
    with pytest.raises(RecordError, match="sha256"):
        read_record(out, res.source_id)
    assert DATA in path


# ----------------------------------------------------------------------------- rotated sources


def _write_oriented(path, frames, rotation: int, hflip: bool = False, fps: int = 12, lossless: bool = False):
    """An H.264 mp4 of RGB ``frames`` whose display matrix says: turn by ``rotation`` degrees
    counter-clockwise, then mirror left-right when ``hflip`` (PyAV's ``set_display_rotation``)."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w", format="mp4") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height = w, h
        st.pix_fmt = "yuv444p" if lossless else "yuv420p"
        st.options = {"qp": "0"} if lossless else {"crf": "18"}
        st.set_display_rotation(rotation, hflip=hflip)
        for i, img in enumerate(frames):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts = i
            for p in st.encode(f):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)


def _decode_plain(data_or_path):
    """Frames as the training loader decodes them: plain PyAV, no rotation applied; (frames, matrices)."""
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(src) as c:
        frames = list(c.decode(c.streams.video[0]))
    return ([f.to_ndarray(format="rgb24") for f in frames],
            [f.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX) is not None for f in frames])


def test_display_matrices_turn_frames_upright_as_pyav_defines_them(tmp_path):
    from data_pipeline.video import Uprighter, frame_orientation

    coded = np.zeros((48, 64, 3), np.uint8)
    coded[:8, :16] = 255           # top-left
    coded[-6:, -4:] = (255, 0, 0)  # bottom-right
    coded[10:14, 20:50] = (0, 255, 0)
    for rotation in (0, 90, 180, 270):
        for hflip in (False, True):
            path = tmp_path / f"o{rotation}{hflip}.mp4"
            _write_oriented(path, [coded], rotation, hflip, lossless=True)
            with av.open(str(path)) as c:
                frame = next(c.decode(video=0))
                orientation = frame_orientation(frame)
                up = Uprighter(orientation)(frame)
            assert (orientation.rotation, orientation.mirrored) == (rotation, hflip)
            stored = frame.to_ndarray(format="rgb24")  # the coded picture (≈ coded: RGB → YUV → RGB)
            assert np.abs(stored.astype(int) - coded).max() < 8
            want = np.rot90(stored, rotation // 90)  # counter-clockwise …
            want = want[:, ::-1] if hflip else want  # … then mirrored
            assert np.array_equal(up.to_ndarray(format="rgb24"), want), (rotation, hflip)
            assert frame_orientation(up).upright  # the matrix is gone: nothing turns it again


def test_rotated_sources_become_upright_clips_at_the_display_size(tmp_path):
    from data_pipeline.config import load_curate_config
    from data_pipeline.sources import SourceItem
    from data_pipeline.stages.clip import process_video
    from data_pipeline.stages.probe import probe

    w, h = 160, 96  # coded landscape; displayed portrait 96×160 (a phone held upright)
    frames = []
    for i in range(30):
        img = np.full((h, w, 3), 60, np.uint8)
        img[:24, :32] = 255                        # bright block, coded top-left
        img[40:60, 40 + 2 * i:60 + 2 * i] = (200, 30, 30)  # something moving
        frames.append(img)
    src = tmp_path / "portrait.mp4"
    _write_oriented(src, frames, 90)
    raw, matrices = _decode_plain(src)
    assert all(matrices) and raw[0].shape == (h, w, 3)  # the side data is really in the file
    pr = probe(str(src))
    assert (pr.width, pr.height, pr.coded_width, pr.coded_height, pr.rotation) == (96, 160, 160, 96, 90)
    for mode in ("auto", "never"):  # auto would stream-copy an upright source of this size
        cfg = load_curate_config(None, ["input.path=/unused", "output.path=/unused", "clip.min_duration=1.0",
                                        "clip.max_duration=3.0", "filters.min_sharpness=0", "filters.min_motion=0",
                                        "filters.min_duration=1.0", f"clip.stream_copy={mode}"])
        res = process_video(str(src), SourceItem(uri=str(src), source_id="portrait"), cfg)
        assert len(res.clips) == 1, res.rejections
        clip = res.clips[0]
        assert (clip.meta["width"], clip.meta["height"]) == (96, 160) and clip.meta["transcode"] != "copy"
        assert (clip.meta["source"]["width"], clip.meta["source"]["height"], clip.meta["source"]["rotation"]) \
            == (96, 160, 90)
        got, matrices = _decode_plain(clip.mp4)
        assert len(got) == clip.meta["num_frames"] and not any(matrices)  # upright for any reader
        for img in got:
            assert img.shape == (160, 96, 3)
            # counter-clockwise by 90°: the coded top-left corner is displayed bottom-left
            assert img[136:160, :24].mean() > 200, mode
            assert max(img[:24, :24].mean(), img[:24, -24:].mean(), img[-24:, -24:].mean()) < 100, mode


# ----------------------------------------------------------------------------- input types, permissions


def _non_regular_inputs(folder) -> dict[str, str]:
    """Entries of ``folder`` that are not regular files → what the rejection detail says."""
    import socket

    os.mkfifo(folder / "fifo.mp4")  # opening it for reading would block until a writer comes
    os.symlink("/dev/null", folder / "null link.mp4")
    os.mkdir(folder / "folder.mp4")
    os.symlink(folder / "folder.mp4", folder / "folder link.mp4")
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(folder)  # a relative name: unix socket paths are limited to ~107 bytes
    try:
        sock.bind("socket.mp4")
    finally:
        os.chdir(cwd)
        sock.close()
    return {"fifo.mp4": "a FIFO (named pipe)", "null link.mp4": "a character device (through the link to /dev/null)",
            "folder.mp4": "a directory", "socket.mp4": "a unix socket", "folder link.mp4": "a directory (through"}


@pytest.mark.timeout(120)
def test_non_regular_inputs_are_rejected_from_stat_never_opened(tmp_path, monkeypatch):
    import builtins

    from data_pipeline.config import load_curate_config
    from data_pipeline.pipeline import run_video_stage
    from data_pipeline.sources import list_sources
    from data_pipeline.writer import finalize

    raw = tmp_path / "raw"
    raw.mkdir()
    expected = _non_regular_inputs(raw)
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps({"uri": f"raw/{n}"}) + "\n" for n in expected))
    special = {str(raw / n) for n in expected}

    def guard(real):
        def opener(path, *a, **k):
            if isinstance(path, (str, os.PathLike)) and os.path.abspath(path) in special:
                raise AssertionError(f"opened {path}")
            return real(path, *a, **k)
        return opener

    for mod, name in ((builtins, "open"), (os, "open"), (av, "open")):
        monkeypatch.setattr(mod, name, guard(getattr(mod, name)))
    # a folder (whose real subfolders are walked, not inputs) and a manifest naming every entry
    for source, names in ((str(raw), set(expected) - {"folder.mp4"}),
                          (str(tmp_path / "manifest.jsonl"), set(expected))):
        out = tmp_path / f"out-{os.path.basename(source)}"
        cfg = load_curate_config(None, [f"input.path={source}", f"output.path={out}"])
        items = list_sources(source, [".mp4"])
        assert {os.path.basename(it.uri) for it in items} == names
        for it in items:
            write_record(str(out), run_video_stage(it, cfg, {}))
        stats = finalize(str(out), cfg, [it.source_id for it in items], fingerprint="f")
        rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
        assert {os.path.basename(r["uri"]): (r["stage"], r["reason"]) for r in rejected} == \
            {n: ("probe", "not_a_regular_file") for n in names}
        for r in rejected:
            assert r["detail"].startswith(expected[os.path.basename(r["uri"])]), r
        assert stats["rejected_by_reason"] == {"probe.not_a_regular_file": len(names)}


def test_permission_errors_are_rejected_with_their_reason(tmp_path):
    """As an unprivileged user (root passes every permission check): a mode-000 file and a
    mode-000 subfolder are rejected as permission_denied; a readable video next to them probes."""
    import shutil
    import tempfile

    from data_pipeline.video import encode_frames
    from tests.helpers_curate import run_unprivileged

    work = tempfile.mkdtemp(prefix="vchitect-perm-")  # not under pytest's 0700 tmp folders
    try:
        os.chmod(work, 0o755)
        root = os.path.join(work, "raw")
        os.makedirs(os.path.join(root, "locked"))
        video = encode_frames([np.zeros((32, 32, 3), np.uint8)] * 4, 12)
        for rel in ("ok.mp4", "no access.mp4", "locked/inner.mp4"):
            with open(os.path.join(root, rel), "wb") as f:
                f.write(video)
        os.chmod(root, 0o755)
        os.chmod(os.path.join(root, "ok.mp4"), 0o644)
        os.chmod(os.path.join(root, "no access.mp4"), 0o000)
        os.chmod(os.path.join(root, "locked"), 0o000)
        code = ("import json, os, sys\n"
                "from data_pipeline.sources import list_sources\n"
                "from data_pipeline.stages.probe import Rejected, probe\n"
                "got = {}\n"
                "for it in list_sources(sys.argv[1], ['.mp4']):\n"
                "    try:\n"
                "        probe(it.uri)\n"
                "        got[os.path.relpath(it.uri, sys.argv[1])] = ['ok', '']\n"
                "    except Rejected as err:\n"
                "        got[os.path.relpath(it.uri, sys.argv[1])] = [err.reason, err.detail]\n"
                "print(json.dumps(got))\n")
        proc = run_unprivileged(code, root, workdir=work)
        assert proc.returncode == 0, proc.stderr[-3000:]
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        assert got == {"ok.mp4": ["ok", ""], "no access.mp4": ["permission_denied", "EACCES: Permission denied"],
                       "locked": ["permission_denied",
                                  "a directory that cannot be listed: EACCES: Permission denied"]}
    finally:
        for d, dirs, _files in os.walk(work):
            for x in dirs:
                os.chmod(os.path.join(d, x), 0o755)
        shutil.rmtree(work, ignore_errors=True)
