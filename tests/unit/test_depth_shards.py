"""Synthetic shots with exact depth (vchitect.demo.depth, `vchitect-curate synth --depth`): the depth map
is the scene's (the tilted background plane, the shape in front at 255), depth.mp4 decodes to it
exactly, and the training loader builds the depth task's condition from those shards at the clip's
frames."""

from __future__ import annotations

import io
import json
import os

import av
import numpy as np
import pytest

from data_pipeline.synthetic import COLORS
from vchitect.data.buckets import Bucket
from vchitect.data.decode import decode_video
from vchitect.demo.depth import (DEPTH_TASK, FAR_EDGES, OBJECT_LEVEL, background_levels, render_depth_shot,
                                 shot_members, write_depth_shards)


def _grey_frames(data: bytes) -> np.ndarray:
    """Every frame of a grey mp4 as PyAV decodes it to RGB: F×H×W×3."""
    with av.open(io.BytesIO(data)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.mark.parametrize("seed", range(8))
def test_the_depth_map_is_the_scenes(seed):
    s = render_depth_shot(seed, size=64)
    F, H, W, _ = s.frames.shape
    assert s.depth.shape == (F, H, W) and s.depth.dtype == np.uint8 and F >= 2
    plane = background_levels(H, s.far_edge, s.near_level)
    bg = (s.frames == np.array(s.background, np.uint8)).all(-1)  # pixels the shape does not touch
    core = (s.frames == np.array(COLORS[s.color], np.uint8)).all(-1)  # wholly covered by the shape
    assert bg.any(axis=(1, 2)).all() and core.any(axis=(1, 2)).all()
    for f in range(F):
        assert np.array_equal(s.depth[f][bg[f]], plane[bg[f]])  # the tilted plane behind
        assert (s.depth[f][core[f]] == OBJECT_LEVEL).all()  # the card in front
        edge = ~bg[f] & ~core[f]  # anti-aliased rim: between the plane and the card
        assert (s.depth[f][edge] >= plane[edge]).all() and (s.depth[f][edge] <= OBJECT_LEVEL).all()
        assert s.depth[f].min() == 0 and s.depth[f].max() == 255  # normalised per frame, as the stage does per clip
    # the plane: 0 at the far edge, near_level at the opposite one, monotone between (not the shape's mask)
    far = {"top": plane[0], "bottom": plane[-1], "left": plane[:, 0], "right": plane[:, -1]}[s.far_edge]
    near = {"top": plane[-1], "bottom": plane[0], "left": plane[:, -1], "right": plane[:, 0]}[s.far_edge]
    assert (far == 0).all() and (near == s.near_level).all() and 64 <= s.near_level <= 160
    assert len(np.unique(s.depth[0][bg[0]])) > 20


def test_shots_are_deterministic_and_vary_with_the_seed():
    a, b = render_depth_shot(4, size=32), render_depth_shot(4, size=32)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.depth, b.depth) and a.caption == b.caption
    shots = [render_depth_shot(s, size=32) for s in range(40)]
    assert {s.far_edge for s in shots} == set(FAR_EDGES) and len({s.near_level for s in shots}) > 10
    assert len({s.caption for s in shots}) > 10


