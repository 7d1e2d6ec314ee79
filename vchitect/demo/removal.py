"""Synthetic removal pairs (ROVI-style, instruction-driven object removal) in the shard contract.

A pair is two renders of one shot of the demo world (:mod:`vchitect.demo.corpus`): the *source*
shows two objects (different colours, different shapes), each moving along the same axis in its
own lane, so they never overlap; the *target* is the same shot without one of them: the same
background, the other object's pixels unchanged. The instruction names the removed object in the
corpus's vocabulary ("remove the blue square"); the mask marks the removed object's pixels in each
frame.

A shard sample (docs/data.md, "Removal pairs"): ``mp4`` = the target, ``src.mp4`` = the source,
``mask.mp4`` = the mask (white = the removed object), ``txt`` = the instruction, ``json`` = what was
rendered (``task: "vedit"``, ``removed``, ``kept`` …). The three videos are encoded without loss
but for the RGB ↔ YUV rounding (:func:`data_pipeline.video.encode_frames` ``lossless``), so the
decoded target is the decoded source outside the mask, exactly.

    render_removal_pair(seed)              one pair, the same for the same seed
    write_removal_shards(out, n, seed)     n pairs as {prefix}-{index:06d}.tar + index.json + _SUCCESS
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from data_pipeline.synthetic import BACKGROUNDS, COLORS, SHAPES, draw_shape

from .corpus import FPS, SIZE, position

REMOVAL_TASK = "vedit"               # MfM's task key for video editing; removal is one kind of it
REMOVAL_TASK_NAME = "video editing"  # its full name, what the caption's "#task:" suffix carries
PAIR_SECONDS = 2.0
PAIR_RADIUS = 0.17                   # of the frame side: two lanes of this radius fit without touching
LANES = (0.27, 0.73)                 # the two objects' positions across the motion axis
AXES = {"horizontal": ("left to right", "right to left"), "vertical": ("top to bottom", "bottom to top")}
PREFIX = "removal"


def removal_instruction(color: str, shape: str) -> str:
    """The instruction of a removal pair: "remove the blue square"."""
    return f"remove the {color} {shape}"


@dataclass
class RemovalPair:
    source: np.ndarray       # F×H×W×3 uint8: both objects
    target: np.ndarray       # F×H×W×3 uint8: the source without the removed object
    mask: np.ndarray         # F×H×W bool: the removed object's pixels
    instruction: str
    removed: dict            # {"color", "shape", "direction", "lane"}
    kept: dict               # the other object, same fields
    background: tuple[int, int, int]
    fps: float
    seed: int

    def meta(self) -> dict:
        """The sample's json fields (besides key and the container facts the writer adds)."""
        return {"task": REMOVAL_TASK, "task_name": REMOVAL_TASK_NAME, "instruction": self.instruction,
                "removed": self.removed, "kept": self.kept, "background": list(self.background),
                "seed": self.seed}


def _draw(size: int, background, obj: dict, progress: float, radius: float) -> np.ndarray:
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    draw_shape(img, obj["shape"], position(obj["direction"], progress, obj["lane"], size), radius,
               COLORS[obj["color"]])
    return img


def render_removal_pair(seed: int, size: int = SIZE, fps: float = FPS, seconds: float = PAIR_SECONDS,
                        radius: float = PAIR_RADIUS) -> RemovalPair:
    """One removal pair, drawn from ``seed`` alone (same seed, same pixels).

    Two objects of different colours and shapes cross the frame along one axis (each in its own
    direction) in the two :data:`LANES`; one of them is removed. Raises ValueError when ``radius``
    is too large for the lanes to keep the objects apart.
    """
    rng = random.Random(seed)
    colors = rng.sample(sorted(COLORS), 2)
    shapes = rng.sample(SHAPES, 2)
    axis = rng.choice(sorted(AXES))
    lanes = list(LANES)
    rng.shuffle(lanes)
    objs = [{"color": c, "shape": s, "direction": rng.choice(AXES[axis]), "lane": lane}
            for c, s, lane in zip(colors, shapes, lanes)]
    removed, kept = objs if rng.random() < 0.5 else objs[::-1]
    background = tuple(int(v) for v in rng.choice(BACKGROUNDS))
    r = radius * size
    n = max(2, int(round(seconds * fps)))
    src, tgt, msk = [], [], []
    for i in range(n):
        p = i / (n - 1)
        with_kept = _draw(size, background, kept, p, r)          # H×W×3
        with_removed = _draw(size, background, removed, p, r)
        kept_px = (with_kept != background).any(-1)             # H×W
        removed_px = (with_removed != background).any(-1)
        if (kept_px & removed_px).any():
            raise ValueError(f"removal pair {seed}: the objects overlap in frame {i} (radius {radius} of the "
                             f"frame side is too large for lanes {LANES}); use a smaller radius")
        source = with_kept.copy()
        source[removed_px] = with_removed[removed_px]
        src.append(source)
        tgt.append(with_kept)
        msk.append(removed_px)
    return RemovalPair(np.stack(src), np.stack(tgt), np.stack(msk),
                       removal_instruction(removed["color"], removed["shape"]), removed, kept,
                       background, fps, seed)


