"""The probe classifies the synthetic generator's own clips 100 % correctly, so its accuracy on
generated videos means something."""

import itertools
import random

import cv2
import numpy as np
import pytest

from data_pipeline.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, Shot, caption_for, render_shot
from vchitect.eval.probe import parse_prompt, probe_video, score


def _resize(frames, size):
    return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in frames])


@pytest.mark.parametrize("size", [16, 64])
def test_probe_is_right_on_every_generator_clip(size):
    rng = random.Random(0)
    prompts, results = [], []
    for color, direction, bg in itertools.product(COLORS, DIRECTIONS, BACKGROUNDS):
        shot = Shot(color, rng.choice(SHAPES), direction, bg, seconds=1.0, offset=rng.uniform(0.35, 0.65))
        frames = _resize(render_shot(shot, 96, 96, fps=8.0), size)  # 8 frames, as the demo trains on
        prompts.append(shot.caption)
        results.append(probe_video(frames))
    acc = score(prompts, results)["train"]
    assert acc["n"] == len(COLORS) * len(DIRECTIONS) * len(BACKGROUNDS)
    assert acc["color"] == 1.0 and acc["direction"] == 1.0


def test_probe_on_the_demo_corpus_shots():
    from vchitect.demo.corpus import render_demo_shot

    for color, direction, shape in itertools.product(COLORS, DIRECTIONS, SHAPES):
        shot = Shot(color, shape, direction, BACKGROUNDS[hash(color + direction) % len(BACKGROUNDS)], 2.0)
        frames = _resize(render_demo_shot(shot)[::3], 16)
        r = probe_video(frames)
        assert (r.color, r.direction) == (color, direction), shot.caption


def test_blank_and_static_videos_have_no_direction():
    blank = np.full((8, 16, 16, 3), 200, np.uint8)
    assert probe_video(blank).color is None and probe_video(blank).direction is None
    static = blank.copy()
    static[:, 6:10, 6:10] = COLORS["red"]
    r = probe_video(static)
    assert r.color == "red" and r.direction is None


def test_score_splits_held_out_combinations():
    from vchitect.eval.probe import ProbeResult

    prompts = [caption_for("red", "circle", "left to right"), caption_for("blue", "square", "top to bottom")]
    results = [ProbeResult("red", "left to right", 0.1, (1, 0), (220, 30, 30)),
               ProbeResult("blue", "bottom to top", 0.1, (0, -1), (40, 70, 225))]
    s = score(prompts, results, held_out=[("blue", "top to bottom")])
    assert s["train"] == {"n": 1, "color": 1.0, "direction": 1.0, "both": 1.0}
    assert s["held_out"] == {"n": 1, "color": 1.0, "direction": 0.0, "both": 0.0}
    assert parse_prompt("A purple triangle moves from bottom to top.")["direction"] == "bottom to top"
    assert parse_prompt("a blue square moves up") == {"color": "blue", "shape": "square", "direction": "bottom to top"}
    assert parse_prompt("a red circle moves sideways") is None
    assert parse_prompt("a cat") is None


def test_captions_use_an_before_vowels_and_the_probe_reads_both_articles():
    from vchitect.demo.run import _slug, showcase_prompts

    assert caption_for("orange", "square", "left to right") == "an orange square moves right"
    assert caption_for("red", "square", "left to right") == "a red square moves right"
    assert not any(p.startswith("a orange") for p in showcase_prompts())
    want = {"color": "orange", "shape": "square", "direction": "left to right"}
    assert parse_prompt("an orange square moves right") == want
    assert parse_prompt("a orange square moves right") == want  # older captions still parse
    assert _slug("an orange square moves right") == _slug("a orange square moves right") == "orange_square_right"
