"""Synthetic shots with exact depth, for the Many-for-Many ``depth`` task, in the shard contract.

A depth shot is one shot of the demo world (:mod:`vchitect.demo.corpus`: one shape of the corpus's
vocabulary crossing a plain background) together with its depth map per frame, known exactly
because the scene is defined that way. The map is already in the form the curation depth stage
writes (``depth.mp4``: grey levels 0..255 per clip, near = bright, docs/curation.md):

* the background is a plane tilted away from the camera: its level falls linearly from
  ``near_level`` at the shot's near edge to 0 at the opposite, far edge (``far_edge``: top, bottom,
  left or right; ``near_level`` 64..160, both drawn per shot), like a floor seen from above the
  horizon — so the map is not the shape's mask;
* the shape is a flat card in front of everything, at level 255 (nearer than any background point),
  over the shot;
* a pixel at the shape's anti-aliased edge blends the two by the shape's coverage, as its colour
  blends the shape's colour with the background's: ``round(bg · (255 − a) / 255 + a)`` for coverage
  ``a`` (0..255, the shape drawn in white on black with the same call).

Each frame thus spans 0 (the far edge, never wholly covered: the shape is narrower than the frame)
to 255 (the shape's centre, always inside the frame), which is what the stage's per-clip normalisation gives. A shard sample: ``mp4`` (the shot),
``depth.mp4`` (:func:`data_pipeline.video.encode_grey`: decodes to the levels exactly), ``txt`` (the
corpus caption, e.g. ``a red circle moves right``) and ``json`` (``task: "depth"``, the scene's
parameters under ``depth``, the usual container fields).

    render_depth_shot(seed)              one shot, the same for the same seed
    write_depth_shards(out, n, seed)     n shots as {prefix}-{index:06d}.tar + index.json + _SUCCESS
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from data_pipeline.synthetic import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption_for, draw_shape

from .corpus import FPS, OFFSETS, RADIUS, SHOT_SECONDS, SIZE, trajectory

DEPTH_TASK = "depth"
FAR_EDGES = ("top", "bottom", "left", "right")
NEAR_LEVELS = (64, 160)  # range of the background's level at its near edge
OBJECT_LEVEL = 255
PREFIX = "depth"
ENCODING = "grey H.264 4:4:4 full range qp 0 (lossless): R = G = B = depth level, near = 255"


@dataclass
class DepthShot:
    frames: np.ndarray  # F×H×W×3 uint8: the shot
    depth: np.ndarray   # F×H×W uint8: its depth levels, near = 255
    caption: str
    color: str
    shape: str
    direction: str
    offset: float
    background: tuple[int, int, int]
    far_edge: str
    near_level: int
    fps: float
    seed: int

    def meta(self) -> dict:
        """The sample's json fields (besides key and the container facts)."""
        return {"task": DEPTH_TASK, "color": self.color, "shape": self.shape, "direction": self.direction,
                "offset": self.offset, "background": list(self.background), "seed": self.seed,
                "depth": {"source": "synthetic", "far_edge": self.far_edge, "background_levels": [0, self.near_level],
                          "object_level": OBJECT_LEVEL, "encoding": ENCODING}}


def background_levels(size: int, far_edge: str, near_level: int) -> np.ndarray:
    """H×W uint8: the tilted background plane, 0 at ``far_edge``, ``near_level`` at the opposite edge."""
    ramp = np.rint(np.linspace(0.0, near_level, size)).astype(np.uint8)  # 0 → near, along the axis
    if far_edge in ("bottom", "right"):
        ramp = ramp[::-1]
    return np.repeat(ramp[:, None], size, 1) if far_edge in ("top", "bottom") else np.repeat(ramp[None], size, 0)