def test_depth_member_decodes_to_the_rendered_depth_exactly(tmp_path):
    from data_pipeline.cli import main
    from vchitect.data.sources import iter_tar

    out = tmp_path / "depth"
    index = write_depth_shards(str(out), 3, seed=2, samples_per_shard=2, size=64)
    assert index["nsamples"] == 3 and [s["nsamples"] for s in index["shards"]] == [2, 1] and (out / "_SUCCESS").exists()
    seen = 0
    for shard in index["shards"]:
        with open(out / shard["name"], "rb") as f:
            for key, members, _ in iter_tar(f):
                assert set(members) == {"mp4", "depth.mp4", "txt", "json"}
                meta = json.loads(members["json"])
                shot = render_depth_shot(meta["seed"], size=64)
                got = _grey_frames(members["depth.mp4"])
                assert all(np.array_equal(got[..., c], shot.depth) for c in range(3)), key  # exact, R = G = B
                F = shot.depth.shape[0]
                px, _, _ = decode_video(members["depth.mp4"], lambda i: Bucket(64, 64, F), 1.0,
                                        np.random.default_rng(0), indices=list(range(F)))
                assert np.array_equal(px[0], shot.depth)  # the training loader's decode too
                with av.open(io.BytesIO(members["mp4"])) as c:
                    assert sum(1 for _ in c.decode(video=0)) == F == meta["num_frames"]
                assert meta["task"] == DEPTH_TASK and members["txt"].decode() == shot.caption == meta["caption"]
                assert meta["depth"]["far_edge"] == shot.far_edge and meta["depth"]["object_level"] == 255
                seen += 1
    assert seen == 3
    # same arguments, same bytes; the CLI writes the same shards
    assert shot_members(render_depth_shot(7, size=32), "k") == shot_members(render_depth_shot(7, size=32), "k")
    assert main(["synth", str(tmp_path / "cli"), "--depth", "--n", "3", "--seed", "2"]) == 0
    again = write_depth_shards(str(tmp_path / "again"), 3, seed=2)
    assert json.loads((tmp_path / "cli" / "index.json").read_text()) == again
    assert sorted(os.listdir(tmp_path / "cli")) == ["_SUCCESS", "depth-000000.tar", "index.json", "rejected.jsonl",
                                                     "stats.json"]


def test_loader_builds_the_depth_condition_from_synth_shards(tmp_path):
    """Decode mode through build_loader, data.tasks {depth: 1} with the default depth member: every
    condition frame is the rendered depth (grey, all known) of the source frame its pixels come from."""
    from vchitect.config import from_dict
    from vchitect.data import DataConfig, build_loader

    out = tmp_path / "depth"
    write_depth_shards(str(out), 4, seed=3, samples_per_shard=2, size=64)
    cfg = from_dict(DataConfig, {"sources": [{"uri": str(out)}], "buckets": [{"height": 64, "width": 64, "frames": 8}],
                                 "fps": 4.5, "num_workers": 0, "mode": "decode", "token_budget": 64,
                                 "latent_channels": 3, "vae_spatial_factor": 1, "vae_temporal_factor": 1,
                                 "patch_size": 4, "text": {"max_length": 8, "dim": 8, "pooled_dim": 8},
                                 "tasks": {"depth": 1.0}})
    cfg.validate()
    it = iter(build_loader(cfg))
    checked = 0
    while checked < 4:
        b = next(it)
        assert b["tasks"] == ["depth"] * len(b["keys"]) and b["condition_mask"].bool().all()
        for i, key in enumerate(b["keys"]):
            shot = render_depth_shot(int(key.split("_")[1]), size=64)
            cond, pixels = b["condition"][i].numpy(), b["pixels"][i].numpy()  # 3×8×64×64 each
            assert b["captions"][i] == f"{shot.caption} #task: depth-to-video"
            picked = []
            for f in range(cond.shape[1]):
                assert (cond[0, f] == cond[1, f]).all() and (cond[1, f] == cond[2, f]).all()
                match = [j for j in range(len(shot.depth)) if np.array_equal(cond[0, f], shot.depth[j])]
                assert len(match) == 1, (key, f)  # exactly one rendered frame's depth
                err = [np.abs(pixels[:, f].transpose(1, 2, 0).astype(int) - fr).mean() for fr in shot.frames]
                assert int(np.argmin(err)) == match[0]  # ... the one the pixels are
                picked.append(match[0])
            assert picked == sorted(picked) and picked[-1] - picked[0] >= 17  # 8 frames at 4.5 fps span 1.56 s of 12 fps
            checked += 1
