"""Synthetic removal pairs (vchitect.demo.removal): the target is the source minus the removed object
(raw pixels exactly; after encode → the training loader's decode within the RGB ↔ YUV rounding, and
exactly equal to the decoded source outside the mask), the mask is the removed object, the shards
follow the contract and the training loader reads them, and the removal probe tells a right removal
from a wrong one on ground truth."""

from __future__ import annotations

import io
import json
import os
import re

import cv2
import numpy as np
import pytest

from data_pipeline.synthetic import COLORS, SHAPES, draw_shape
from vchitect.data.buckets import Bucket
from vchitect.data.decode import decode_video
from vchitect.demo.corpus import position
from vchitect.demo.removal import (LANES, PAIR_RADIUS, REMOVAL_TASK, pair_members, removal_instruction, render_removal_pair,
                                   write_removal_shards)
from vchitect.eval.probe import probe_removal


def _decode(data: bytes, bucket: Bucket, fps: float, seed: int = 0):
    """The training loader's decode (3×F×H×W) → F×H×W×3, and the source frame indices."""
    clip, _, frames = decode_video(data, lambda info: bucket, fps, np.random.default_rng(seed))
    return clip.transpose(1, 2, 3, 0), frames


@pytest.mark.parametrize("seed", range(12))
def test_target_is_the_source_minus_the_removed_object(seed):
    p = render_removal_pair(seed, size=64)
    F, H, W, _ = p.source.shape
    assert p.target.shape == p.source.shape and p.mask.shape == (F, H, W) and F >= 2
    bg = np.array(p.background, np.uint8)
    # outside the mask: the same pixels (background and the kept object); inside: plain background
    assert np.array_equal(p.target[~p.mask], p.source[~p.mask])
    assert (p.target[p.mask] == bg).all()
    # the mask is the removed object drawn alone on the background (the corpus's drawing and trajectory)
    F1 = F - 1
    for i in (0, F1 // 2, F1):
        alone = np.empty((H, W, 3), np.uint8)
        alone[:] = bg
        draw_shape(alone, p.removed["shape"], position(p.removed["direction"], i / F1, p.removed["lane"], W),
                   PAIR_RADIUS * W, COLORS[p.removed["color"]])
        assert np.array_equal(p.mask[i], (alone != bg).any(-1)) and np.array_equal(p.source[i][p.mask[i]], alone[p.mask[i]])
    # the mask is exactly where the source differs from the target, and the removed object is in every frame
    assert np.array_equal(p.mask, (p.source != p.target).any(-1))
    assert p.mask.any(axis=(1, 2)).all()
    # the kept object is in every frame of both and never touches the removed one
    kept = (p.target != bg).any(-1)
    assert kept.any(axis=(1, 2)).all() and not (kept & p.mask).any()
    # colours of the mask's core are the removed colour, of the kept pixels' core the kept colour
    assert (p.source[p.mask] == COLORS[p.removed["color"]]).all(-1).mean() > 0.7
    assert (p.target[kept] == COLORS[p.kept["color"]]).all(-1).mean() > 0.7
    # two different colours and shapes, in the two lanes, instruction naming the removed one
    assert p.removed["color"] != p.kept["color"] and p.removed["shape"] != p.kept["shape"]
    assert p.removed["shape"] in SHAPES and {p.removed["lane"], p.kept["lane"]} == set(LANES)
    assert p.instruction == removal_instruction(p.removed["color"], p.removed["shape"]) == \
        f"remove the {p.removed['color']} {p.removed['shape']}"
    # both objects move: the mask's centroid changes over the shot
    ys, xs = np.nonzero(p.mask[0])
    ye, xe = np.nonzero(p.mask[-1])
    assert np.hypot(xs.mean() - xe.mean(), ys.mean() - ye.mean()) > 0.3 * W


def test_pairs_are_deterministic_and_vary_with_the_seed():
    a, b = render_removal_pair(3, size=32), render_removal_pair(3, size=32)
    assert np.array_equal(a.source, b.source) and np.array_equal(a.mask, b.mask) and a.instruction == b.instruction
    pairs = [render_removal_pair(s, size=32) for s in range(40)]
    assert len({p.instruction for p in pairs}) > 10
    assert {p.removed["direction"] for p in pairs} >= {"left to right", "right to left", "top to bottom",
                                                       "bottom to top"}
    with pytest.raises(ValueError, match="overlap"):
        render_removal_pair(0, size=64, radius=0.3)


def test_encoded_pair_decodes_through_the_loader_within_the_rounding():
    p = render_removal_pair(5)  # the demo's size and fps
    F, H, W, _ = p.source.shape
    m = pair_members(p, "removal_0000000005_0000")
    full = Bucket(H, W, F)
    tgt, ft = _decode(m["mp4"], full, p.fps)
    src, fs = _decode(m["src.mp4"], full, p.fps)
    msk, fm = _decode(m["mask.mp4"], full, p.fps)
    assert ft == fs == fm == list(range(F))
    assert tgt.shape == src.shape == (F, H, W, 3) and msk.shape == (F, H, W, 3)
    # lossless H.264 4:4:4: only the RGB ↔ YUV rounding remains
    assert np.abs(tgt.astype(int) - p.target).max() <= 2
    assert np.abs(src.astype(int) - p.source).max() <= 2
    # equal RGB pixels decode equal: outside the mask the decoded target is the decoded source
    assert np.array_equal(tgt[~p.mask], src[~p.mask])
    assert np.array_equal(msk[..., 0] > 127, p.mask) and (msk.max(-1) - msk.min(-1) <= 2).all()
    # a training bucket that samples and resizes reads the same frames, at the same size, from each
    small = Bucket(32, 32, 8)
    (tgt_s, ft), (src_s, fs), (msk_s, fm) = (_decode(m[k], small, 6.0, seed=7) for k in ("mp4", "src.mp4", "mask.mp4"))
    assert ft == fs == fm and tgt_s.shape == src_s.shape == msk_s.shape == (8, 32, 32, 3)
    far = cv2.dilate(p.mask.astype(np.uint8).max(0), np.ones((9, 9), np.uint8))  # removed object's whole path
    far = cv2.resize(far, (32, 32), interpolation=cv2.INTER_NEAREST) == 0
    assert np.abs(tgt_s[:, far].astype(int) - src_s[:, far]).max() <= 1
    meta = json.loads(m["json"])
    assert meta["task"] == REMOVAL_TASK == "vedit" and meta["instruction"] == p.instruction == m["txt"].decode()
    assert meta["removed"]["color"] == p.removed["color"] and (meta["width"], meta["height"], meta["num_frames"]) == (W, H, F)


def test_shards_follow_the_contract_and_the_loader_reads_them(tmp_path):
    from data_pipeline.cli import main
    from data_pipeline.report import report
    from vchitect.config import from_dict
    from vchitect.data import DataConfig
    from vchitect.data.samples import SampleDecoder
    from vchitect.data.sources import iter_tar

    out = tmp_path / "removal"
    index = write_removal_shards(str(out), 3, seed=1, samples_per_shard=2, size=64)
    assert index["nsamples"] == 3 and [s["nsamples"] for s in index["shards"]] == [2, 1]
    assert json.loads((out / "index.json").read_text()) == index and (out / "_SUCCESS").exists()
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == ["removal-000000.tar", "removal-000001.tar"]
    # the demo's training bucket and fps (configs/train/demo.yaml): 8 frames at 4.5 fps fit in the 2 s pair
    cfg = from_dict(DataConfig, {"sources": [{"uri": str(out)}], "buckets": [{"height": 16, "width": 16, "frames": 8}],
                                 "fps": 4.5, "num_workers": 0, "mode": "decode"})
    dec = SampleDecoder(cfg)
    seen = []
    for shard in index["shards"]:
        with open(out / shard["name"], "rb") as f:
            for key, members, _ in iter_tar(f):
                assert re.fullmatch(r"[A-Za-z0-9_-]+_\d{4}", key), key
                assert set(members) == {"mp4", "src.mp4", "mask.mp4", "txt", "json"}
                s = dec(key, members, 0)
                assert s.caption == members["txt"].decode() and s.caption.startswith("remove the ")
                assert s.arrays["pixels"].shape == (3, 8, 16, 16)
                for ext in ("src.mp4", "mask.mp4"):
                    frames, picked = _decode(members[ext], Bucket(16, 16, 8), 4.5)
                    assert frames.shape == (8, 16, 16, 3) and picked == sorted(picked)
                seen.append(key)
    assert len(seen) == 3
    # same arguments, same bytes; the CLI writes the same shards
    again = write_removal_shards(str(tmp_path / "again"), 3, seed=1, samples_per_shard=2, size=64)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in index["shards"]]
    # a smaller run into the same folder leaves no shard of the larger one behind (the loader reads every tar)
    write_removal_shards(str(tmp_path / "again"), 1, seed=1, samples_per_shard=2, size=64)
    assert sorted(n for n in os.listdir(tmp_path / "again") if n.endswith(".tar")) == ["removal-000000.tar"]
    assert main(["synth", str(tmp_path / "cli"), "--removal", "--n", "2", "--seed", "1"]) == 0
    assert json.loads((tmp_path / "cli" / "index.json").read_text())["nsamples"] == 2
    lines = []
    report(str(out), str(tmp_path / "plots"), echo=lines.append)  # the curation report reads the output
    assert any("clips_written" in line and "3" in line for line in lines), lines


