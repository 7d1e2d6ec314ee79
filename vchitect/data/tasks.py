"""Many-for-Many tasks: how one training clip becomes a (condition, mask) pair for a task.

Every task is a pure function of the clip's pixels, the sample's generator and the task options:

    condition, mask = TASKS["i2v"].build(pixels, rng, opts)   # uint8 3×F×H×W, uint8 1×F×H×W

``mask`` is 1 where the condition pixel is known and 0 where the model has to make it up; unknown
condition pixels are 0 (the encode step multiplies by the mask anyway). ``vedit`` and ``depth`` also
take ``side``: the decoded ``src.mp4`` / depth video, the same frames and size as ``pixels``.
``given`` and ``paste`` say what sampling takes instead of a training clip (the inputs of
``VchitectPipeline``, built into the same condition by :mod:`vchitect.export.task_inputs`).
The prompt tag (``<caption> #task: <name>``) uses the full task names of the Many-for-Many release;
``depth`` has none there and gets ours. docs/tasks.md describes each task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np


@dataclass(frozen=True)
class Task:
    name: str  # the short name of data.tasks
    prompt: str  # the full name after `#task:`
    image: bool  # applies to 1-frame samples (else to multi-frame ones)
    build: Callable  # (pixels, rng, opts, side=None) → (condition, mask)
    side: Optional[str] = None  # "src" (the sample's src.mp4) | "depth" (the depth member) | None
    # sampling: the VchitectPipeline / `vchitect sample` inputs the condition is built from ("image",
    # "video", "mask", "depth"; a name twice = a pair: itrans's first + last frame, vtrans's two clips)
    given: tuple[str, ...] = ()
    paste: bool = False  # the known condition pixels are the answer: the pipeline may paste them back


def task_caption(caption: str, task: "Task") -> str:
    """The caption the text encoder sees when tasks are on: ``<caption> #task: <full name>``."""
    return f"{caption} #task: {task.prompt}"


# -- helpers ----------------------------------------------------------------------------------

