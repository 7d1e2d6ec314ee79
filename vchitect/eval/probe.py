"""Prompt-following probe for the synthetic vocabulary ("a {colour} {shape} moves {right|left|down|up}").

From the pixels of a generated video alone it measures

* the dominant foreground colour: the background is the median colour of the frame border; pixels
  farther than a threshold from it are foreground; the median colour of its core (pixels at least
  3/4 as far from the background as the farthest ones; edges blend with the background) is matched
  to the nearest colour of :data:`data_pipeline.synthetic.COLORS`;
* the direction of motion: the foreground centroid of every frame, its least-squares velocity over
  time (pixels per frame), matched to the direction whose unit vector it points along most.

``probe_video`` classifies one video; ``score`` compares predictions with prompts and returns the
accuracy per attribute, overall and on held-out colour × direction combinations.

``probe_removal`` judges an instruction-driven removal (:mod:`vchitect.demo.removal`): is the removed
colour absent from every frame, and does the kept object still move as in the source (its per-frame
centroid close to the source's)?
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

from data_pipeline.synthetic import COLORS, DIRECTION_WORDS, DIRECTIONS

# "moves right" (the captions of data_pipeline.synthetic) or the long form "moves from left to right"
_PROMPT = re.compile(r"an? (?P<color>\w+) (?P<shape>\w+) moves (?:from (?P<span>\w+ to \w+)|(?P<word>\w+))")
_BY_WORD = {w: d for d, w in DIRECTION_WORDS.items()}


def parse_prompt(prompt: str) -> Optional[dict]:
    """``{"color", "shape", "direction"}`` of a prompt of the synthetic vocabulary, else None."""
    m = _PROMPT.search(prompt.lower())
    if m is None:
        return None
    direction = m["span"] or _BY_WORD.get(m["word"])
    if m["color"] not in COLORS or direction not in DIRECTIONS:
        return None
    return {"color": m["color"], "shape": m["shape"], "direction": direction}


@dataclass
class ProbeResult:
    color: Optional[str]            # nearest vocabulary colour of the foreground, None if no foreground
    direction: Optional[str]        # direction of the centroid's motion, None if it does not move
    foreground: float               # mean share of foreground pixels per frame
    velocity: tuple[float, float]   # centroid velocity (dx, dy) in pixels per frame, y downwards
    rgb: tuple[int, int, int]       # median foreground colour


def _background(frames: np.ndarray) -> np.ndarray:
    """Median RGB of the one-pixel border of every frame (F×H×W×3 → 3)."""
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    return np.median(border.reshape(-1, 3), axis=0)


def probe_video(frames: np.ndarray, threshold: float = 60.0, min_motion: float = 0.05) -> ProbeResult:
    """Classify one video, ``frames`` F×H×W×3 uint8 RGB (F ≥ 2).

    ``threshold``: RGB distance (0…441) from the background above which a pixel is foreground.
    ``min_motion``: centroid speed (pixels per frame, relative to a 16-pixel frame side) under which
    no direction is reported.
    """
    x = np.asarray(frames, dtype=np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 2:
        raise ValueError(f"expected F×H×W×3 frames with F >= 2, got {x.shape}")
    F, H, W, _ = x.shape
    bg = _background(x)
    dist = np.linalg.norm(x - bg, axis=-1)                  # F×H×W
    fg = dist > threshold
    share = float(fg.mean())
    if not fg.any():
        return ProbeResult(None, None, 0.0, (0.0, 0.0), tuple(int(v) for v in bg))
    # colour from the core of the foreground: edge pixels mix shape and background
    core = fg & (dist >= 0.75 * np.percentile(dist[fg], 95))
    rgb = np.median(x[core], axis=0)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], np.float32)
    color = names[int(np.argmin(np.linalg.norm(palette - rgb, axis=1)))]

    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    w = np.where(fg, dist, 0.0)                              # weight by distance from the background
    mass = w.sum(axis=(1, 2))
    valid = mass > 0
    if valid.sum() < 2:
        return ProbeResult(color, None, share, (0.0, 0.0), tuple(int(v) for v in rgb))
    cx = (w * xs).sum(axis=(1, 2))[valid] / mass[valid]
    cy = (w * ys).sum(axis=(1, 2))[valid] / mass[valid]
    t = np.arange(F, dtype=np.float32)[valid]
    t = t - t.mean()
    vx = float((t * (cx - cx.mean())).sum() / (t * t).sum())
    vy = float((t * (cy - cy.mean())).sum() / (t * t).sum())
    speed = np.hypot(vx, vy)
    direction = None
    if speed >= min_motion * max(H, W) / 16:
        direction = max(DIRECTIONS, key=lambda d: vx * DIRECTIONS[d][0] + vy * DIRECTIONS[d][1])
    return ProbeResult(color, direction, share, (vx, vy), tuple(int(v) for v in rgb))


def _colour_masks(x: np.ndarray, bg: np.ndarray, names: Sequence[str], threshold: float) -> dict[str, np.ndarray]:
    """Per vocabulary colour in ``names``, the F×H×W pixels of ``x`` (F×H×W×3 float) nearest to it
    among the whole palette and the background, and within ``threshold`` of it (blended edges are
    nearer the background or another colour, and drop out)."""
    every = list(COLORS)
    palette = np.array([COLORS[n] for n in every] + [bg], np.float32)     # (K+1)×3
    dist = np.linalg.norm(x[..., None, :] - palette, axis=-1)           # F×H×W×(K+1)
    nearest = dist.argmin(-1)
    return {n: (nearest == every.index(n)) & (dist[..., every.index(n)] < threshold) for n in names}


def _centroids(mask: np.ndarray) -> np.ndarray:
    """(x, y) centroid of each frame of an F×H×W mask → F×2, NaN where the frame has none."""
    F, H, W = mask.shape
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float32)
    n = mask.sum(axis=(1, 2)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([(mask * xs).sum(axis=(1, 2)) / n, (mask * ys).sum(axis=(1, 2)) / n], axis=1)


@dataclass
class RemovalProbe:
    removed_share: float     # largest share of a frame in the removed colour
    kept_share: float        # smallest share of a frame in the kept colour
    kept_error: float        # mean distance of the kept object's centroid from the source's, of the frame side
    removed_absent: bool     # removed_share <= max_share in every frame
    kept_follows: bool       # the kept object is in every frame (kept_share > max_share) and kept_error <= max_error

    @property
    def ok(self) -> bool:
        return self.removed_absent and self.kept_follows


def probe_removal(frames: np.ndarray, source: np.ndarray, removed_color: str, kept_color: Optional[str] = None,
                  threshold: float = 60.0, max_share: float = 0.01, max_error: float = 0.05) -> RemovalProbe:
    """Judge one removal: ``frames`` (the generated video) and ``source`` (the video it edits), both
    F×H×W×3 uint8 RGB of the same shape; ``removed_color`` / ``kept_color``: vocabulary colours of the
    removed and the kept object (``kept_color`` None: the source's most frequent other colour).

    The removed colour counts as absent when no frame has more than ``max_share`` of its pixels in
    it (within ``threshold`` RGB distance, nearer it than any other colour or the background); the
    kept object follows when it has more than ``max_share`` of every frame and its centroid lies on
    average within ``max_error`` of the frame side from the source's.
    """
    x, s = np.asarray(frames, np.float32), np.asarray(source, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape != s.shape:
        raise ValueError(f"probe_removal: expected frames and source F×H×W×3 of one shape, got {x.shape} and "
                         f"{s.shape}; resize the source to the generated size first")
    for name, c in (("removed_color", removed_color), ("kept_color", kept_color)):
        if c is not None and c not in COLORS:
            raise ValueError(f"probe_removal: {name}={c!r} is not a vocabulary colour ({', '.join(COLORS)})")
    F, H, W, _ = x.shape
    src_bg = _background(s)
    if kept_color is None:
        others = [n for n in COLORS if n != removed_color]
        counts = {n: int(m.sum()) for n, m in _colour_masks(s, src_bg, others, threshold).items()}
        kept_color = max(counts, key=counts.get)
    gen = _colour_masks(x, _background(x), [removed_color, kept_color], threshold)
    ref = _colour_masks(s, src_bg, [kept_color], threshold)[kept_color]
    removed_share = float(gen[removed_color].mean(axis=(1, 2)).max())
    kept_share = float(gen[kept_color].mean(axis=(1, 2)).min())
    err = np.linalg.norm(_centroids(gen[kept_color]) - _centroids(ref), axis=1) / max(H, W)    # F
    kept_error = float(err.mean()) if np.isfinite(err).all() else float("inf")
    return RemovalProbe(removed_share, kept_share, kept_error, removed_share <= max_share,
                        kept_share > max_share and kept_error <= max_error)


def score(prompts: Sequence[str], results: Sequence[ProbeResult],
          held_out: Iterable[tuple[str, str]] = ()) -> dict:
    """Accuracy of ``results`` against ``prompts``: colour, direction and both, over the videos whose
    (colour, direction) is in training and over those in ``held_out``."""
    held = {tuple(h) for h in held_out}
    groups: dict[str, list[tuple[bool, bool]]] = {"train": [], "held_out": []}
    for prompt, r in zip(prompts, results):
        want = parse_prompt(prompt)
        if want is None:
            continue
        key = "held_out" if (want["color"], want["direction"]) in held else "train"
        groups[key].append((r.color == want["color"], r.direction == want["direction"]))
    out = {}
    for key, rows in groups.items():
        n = len(rows)
        out[key] = {"n": n,
                    "color": sum(c for c, _ in rows) / n if n else None,
                    "direction": sum(d for _, d in rows) / n if n else None,
                    "both": sum(c and d for c, d in rows) / n if n else None}
    return out


def result_dict(r: ProbeResult) -> dict:
    return asdict(r)




# -- conditional tasks (Many-for-Many; docs/tasks.md): where is the object, given what was given -----------

def object_mask(frames: np.ndarray, color: str, threshold: float = 60.0) -> np.ndarray:
    """F×H×W bool: the pixels of ``frames`` (F×H×W×3 uint8) that belong to the object of vocabulary
    colour ``color`` (nearest to it among the palette and the border's background, within ``threshold``)."""
    x = np.asarray(frames, np.float32)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"object_mask: expected F×H×W×3 frames, got {x.shape}")
    if color not in COLORS:
        raise ValueError(f"object_mask: color={color!r} is not a vocabulary colour ({', '.join(COLORS)})")
    return _colour_masks(x, _background(x), [color], threshold)[color]


def object_track(frames: np.ndarray, color: str, threshold: float = 60.0) -> tuple[np.ndarray, np.ndarray]:
    """The object of vocabulary colour ``color`` in ``frames`` (F×H×W×3 uint8, :func:`object_mask`): its
    per-frame centroid (F×2, x and y in pixels, NaN where the frame has none of it) and whether it lies
    wholly inside the frame (F bools: some of it is there and none of it touches the one-pixel border)."""
    mask = object_mask(frames, color, threshold)
    border = mask[:, 0].any(1) | mask[:, -1].any(1) | mask[:, :, 0].any(1) | mask[:, :, -1].any(1)
    return _centroids(mask), mask.any(axis=(1, 2)) & ~border


def _px(side: int) -> float:
    """Pixel tolerances of the probes are given for a 16-pixel frame side; this scales them."""
    return side / 16.0


@dataclass
class PositionProbe:
    """A conditional-task judgement: the generated object's centroid error on the judged frames."""
    error: float              # px (mean over the judged frames; inf where the object is missing in one)
    frames: list[int]         # the judged frames (the object wholly inside the frame in the reference)
    max_error: float          # the tolerance in px at this frame size
    color_kept: bool          # the generated video's dominant colour is the reference object's
    direction: Optional[str]  # the generated motion's direction (probe_video), for i2v

    @property
    def ok(self) -> bool:
        return self.error <= self.max_error

    def as_dict(self) -> dict:
        return dict(asdict(self), ok=self.ok)


def _judge(gen: np.ndarray, ref_xy: np.ndarray, frames: list[int], color: str, tol_16: float) -> PositionProbe:
    F, H, W, _ = gen.shape
    xy, _ = object_track(gen, color)
    err = np.linalg.norm(xy[frames] - ref_xy, axis=-1) if frames else np.array([np.inf])
    error = float(err.mean()) if np.isfinite(err).all() else float("inf")
    probe = probe_video(gen)
    return PositionProbe(error, list(frames), tol_16 * _px(max(H, W)), probe.color == color, probe.direction)


def probe_i2v(frames: np.ndarray, given: np.ndarray, color: str, max_error: float = 1.5) -> PositionProbe:
    """Image-to-video: does frame 0 of ``frames`` (the raw output, F×H×W×3) put the object where the
    given first frame ``given`` (H×W×3) has it? ``max_error`` px at a 16-px side (scaled). Also reports
    whether the dominant colour is kept and the direction of motion (to compare with the prompt)."""
    ref_xy, inside = object_track(np.asarray(given)[None], color)
    if not inside[0]:
        raise ValueError("probe_i2v: the given frame must show the object wholly inside the frame")
    return _judge(np.asarray(frames), ref_xy, [0], color, max_error)


def segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Distance of point ``p`` from the segment ``a``–``b`` (all (x, y))."""
    ab = b - a
    t = float(np.clip(np.dot(p - a, ab) / max(float(np.dot(ab, ab)), 1e-9), 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def probe_itrans(frames: np.ndarray, first: np.ndarray, last: np.ndarray, color: str,
                 max_error: float = 2.0) -> PositionProbe:
    """First + last frame transition: is the object of the middle frame (F // 2) of ``frames`` within
    ``max_error`` px (16-px side, scaled) of the straight path between its centroids in ``first`` and
    ``last`` (H×W×3 each, the object wholly inside both)?"""
    gen = np.asarray(frames)
    ends, inside = object_track(np.stack([first, last]), color)
    if not inside.all():
        raise ValueError("probe_itrans: the given first and last frames must show the object wholly inside")
    m = gen.shape[0] // 2
    xy, _ = object_track(gen, color)
    err = segment_distance(xy[m], ends[0], ends[1]) if np.isfinite(xy[m]).all() else float("inf")
    probe = probe_video(gen)
    return PositionProbe(err, [m], max_error * _px(max(gen.shape[1:3])), probe.color == color, probe.direction)


def probe_inpaint(frames: np.ndarray, truth: np.ndarray, hole: np.ndarray, color: str,
                  max_error: float = 2.0) -> PositionProbe:
    """Inpainting: ``hole`` (F×H×W bool, True = unknown) hides the object's path in some frames of the
    ground-truth clip ``truth``; does the object reappear in ``frames`` on its trajectory there? Judged
    on the frames where the hole covers the whole object and the object is wholly inside the frame:
    mean centroid error ≤ ``max_error`` px (16-px side, scaled)."""
    gen, ref = np.asarray(frames), np.asarray(truth)
    hole = np.asarray(hole, bool)
    xy, inside = object_track(ref, color)
    obj = object_mask(ref, color)
    covered = [f for f in range(ref.shape[0]) if inside[f] and obj[f].any() and hole[f][obj[f]].all()]
    if not covered:
        raise ValueError("probe_inpaint: the hole covers the object wholly in no frame where it is inside")
    return _judge(gen, xy[covered], covered, color, max_error)


__all__ = ["PositionProbe", "ProbeResult", "RemovalProbe", "object_mask", "object_track", "parse_prompt", "probe_i2v", "probe_inpaint",
           "probe_itrans", "probe_removal", "probe_video", "result_dict", "score", "segment_distance"]