def pair_seed(seed: int, i: int) -> int:
    """The seed of pair ``i`` of a run with ``seed`` (runs with different seeds draw different pairs)."""
    return seed * 1_000_003 + i


def pair_members(pair: RemovalPair, key: str) -> dict[str, bytes]:
    """The shard members of one pair: mp4 (target), src.mp4, mask.mp4, txt, json."""
    from data_pipeline.video import encode_frames

    rate = Fraction(pair.fps).limit_denominator(1001)
    F, H, W, _ = pair.source.shape
    mask_rgb = np.repeat(pair.mask[..., None], 3, axis=-1).astype(np.uint8) * 255  # F×H×W×3
    meta = dict(pair.meta(), key=key, caption=pair.instruction, caption_source="synthetic",
                source_uri=f"synthetic://removal/{pair.seed}", start=0.0, end=round(F / pair.fps, 4),
                fps=pair.fps, width=W, height=H, num_frames=F)
    return {"mp4": encode_frames(pair.target, rate, lossless=True),
            "src.mp4": encode_frames(pair.source, rate, lossless=True),
            "mask.mp4": encode_frames(mask_rgb, rate, lossless=True),
            "txt": pair.instruction.encode(),
            "json": (json.dumps(meta, sort_keys=True) + "\n").encode()}


def write_removal_shards(out: str, n: int, seed: int = 0, *, samples_per_shard: int = 64,
                         prefix: str = PREFIX, size: int = SIZE, fps: float = FPS, radius: float = PAIR_RADIUS,
                         options=None) -> dict:
    """Write ``n`` removal pairs as WebDataset shards under ``out`` (local or ``s3://``; ``options``:
    fsspec storage options), in the layout of ``vchitect-curate run``: ``{prefix}-{index:06d}.tar``,
    ``index.json``, ``stats.json``, an empty ``rejected.jsonl``, ``_SUCCESS`` (withdrawn first, written
    last; ``{prefix}-*.tar`` of an earlier, larger run are removed, since the loader reads every tar of
    the folder). Sample keys ``removal_{pair seed:010d}_0000``. Same arguments → same bytes. Returns
    the index."""
    from data_pipeline.writer import sample_key

    from .shards import write_sample_shards

    if n < 1:
        raise ValueError(f"write_removal_shards: n={n}; ask for at least one pair")
    removed: dict[str, int] = {}

    def samples():
        for i in range(n):
            pair = render_removal_pair(pair_seed(seed, i), size=size, fps=fps, radius=radius)
            key = sample_key(f"removal_{pair.seed:010d}", 0)
            name = f"{pair.removed['color']} {pair.removed['shape']}"
            removed[name] = removed.get(name, 0) + 1
            yield key, pair_members(pair, key)

    # stats.json's this_run: what was drawn
    return write_sample_shards(out, prefix, samples(), lambda: {
        "generator": "vchitect.demo.removal", "task": REMOVAL_TASK, "seed": seed, "size": size, "fps": fps, "radius": radius,
        "removed": dict(sorted(removed.items()))}, samples_per_shard=samples_per_shard, options=options)


__all__ = ["AXES", "LANES", "PAIR_RADIUS", "PAIR_SECONDS", "REMOVAL_TASK", "REMOVAL_TASK_NAME", "RemovalPair",
           "pair_members", "pair_seed", "removal_instruction", "render_removal_pair", "write_removal_shards"]