def _empty(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    C, F, H, W = pixels.shape
    return np.zeros((3, F, H, W), np.uint8), np.zeros((1, F, H, W), np.uint8)


def _frames_known(pixels: np.ndarray, frames) -> tuple[np.ndarray, np.ndarray]:
    """Mask 1 on whole frames ``frames``, the condition equal to the clip there."""
    cond, mask = _empty(pixels)
    idx = sorted(set(int(f) for f in frames))
    cond[:, idx], mask[:, idx] = pixels[:, idx], 1
    return cond, mask


def all_known(cond: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(cond, dtype=np.uint8), np.ones((1,) + cond.shape[1:], np.uint8)


def context_frames(F: int, k: int, ends: int) -> int:
    """Known frames at each of ``ends`` ends (1 or 2): ``k``, leaving at least one frame unknown."""
    return max(1, min(k, (F - 1) // ends))


# -- generation tasks ---------------------------------------------------------------------------

def build_none(pixels, rng, opts, side=None):  # t2v, t2i: nothing known
    return _empty(pixels)


def build_i2v(pixels, rng, opts, side=None):  # first frame known
    return _frames_known(pixels, [0])


def build_vexd(pixels, rng, opts, side=None):  # first k frames known
    k = context_frames(pixels.shape[1], opts.context_frames, 1)
    return _frames_known(pixels, range(k))


def build_itrans(pixels, rng, opts, side=None):  # first and last frame known
    return _frames_known(pixels, [0, pixels.shape[1] - 1])


def build_vtrans(pixels, rng, opts, side=None):  # first k and last k frames known
    F = pixels.shape[1]
    k = context_frames(F, opts.context_frames, 2)
    return _frames_known(pixels, list(range(k)) + list(range(F - k, F)))


# -- inpainting / outpainting -------------------------------------------------------------------

def _box(rng, H: int, W: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a box whose sides are lo..hi of the frame's."""
    bh = max(1, int(round(rng.uniform(lo, hi) * H)))
    bw = max(1, int(round(rng.uniform(lo, hi) * W)))
    return int(rng.integers(0, H - bh + 1)), int(rng.integers(0, W - bw + 1)), bh, bw


def _brush(rng, H: int, W: int, lo: float, hi: float) -> np.ndarray:
    """A free-form stroke (discs along a random walk) as a bool H×W hole."""
    hole = np.zeros((H, W), bool)
    yy, xx = np.mgrid[0:H, 0:W]
    radius = max(1.0, rng.uniform(lo, hi) * min(H, W) / 4)
    y, x = rng.uniform(0, H), rng.uniform(0, W)
    for _ in range(int(rng.integers(4, 10))):
        hole |= (yy - y) ** 2 + (xx - x) ** 2 <= radius ** 2
        angle = rng.uniform(0, 2 * np.pi)
        y = float(np.clip(y + np.sin(angle) * 2 * radius, 0, H - 1))
        x = float(np.clip(x + np.cos(angle) * 2 * radius, 0, W - 1))
    return hole


def _shift(hole: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``hole`` moved by (dy, dx); what leaves the frame is dropped."""
    H, W = hole.shape
    out = np.zeros_like(hole)
    ys, xs = slice(max(0, dy), min(H, H + dy)), slice(max(0, dx), min(W, W + dx))
    yo, xo = slice(max(0, -dy), min(H, H - dy)), slice(max(0, -dx), min(W, W - dx))
    out[ys, xs] = hole[yo, xo]
    return out


def inpaint_holes(rng, F: int, H: int, W: int, opts, moving: bool) -> np.ndarray:
    """bool F×H×W, True = unknown: 1–3 boxes or brush strokes; ``moving`` ones drift linearly from
    the first frame to the last by up to half the frame."""
    holes = np.zeros((F, H, W), bool)
    for _ in range(int(rng.integers(1, 4))):
        if rng.random() < 0.5:
            top, left, bh, bw = _box(rng, H, W, opts.hole_min, opts.hole_max)
            shape = np.zeros((H, W), bool)
            shape[top:top + bh, left:left + bw] = True
        else:
            shape = _brush(rng, H, W, opts.hole_min, opts.hole_max)
        if moving and F > 1:
            dy, dx = rng.uniform(-0.5, 0.5) * H, rng.uniform(-0.5, 0.5) * W
            for f in range(F):
                a = f / (F - 1)
                holes[f] |= _shift(shape, int(round(a * dy)), int(round(a * dx)))
        else:
            holes |= shape[None]
    if holes.all():  # keep something known
        holes[:, 0, 0] = False
    return holes


def from_holes(pixels: np.ndarray, holes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``pixels`` (3×F×H×W) known outside ``holes`` (bool F×H×W, True = unknown)."""
    mask = (~holes).astype(np.uint8)[None]  # 1×F×H×W
    return (pixels * mask).astype(np.uint8), mask


def build_vinp(pixels, rng, opts, side=None):  # holes unknown, static or moving
    C, F, H, W = pixels.shape
    return from_holes(pixels, inpaint_holes(rng, F, H, W, opts, moving=bool(rng.random() < 0.5)))


def build_iinp(pixels, rng, opts, side=None):
    C, F, H, W = pixels.shape
    return from_holes(pixels, inpaint_holes(rng, F, H, W, opts, moving=False))


def outpaint_window(rng, H: int, W: int, opts) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the known window: all four sides, left + right, or top +
    bottom are cut by border_min..border_max of the frame each."""
    cut = lambda n: int(round(rng.uniform(opts.border_min, opts.border_max) * n))  # noqa: E731
    sides = ("all", "horizontal", "vertical")[int(rng.integers(3))]
    top = bottom = left = right = 0
    if sides in ("all", "vertical"):
        top, bottom = cut(H), cut(H)
    if sides in ("all", "horizontal"):
        left, right = cut(W), cut(W)
    top, bottom = min(top, (H - 1) // 2), min(bottom, (H - 1) // 2)
    left, right = min(left, (W - 1) // 2), min(right, (W - 1) // 2)
    if top + bottom + left + right == 0:  # a tiny frame: still cut one column
        left = 1 if W > 1 else 0
    return top, H - bottom, left, W - right


def build_outpaint(pixels, rng, opts, side=None):  # voutp, ioutp: a border unknown
    C, F, H, W = pixels.shape
    t, b, l, r = outpaint_window(rng, H, W, opts)
    holes = np.ones((F, H, W), bool)
    holes[:, t:b, l:r] = False
    return from_holes(pixels, holes)


# -- restoration tasks --------------------------------------------------------------------------

def degrade_resolution(pixels: np.ndarray, factor: int) -> np.ndarray:
    """Each frame downscaled by ``factor`` (box filter) and upscaled back (bicubic): 3×F×H×W uint8."""
    from PIL import Image

    C, F, H, W = pixels.shape
    small = (max(1, W // factor), max(1, H // factor))
    out = np.empty_like(pixels)
    for f in range(F):
        img = Image.fromarray(np.ascontiguousarray(pixels[:, f].transpose(1, 2, 0)))
        img = img.resize(small, Image.BOX).resize((W, H), Image.BICUBIC)
        out[:, f] = np.asarray(img).transpose(2, 0, 1)
    return out


def build_sr(pixels, rng, opts, side=None):  # vsr, isr: a low-resolution copy, all known
    return all_known(degrade_resolution(pixels, opts.sr_factor))


def grey(pixels: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma, repeated in 3 channels: 3×F×H×W uint8."""
    y = np.tensordot(np.array([0.299, 0.587, 0.114]), pixels.astype(np.float32), axes=(0, 0))
    return np.repeat(np.clip(np.rint(y), 0, 255).astype(np.uint8)[None], 3, axis=0)


def build_color(pixels, rng, opts, side=None):  # vcolor, icolor: the grey clip, all known
    return all_known(grey(pixels))


# -- tasks with a side video ----------------------------------------------------------------------

def _check_side(name: str, pixels: np.ndarray, side: Optional[np.ndarray]) -> np.ndarray:
    if side is None or side.shape != pixels.shape:
        raise ValueError(f"task {name} needs its side video decoded to the clip's frames "
                         f"{tuple(pixels.shape)}, got {None if side is None else tuple(side.shape)}")
    return side


def build_vedit(pixels, rng, opts, side=None):  # ROVI removal: the source video, all known
    return all_known(_check_side("vedit", pixels, side))


def build_depth(pixels, rng, opts, side=None):
    """Depth-conditioned generation: the depth video (as grey in 3 channels), all known. The shard member is
    data.task_options.depth_member (depth.mp4: the curation depth stage's, or synth --depth's)."""
    return all_known(grey(_check_side("depth", pixels, side)))


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("t2v", "text-to-video", False, build_none),
    Task("i2v", "image-to-video", False, build_i2v, given=("image",), paste=True),
    Task("vexd", "video extending", False, build_vexd, given=("video",), paste=True),
    Task("itrans", "image-to-image transition", False, build_itrans, given=("image", "image"), paste=True),
    Task("vtrans", "video-to-video transition", False, build_vtrans, given=("video", "video"), paste=True),
    Task("vinp", "video inpainting", False, build_vinp, given=("video", "mask"), paste=True),
    Task("voutp", "video outpainting", False, build_outpaint, given=("video", "mask"), paste=True),
    Task("vsr", "video super-resolution", False, build_sr, given=("video",)),
    Task("vcolor", "video colorization", False, build_color, given=("video",)),
    Task("vedit", "video editing", False, build_vedit, side="src", given=("video",)),
    Task("depth", "depth-to-video", False, build_depth, side="depth", given=("depth",)),
    Task("t2i", "text-to-image", True, build_none),
    Task("iinp", "image inpainting", True, build_iinp, given=("image", "mask"), paste=True),
    Task("ioutp", "image outpainting", True, build_outpaint, given=("image", "mask"), paste=True),
    Task("isr", "image super-resolution", True, build_sr, given=("image",)),
    Task("icolor", "image colorization", True, build_color, given=("image",)),
]}


def draw_task(rng: np.random.Generator, weights: dict[str, float], frames: int,
              has_side: Callable[[str], bool]) -> Optional[Task]:
    """The sample's task: one of the configured tasks valid for it (image tasks for 1-frame samples,
    video tasks otherwise, side-video tasks when the sample has the side member), drawn with
    probability weight / sum of the valid weights; None when no configured task is valid. One
    ``rng.random()`` draw whatever the outcome."""
    u = rng.random()
    valid = [(TASKS[n], w) for n, w in weights.items()
             if w > 0 and TASKS[n].image == (frames == 1) and (TASKS[n].side is None or has_side(TASKS[n].side))]
    if not valid:
        return None
    total = sum(w for _, w in valid)
    acc = 0.0
    for task, w in valid:
        acc += w / total
        if u < acc:
            return task
    return valid[-1][0]
