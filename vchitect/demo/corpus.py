"""The demo's raw corpus: the synthetic generator's shots, arranged so that motion is learnable on CPU.

``vchitect-curate synth`` draws every shot at random (colour, shape, direction, background, an
offset across the motion axis, 1.6–2.6 s). The demo keeps its vocabulary, drawing routine, encoder
and planted defects (:mod:`data_pipeline.synthetic`) and fixes what makes motion hard to learn in a
few minutes on 2 cores (see docs/demo.md):

* every clean shot lasts about :data:`SHOT_SECONDS` (one of :data:`SHOT_LENGTHS`), so a clip sampled
  at the training fps spans nearly the whole shot and the trajectory depends on the direction
  (start at 15 % of the axis, end at 85 %), not on a random start;
* the shape crosses at one of a few fixed positions across the motion axis (:data:`OFFSETS`); the
  small variation in speed and position also keeps the curation's perceptual-hash dedup from
  taking different clips for copies of each other;
* shapes are larger than the generator's (radius :data:`RADIUS` of the frame side instead of 0.16);
* colour × direction combinations in :data:`HELD_OUT` never appear in training; the probe reports
  accuracy on them separately.
"""

from __future__ import annotations

import json
import os
import random
from fractions import Fraction

import numpy as np

from data_pipeline.synthetic import (BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, Shot, caption_for, draw_shape,
                                     generate_corpus)
from data_pipeline.video import encode_frames

SIZE = 128            # square source frames (no crop at the square training bucket)
FPS = 12.0
SHOT_SECONDS = 2.0
SHOT_LENGTHS = (1.9, 2.0, 2.1)   # seconds
OFFSETS = (0.4, 0.5, 0.6)        # position across the motion axis, fraction of the frame
RADIUS = 0.30         # of the frame side (docs/demo.md: 0.22 learnt direction later, and not by 1800 steps with some seeds)
# One held-out colour per direction; every colour and every direction is still seen in training.
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("red", "bottom to top"),
    ("green", "right to left"),
    ("blue", "top to bottom"),
    ("yellow", "left to right"),
)


def training_combos() -> list[tuple[str, str]]:
    return [(c, d) for c in sorted(COLORS) for d in sorted(DIRECTIONS) if (c, d) not in HELD_OUT]


def position(direction: str, progress: float, offset: float = 0.5, size: float = 1.0,
             begin: float = 0.15, span: float = 0.7) -> tuple[float, float]:
    """Centre (x, y) of the shape ``progress`` (0 → 1) through its shot, in units of ``size``: it
    moves from ``begin`` to ``begin + span`` of the frame along the direction's axis (15 % → 85 %,
    as the generator) at ``offset`` across it. The one trajectory formula of the demo (the corpus
    and benchmarks/demo_ablation.py)."""
    dx, dy = DIRECTIONS[direction]
    along = begin + span * progress
    a = size * (along if (dx > 0 or dy > 0) else 1 - along)
    return (a, size * offset) if dx else (size * offset, a)


def trajectory(direction: str, n: int, size: int, offset: float = 0.5) -> list[tuple[float, float]]:
    """Centre of the shape in each of ``n`` frames, spread evenly over the shot (:func:`position`)."""
    return [position(direction, i / max(1, n - 1), offset, size) for i in range(n)]


def render_demo_shot(shot: Shot, size: int = SIZE, fps: float = FPS, radius: float = RADIUS) -> list[np.ndarray]:
    n = max(2, int(round(shot.seconds * fps)))
    frames = []
    for center in trajectory(shot.direction, n, size, shot.offset):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = shot.background
        draw_shape(img, shot.shape, center, radius * size, COLORS[shot.color])
        frames.append(img)
    return frames


def _clean_shots(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    """``count`` (colour, shape, direction) triples cycling over every training combination."""
    pool = [(c, s, d) for c, d in training_combos() for s in SHAPES]
    out: list[tuple[str, str, str]] = []
    while len(out) < count:
        block = list(pool)
        rng.shuffle(block)
        out.extend(block)
    return out[:count]


def _defects_seed(out: str, seed: int) -> dict:
    """The generator's planted defects (and its one clean video), with a seed whose clean shots avoid
    the held-out combinations."""
    for s in range(seed, seed + 100):
        truth = generate_corpus(out, n=1, seed=s, width=SIZE, height=SIZE, fps=FPS)
        kept = [(t["color"], t["direction"]) for t in truth["shots"] if t["expected"] == "kept"]
        if not any(k in HELD_OUT for k in kept):
            return truth
    raise RuntimeError("no generator seed keeps the held-out combinations out of the defect corpus")


def write_demo_corpus(out: str, n_videos: int = 48, shots_per_video: int = 3, seed: int = 0) -> dict:
    """Write the generator's defects plus ``n_videos`` clean multi-shot videos under ``out``.

    Same layout as ``vchitect-curate synth``: ``out/videos/*.mp4``, ``out/manifest.jsonl`` (timed
    captions) and ``out/truth.json``. Returns the truth.
    """
    truth = _defects_seed(out, seed)
    rng = random.Random(seed)
    with open(os.path.join(out, "manifest.jsonl")) as f:
        manifest = [json.loads(line) for line in f]
    triples = iter(_clean_shots(rng, n_videos * shots_per_video))
    for v in range(n_videos):
        name = f"demo_{v:04d}.mp4"
        bgs = rng.sample(BACKGROUNDS, shots_per_video)
        frames: list[np.ndarray] = []
        segments = []
        for i in range(shots_per_video):
            color, shape, direction = next(triples)
            shot = Shot(color, shape, direction, bgs[i], rng.choice(SHOT_LENGTHS), offset=rng.choice(OFFSETS))
            start = len(frames) / FPS
            frames.extend(render_demo_shot(shot))
            segments.append({"start": round(start, 4), "end": round(len(frames) / FPS, 4),
                             "caption": shot.caption})
            truth["shots"].append({"file": name, "shot": i, "start": segments[-1]["start"],
                                   "end": segments[-1]["end"], "caption": shot.caption, "color": color,
                                   "shape": shape, "direction": direction, "expected": "kept"})
        data = encode_frames(frames, Fraction(FPS).limit_denominator(1001), crf=18, preset="veryfast")
        with open(os.path.join(out, "videos", name), "wb") as f:
            f.write(data)
        manifest.append({"uri": f"videos/{name}", "segments": segments})
        truth["videos"].append({"file": name, "defect": None})
    truth["expected_clips"] = sum(s["expected"] == "kept" for s in truth["shots"])
    truth["held_out"] = [list(k) for k in HELD_OUT]
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        for row in manifest:
            f.write(json.dumps(row) + "\n")
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    return truth


__all__ = ["FPS", "HELD_OUT", "OFFSETS", "RADIUS", "SHOT_LENGTHS", "SHOT_SECONDS", "SIZE", "caption_for", "render_demo_shot",
           "position", "training_combos", "trajectory", "write_demo_corpus"]