@pytest.mark.parametrize("size", [None, 24, 16])  # 16: the demo trains at 16×16
def test_removal_probe_on_ground_truth(size):
    for seed in range(6):
        p = render_removal_pair(seed, size=64, fps=6.0)
        bg = np.array(p.background, np.uint8)
        kept = (p.target != bg).any(-1)
        wrong = p.source.copy()
        wrong[kept] = bg  # the other object removed
        clips = {"target": p.target, "source": p.source, "wrong": wrong}
        if size:
            clips = {k: np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in v])
                     for k, v in clips.items()}
        color = p.removed["color"]
        right = probe_removal(clips["target"], clips["source"], color)
        assert right.ok and right.removed_absent and right.kept_follows, (seed, right)
        assert right.kept_error < 0.01
        assert probe_removal(clips["target"], clips["source"], color, p.kept["color"]).ok
        unremoved = probe_removal(clips["source"], clips["source"], color)
        assert not unremoved.removed_absent and not unremoved.ok and unremoved.kept_follows
        swapped = probe_removal(clips["wrong"], clips["source"], color, p.kept["color"])
        assert not swapped.removed_absent and not swapped.kept_follows and not swapped.ok
        # the kept object at the wrong place (frames reversed) does not follow the source
        assert not probe_removal(clips["target"][::-1], clips["source"], color).kept_follows
    with pytest.raises(ValueError, match="one shape"):
        probe_removal(p.target[:, :32], p.source, p.removed["color"])
    with pytest.raises(ValueError, match="vocabulary colour"):
        probe_removal(p.target, p.source, "pink")


def test_lossless_encoding_refuses_an_encoder_without_it(monkeypatch):
    import data_pipeline.video as video

    frames = [np.zeros((16, 16, 3), np.uint8)] * 2
    monkeypatch.setattr(video, "pick_h264_encoder", lambda preference="auto": "libopenh264")
    with pytest.raises(RuntimeError, match="lossless=True.*needs libx264"):
        video.encode_frames(frames, 12.0, lossless=True)
