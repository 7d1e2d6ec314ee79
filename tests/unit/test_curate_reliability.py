"""Curation faults without Ray: completion records that must not run code, rotated sources,
non-regular inputs and permission errors (issue #14)."""

from __future__ import annotations

import json
import os

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