def render_depth_shot(seed: int, size: int = SIZE, fps: float = FPS, seconds: float = SHOT_SECONDS,
                      radius: float = RADIUS) -> DepthShot:
    """One shot of the demo world and its exact depth, drawn from ``seed`` alone (same seed, same pixels)."""
    rng = random.Random(seed)
    color, shape, direction = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.choice(sorted(DIRECTIONS))
    offset, background = rng.choice(OFFSETS), tuple(int(v) for v in rng.choice(BACKGROUNDS))
    far_edge, near_level = rng.choice(FAR_EDGES), rng.randint(*NEAR_LEVELS)
    bg = background_levels(size, far_edge, near_level).astype(np.int32)
    n = max(2, int(round(seconds * fps)))
    frames, depth = [], []
    for center in trajectory(direction, n, size, offset):
        img = np.empty((size, size, 3), np.uint8)
        img[:] = background
        draw_shape(img, shape, center, radius * size, COLORS[color])
        cover = np.zeros((size, size, 3), np.uint8)  # the same call in white on black: the coverage
        draw_shape(cover, shape, center, radius * size, (255, 255, 255))
        a = cover[..., 0].astype(np.int32)
        # round(bg · (255 − a) / 255 + 255 · a / 255) in integers (half up)
        depth.append(((bg * (255 - a) + OBJECT_LEVEL * a) * 2 + 255) // 510)
        frames.append(img)
    return DepthShot(np.stack(frames), np.stack(depth).astype(np.uint8), caption_for(color, shape, direction),
                     color, shape, direction, offset, background, far_edge, near_level, fps, seed)


def shot_seed(seed: int, i: int) -> int:
    """The seed of shot ``i`` of a run with ``seed``."""
    return seed * 1_000_003 + i


def shot_members(shot: DepthShot, key: str) -> dict[str, bytes]:
    """The shard members of one shot: mp4, depth.mp4, txt, json."""
    from data_pipeline.video import encode_frames, encode_grey

    rate = Fraction(shot.fps).limit_denominator(1001)
    F, H, W, _ = shot.frames.shape
    meta = dict(shot.meta(), key=key, caption=shot.caption, caption_source="synthetic",
                source_uri=f"synthetic://depth/{shot.seed}", start=0.0, end=round(F / shot.fps, 4), fps=shot.fps,
                width=W, height=H, num_frames=F)
    return {"mp4": encode_frames(shot.frames, rate, lossless=True), "depth.mp4": encode_grey(shot.depth, rate),
            "txt": shot.caption.encode(), "json": (json.dumps(meta, sort_keys=True) + "\n").encode()}


def write_depth_shards(out: str, n: int, seed: int = 0, *, samples_per_shard: int = 64, prefix: str = PREFIX,
                       size: int = SIZE, fps: float = FPS, options=None) -> dict:
    """Write ``n`` depth shots as WebDataset shards under ``out`` (local or ``s3://``), in the layout of
    ``vchitect-curate run`` (:func:`vchitect.demo.shards.write_sample_shards`). Sample keys
    ``depth_{shot seed:010d}_0000``. Same arguments → same bytes. Returns the index."""
    from data_pipeline.writer import sample_key

    from .shards import write_sample_shards

    if n < 1:
        raise ValueError(f"write_depth_shards: n={n}; ask for at least one shot")

    def samples():
        for i in range(n):
            shot = render_depth_shot(shot_seed(seed, i), size=size, fps=fps)
            key = sample_key(f"depth_{shot.seed:010d}", 0)
            yield key, shot_members(shot, key)

    return write_sample_shards(out, prefix, samples(), lambda: {
        "generator": "vchitect.demo.depth", "task": DEPTH_TASK, "seed": seed, "size": size, "fps": fps},
        samples_per_shard=samples_per_shard, options=options)


__all__ = ["DEPTH_TASK", "FAR_EDGES", "NEAR_LEVELS", "OBJECT_LEVEL", "DepthShot", "background_levels",
           "render_depth_shot", "shot_members", "shot_seed", "write_depth_shards"]
