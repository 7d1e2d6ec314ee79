"""The multi-task demo world: one shape per clip, starting anywhere, at any of a range of speeds.

The T2V demo corpus (:mod:`vchitect.demo.corpus`) fixes where a shape starts (15 % of the motion
axis) so that a prompt alone decides the trajectory. The conditional tasks of Many-for-Many need the
opposite: a given first frame, first + last frame, or the frames around a hole must decide where
the shape is, so a model that ignores its condition cannot pass. Here every clip draws

* colour, shape and direction from the demo vocabulary (every combination, the held-out ones too:
  the conditional tasks are judged on positions, and t2v keeps its own corpus);
* a start position uniform over the frame, with the shape wholly inside it;
* a speed between :data:`SPEEDS` (fractions of the frame side per second) along the direction, so
  the shape may leave the frame before the clip ends;
* a background of the demo's.

Clips are drawn at the demo corpus's source format (:data:`~vchitect.demo.corpus.SIZE` px,
:data:`~vchitect.demo.corpus.FPS` fps, :data:`CLIP_SECONDS`) and written losslessly as shards; the
loader samples and resizes them like any clip. Captions are the demo's ("a red circle moves right").

    render_motion_clip(seed)                F×H×W×3 frames + what was drawn, the same for the same seed
    write_motion_shards(out, n, seed)       n clips as {prefix}-{index:06d}.tar + index.json + _SUCCESS
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from data_pipeline.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption_for, draw_shape

from .corpus import FPS, SIZE

CLIP_SECONDS = 2.0
MOTION_RADIUS = 0.2          # of the frame side: room to start anywhere and still be seen whole
SPEEDS = (0.2, 0.4)          # frame sides per second along the direction
PREFIX = "motion"


@dataclass
class MotionClip:
    frames: np.ndarray       # F×H×W×3 uint8
    color: str
    shape: str
    direction: str
    start: tuple[float, float]   # centre at time 0, fractions of the frame side
    speed: float                 # frame sides per second
    background: tuple[int, int, int]
    fps: float
    seed: int

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape, self.direction)

    def centre(self, t: float) -> tuple[float, float]:
        """Centre (x, y) at ``t`` seconds, fractions of the frame side."""
        dx, dy = DIRECTIONS[self.direction]
        return self.start[0] + dx * self.speed * t, self.start[1] + dy * self.speed * t

    def meta(self) -> dict:
        return {"color": self.color, "shape": self.shape, "direction": self.direction,
                "start": [round(v, 6) for v in self.start], "speed": round(self.speed, 6),
                "background": list(self.background), "seed": self.seed, "generator": "vchitect.demo.task_world"}


def render_motion_clip(seed: int, size: int = SIZE, fps: float = FPS, seconds: float = CLIP_SECONDS,
                       radius: float = MOTION_RADIUS, color: str | None = None, direction: str | None = None
                       ) -> MotionClip:
    """One clip drawn from ``seed`` alone (``color`` / ``direction``: fix those instead of drawing them)."""
    rng = random.Random(seed)
    color = color or rng.choice(sorted(COLORS))
    shape = rng.choice(SHAPES)
    direction = direction or rng.choice(sorted(DIRECTIONS))
    start = (rng.uniform(radius, 1 - radius), rng.uniform(radius, 1 - radius))
    speed = rng.uniform(*SPEEDS)
    background = tuple(int(v) for v in rng.choice(BACKGROUNDS))
    clip = MotionClip(np.empty(0), color, shape, direction, start, speed, background, fps, seed)
    n = max(2, int(round(seconds * fps)))
    frames = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        frames[i] = background
        cx, cy = clip.centre(i / fps)
        draw_shape(frames[i], shape, (cx * size, cy * size), radius * size, COLORS[color])
    clip.frames = frames
    return clip


def clip_seed(seed: int, i: int) -> int:
    """The seed of clip ``i`` of a run with ``seed``."""
    return seed * 1_000_003 + i


def clip_members(clip: MotionClip, key: str) -> dict[str, bytes]:
    from data_pipeline.video import encode_frames

    F, H, W, _ = clip.frames.shape
    meta = dict(clip.meta(), key=key, caption=clip.caption, caption_source="synthetic",
                source_uri=f"synthetic://motion/{clip.seed}", start_time=0.0, end=round(F / clip.fps, 4),
                fps=clip.fps, width=W, height=H, num_frames=F)
    return {"mp4": encode_frames(clip.frames, Fraction(clip.fps).limit_denominator(1001), lossless=True),
            "txt": clip.caption.encode(), "json": (json.dumps(meta, sort_keys=True) + "\n").encode()}


def write_motion_shards(out: str, n: int, seed: int = 0, *, samples_per_shard: int = 64, prefix: str = PREFIX,
                        size: int = SIZE, fps: float = FPS, options=None) -> dict:
    """Write ``n`` motion clips as shards under ``out`` in the layout of ``vchitect-curate run``
    (:func:`vchitect.demo.shards.write_sample_shards`); keys ``motion_{clip seed:010d}_0000``."""
    from data_pipeline.writer import sample_key

    from .shards import write_sample_shards

    if n < 1:
        raise ValueError(f"write_motion_shards: n={n}; ask for at least one clip")

    def samples():
        for i in range(n):
            clip = render_motion_clip(clip_seed(seed, i), size=size, fps=fps)
            key = sample_key(f"motion_{clip.seed:010d}", 0)
            yield key, clip_members(clip, key)

    return write_sample_shards(out, prefix, samples(), lambda: {
        "generator": "vchitect.demo.task_world", "seed": seed, "size": size, "fps": fps, "radius": MOTION_RADIUS,
        "speeds": list(SPEEDS)}, samples_per_shard=samples_per_shard, options=options)


__all__ = ["CLIP_SECONDS", "MOTION_RADIUS", "MotionClip", "SPEEDS", "clip_members", "clip_seed",
           "render_motion_clip", "write_motion_shards"]
