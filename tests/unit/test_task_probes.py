"""The multi-task demo's world and probes (vchitect.demo.task_world, vchitect.demo.tasks_demo,
vchitect.eval.probe): the probes pass ground-truth clips and fail wrong ones, so the learning-proof
figures mean something; the motion clips start anywhere and are written as loader-readable shards."""

from __future__ import annotations

import numpy as np
import pytest

from vchitect.demo.task_world import MOTION_RADIUS, render_motion_clip, write_motion_shards
from vchitect.demo.tasks_demo import FRAMES, SIZE, judge, motion_probes, removal_probes
from vchitect.eval.probe import object_track, probe_i2v, segment_distance

N = 12


@pytest.fixture(scope="module", params=["i2v", "itrans", "vinp"])
def probes(request):
    return request.param, motion_probes(request.param, N, seed=123)


def test_probes_pass_ground_truth(probes):
    task, ps = probes
    truth = np.stack([p.truth for p in ps])
    figs = judge(task, ps, truth)["figures"]
    assert figs["n"] == N and figs["ok"] == 1.0
    if task == "i2v":
        assert figs["color"] == 1.0 and figs["direction"] == 1.0


def test_probes_fail_a_model_that_ignores_the_condition(probes):
    """The same clips with the object somewhere else (another probe's clip, same colour forced) fail."""
    task, ps = probes
    elsewhere = []
    for p in ps:
        # the object drawn from another start: what a T2V model that ignores the given frames draws
        other = render_motion_clip(p.meta["seed"] + 50_000, color=p.meta["color"], direction=p.meta["direction"])
        from vchitect.demo.task_world import clip_members
        from vchitect.demo.tasks_demo import _decode

        elsewhere.append(_decode(clip_members(other, "x")["mp4"], 0)[0])
    figs = judge(task, ps, np.stack(elsewhere))["figures"]
    assert figs["ok"] <= 0.5, figs


def test_probes_fail_an_empty_output(probes):
    task, ps = probes
    blank = np.stack([np.broadcast_to(p.truth[:, :1, :1], p.truth.shape) for p in ps])  # background only
    assert judge(task, ps, blank)["figures"]["ok"] == 0.0


def test_i2v_probe_reports_the_direction_and_colour():
    p = motion_probes("i2v", 1, seed=5)[0]
    wrong_colour = p.truth[..., ::-1].copy()  # RGB → BGR: another vocabulary colour
    r = probe_i2v(wrong_colour, p.truth[0], p.meta["color"])
    assert not r.color_kept
    reversed_clip = p.truth[::-1].copy()
    r2 = probe_i2v(reversed_clip, p.truth[-1] if object_track(p.truth[-1:], p.meta["color"])[1][0] else p.truth[0],
                   p.meta["color"])
    assert r2.direction is not None and r2.direction != p.meta["direction"]


@pytest.mark.parametrize("radius", [None, 0.21])  # the pairs' default and the multi-task demo's larger objects
def test_removal_probes_pass_the_target_and_fail_the_source(radius):
    ps = removal_probes(6, seed=77, radius=radius)
    assert judge("vedit", ps, np.stack([p.meta["target"] for p in ps]))["figures"]["ok"] == 1.0
    assert judge("vedit", ps, np.stack([p.truth for p in ps]))["figures"]["ok"] == 0.0


def test_vinp_hole_hides_the_object_in_the_middle_frames():
    for p in motion_probes("vinp", 6, seed=9):
        hole = p.mask == 0
        assert not hole[0].any() and not hole[-1].any() and hole[FRAMES // 2].any()
        assert (p.condition[hole] == 0).all() and (p.condition[~hole] == p.truth[~hole]).all()


def test_segment_distance():
    a, b = np.array([0.0, 0.0]), np.array([10.0, 0.0])
    assert segment_distance(np.array([5.0, 3.0]), a, b) == 3.0
    assert segment_distance(np.array([-4.0, 3.0]), a, b) == 5.0   # beyond the end: distance to the end


def test_motion_clips_start_anywhere_and_are_deterministic():
    clips = [render_motion_clip(s) for s in range(40)]
    starts = np.array([c.start for c in clips])
    assert (starts >= MOTION_RADIUS).all() and (starts <= 1 - MOTION_RADIUS).all()
    assert starts[:, 0].std() > 0.1 and starts[:, 1].std() > 0.1
    assert np.array_equal(render_motion_clip(3).frames, clips[3].frames)
    c = clips[0]
    xy, inside = object_track(c.frames, c.color)
    assert inside[0]
    side = c.frames.shape[1]
    assert np.allclose(xy[0] / side, c.start, atol=0.02)


def test_motion_shards_decode_in_the_loader(tmp_path):
    from vchitect.config import from_dict
    from vchitect.data import DataConfig, build_loader

    write_motion_shards(str(tmp_path / "m"), 6, seed=1, samples_per_shard=4)
    assert (tmp_path / "m" / "_SUCCESS").exists()
    cfg = from_dict(DataConfig, {"sources": [{"uri": str(tmp_path / "m")}], "mode": "decode", "fps": 4.5,
                                 "buckets": [{"height": SIZE, "width": SIZE, "frames": FRAMES}], "token_budget": 4 * 128,
                                 "latent_channels": 3, "vae_spatial_factor": 1, "vae_temporal_factor": 1,
                                 "patch_size": 4, "num_workers": 0, "text": {"max_length": 8, "dim": 8, "pooled_dim": 8},
                                 "tasks": {"i2v": 1.0}})
    b = next(iter(build_loader(cfg)))
    assert b["pixels"].shape[1:] == (3, FRAMES, SIZE, SIZE)
    assert all(c.endswith("#task: image-to-video") and " moves " in c for c in b["captions"])


def test_probe_conditions_are_what_the_pipeline_builds_from_its_inputs():
    """The demo samples its probes through VchitectPipeline(task=…, image=/video=/mask=): the condition
    the pipeline makes from those inputs is the probe's own, pixel for pixel."""
    from vchitect.data.tasks import TASKS
    from vchitect.demo.tasks_demo import PIPE_INPUTS
    from vchitect.export.task_inputs import task_conditions

    for p in [*(q for t in ("i2v", "itrans", "vinp") for q in motion_probes(t, 2, seed=31)), *removal_probes(2)]:
        cond, mask = task_conditions(TASKS[p.task], 1, FRAMES, SIZE, SIZE, **PIPE_INPUTS[p.task](p))
        assert np.array_equal(np.asarray(mask[0, 0]), p.mask), p.task
        assert np.array_equal(np.asarray(cond[0]).transpose(1, 2, 3, 0), p.condition), p.task
