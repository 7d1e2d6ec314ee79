"""The task inputs of :class:`~vchitect.export.pipeline.VchitectPipeline`: ``image`` / ``video`` / ``mask`` /
``depth`` → one Many-for-Many task's (condition, mask) at the output size, made by the training builders
of :mod:`vchitect.data.tasks`, so that sampling and training define every task the same way::

    cond, mask = task_conditions(TASKS["i2v"], batch=1, frames=9, height=16, width=16, image=first)
    # uint8 B×3×F×H×W and uint8 B×1×F×H×W (1 = known), as the loader emits them

What a task is given is ``Task.given``; how it becomes the condition (docs/sampling.md, "Tasks"):

* ``i2v`` / ``itrans`` / ``vexd`` / ``vtrans``: the given frames go where the task knows frames (frame 0;
  frames 0 and F − 1; the first k; the first k and the last k) of an otherwise blank clip, and the task's
  builder makes the condition of that clip. vexd continues the given clip: its last k frames start the
  output; vtrans bridges the head clip's last k frames and the tail clip's first k.
* ``vinp`` / ``voutp`` / ``iinp`` / ``ioutp``: the given clip, known where ``mask`` says so.
* ``vsr`` / ``isr``: the given low-resolution clip as it is, upscaled to the output size (bicubic, the
  upscale of the training condition); ``vcolor`` / ``icolor``: the given clip in BT.601 grey (a grey
  clip stays as it is); ``vedit``: the source clip; ``depth``: the depth clip in grey. All known.

Inputs reach the output size as the loader's decoded frames reach a bucket (resize to cover, then
centre crop: bilinear for RGB, bicubic for the super-resolution input, nearest for masks), and the
output's frame count by their first ``frames`` frames.

This module imports numpy, PIL, torch and vchitect modules that import nothing more: the export folder
carries it for ``trust_remote_code`` loading (:mod:`vchitect.export.remote_code`).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image

from vchitect.data.buckets import Bucket, centre_crop, cover_size
from vchitect.data.tasks import TASKS, Task, all_known, from_holes, task_caption

INPUTS = ("image", "video", "mask", "depth")
# tasks whose given clip is the whole output (its frame count is the default num_frames)
WHOLE_CLIP = ("vinp", "voutp", "vsr", "vcolor", "vedit", "depth")
KINDS = {"image": "a PIL image, an H×W×3 (or H×W grey) uint8 array or tensor",
         "video": "an F×H×W×3 (or F×H×W grey) uint8 array or tensor, or a list of PIL frames",
         "mask": "a PIL image, or an H×W or F×H×W array or tensor (1 / True / 255 = known)",
         "depth": "an F×H×W (or F×H×W×3) uint8 array or tensor, or a list of PIL frames"}
PAIRS = {"image": "an (first frame, last frame) pair", "video": "a (head clip, tail clip) pair"}


# ------------------------------------------------------------------ which task, which inputs
def resolve_task(name: Optional[str], condition_channels: int) -> Optional[Task]:
    """The :class:`~vchitect.data.tasks.Task` called ``name`` (None: no task), checked against the model:
    a task with a condition needs the 4-channel condition adapter (``model.condition_channels=4``)."""
    if name is None:
        return None
    task = TASKS.get(name)
    if task is None:
        raise ValueError(f"task={name!r} is not a task; choose one of {', '.join(TASKS)} (docs/tasks.md)")
    if task.given and not condition_channels:
        raise ValueError(f"task={name!r} ({task.prompt}) needs a model with a condition adapter "
                         f"(model.condition_channels=4), and this transformer has none; without one it can "
                         f"only run t2v or t2i")
    if condition_channels not in (0, 4):
        raise ValueError(f"this transformer's condition adapter takes {condition_channels} channels; the task "
                         f"inputs build the 4-channel condition of docs/tasks.md (RGB + mask), so pass your own "
                         f"to vchitect.diffusion.sampling.sample(..., condition=…) instead")
    return task


def takes(task: Task) -> str:
    """What ``task`` is given, in words (for messages)."""
    if not task.given:
        return "no image, video, mask or depth (text only)"
    parts = [f"{k}= ({PAIRS[k]})" if task.given.count(k) == 2 else f"{k}=" for k in dict.fromkeys(task.given)]
    return " and ".join(parts)


def check_inputs(task: Optional[Task], inputs: dict, context_frames: Optional[int] = None) -> None:
    """Refuse inputs a task does not take, and a task without the inputs it needs (before any work)."""
    passed = [k for k in INPUTS if inputs.get(k) is not None]
    if task is None:
        if passed or context_frames is not None:
            raise ValueError(f"{', '.join(passed) or 'context_frames'} given without a task; pass task=… "
                             f"(e.g. task='i2v' with image=; docs/sampling.md, \"Tasks\")")
        return
    missing = [k for k in dict.fromkeys(task.given) if inputs.get(k) is None]
    extra = [k for k in passed if k not in task.given]
    if missing or extra:
        what = f"lacks {', '.join(missing)}" if missing else f"does not take {', '.join(extra)}"
        raise ValueError(f"task={task.name!r} ({task.prompt}) takes {takes(task)}; this call {what}")
    if context_frames is not None and task.name not in ("vexd", "vtrans"):
        raise ValueError(f"context_frames is for vexd and vtrans, not task={task.name!r}")
    if context_frames is not None and context_frames < 1:
        raise ValueError(f"context_frames={context_frames}: give at least 1")


def check_frames(task: Task, frames: int) -> None:
    if task.image and frames != 1:
        raise ValueError(f"task={task.name!r} ({task.prompt}) makes an image: num_frames=1, not {frames}")
    if not task.image and frames < 2:
        image_tasks = ", ".join(n for n, t in TASKS.items() if t.image)
        raise ValueError(f"task={task.name!r} ({task.prompt}) makes a video: num_frames ≥ 2, not {frames} "
                         f"(the image tasks are {image_tasks})")


def task_prompts(prompts: list[str], task: Optional[Task], adapter: bool) -> list[str]:
    """The prompts the text encoder sees: with a task on a model with the adapter, each ends in
    ``#task: <full name>`` as the training captions do (:func:`~vchitect.data.tasks.task_caption`); a
    model without the adapter was trained without the suffix and gets the prompts as they are."""
    if task is None or not adapter:
        return list(prompts)
    return [task_caption(p, task) for p in prompts]


def default_frames(task: Optional[Task], inputs: dict) -> int:
    """num_frames when the caller gives none: 1 for an image task, the given clip's frames for a task
    whose clip is the whole output (the shortest, with one clip per prompt), else 16."""
    if task is None:
        return 16
    if task.image:
        return 1
    if task.name in WHOLE_CLIP:
        kind = "depth" if task.name == "depth" else "video"
        return min(len(_video(v, kind)) for v in _per_prompt(inputs[kind], None, _is_video, kind))
    return 16


# ------------------------------------------------------------------ one input per prompt
def _is_array(x) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _is_image(x) -> bool:
    return isinstance(x, Image.Image) or (_is_array(x) and x.ndim in (2, 3))


def _is_video(x) -> bool:
    return (_is_array(x) and x.ndim in (3, 4)) or (
        isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(f, Image.Image) for f in x))


def _pair_of(is_one: Callable) -> Callable:
    return lambda x: isinstance(x, (list, tuple)) and len(x) == 2 and all(is_one(v) for v in x)


def _per_prompt(value, batch: Optional[int], is_one: Callable, kind: str, pair: bool = False) -> list:
    """``value`` for each of ``batch`` prompts: one input (used for every prompt) or a list of them."""
    one = _pair_of(is_one) if pair else is_one
    if one(value):
        return [value] * (batch or 1)
    if isinstance(value, (list, tuple)) and value and all(one(v) for v in value):
        if batch is not None and len(value) != batch:
            raise ValueError(f"{kind}: {len(value)} given for {batch} prompts; give one (for every prompt) or "
                             f"one per prompt")
        return list(value)
    shape = f", shape {tuple(value.shape)}" if _is_array(value) else ""
    want = f"{PAIRS[kind]} of {KINDS[kind]}" if pair else KINDS[kind]
    raise ValueError(f"{kind}: expected {want}, or a list of them (one per prompt); got "
                     f"{type(value).__name__}{shape}")


# ------------------------------------------------------------------ conversions
def _uint8(x, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype.kind == "f" and a.size and np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1:
        return np.rint(a * 255).astype(np.uint8)
    if a.dtype.kind in "iu" and a.size and a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)
    raise ValueError(f"{what}: {a.dtype} values out of range; give uint8 0..255 (or floats in [0, 1])")


def _rgb(a: np.ndarray, what: str, shape: str) -> np.ndarray:
    if a.ndim == len(shape.split("×")) - 1:
        a = a[..., None]
    if a.ndim != len(shape.split("×")) or a.shape[-1] not in (1, 3) or 0 in a.shape:
        raise ValueError(f"{what}: shape {tuple(a.shape)}; give {shape} (or {shape[:-2]} grey)")
    return np.repeat(a, 3, axis=-1) if a.shape[-1] == 1 else a


def _image(x, what: str) -> np.ndarray:
    """H×W×3 uint8."""
    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGB"))
    return _rgb(_uint8(x, what), what, "H×W×3")


def _video(x, what: str) -> np.ndarray:
    """F×H×W×3 uint8."""
    if isinstance(x, (list, tuple)):
        frames = [_image(f, f"{what} frame {i}") for i, f in enumerate(x)]
        if len({f.shape for f in frames}) > 1:
            raise ValueError(f"{what}: the frames differ in size ({sorted({f.shape[:2] for f in frames})})")
        return np.stack(frames)
    return _rgb(_uint8(x, what), what, "F×H×W×3")


def _known(x, what: str) -> np.ndarray:
    """bool F×H×W (F = 1 for an H×W mask), True = known: True, 1 or ≥ 128 of 255 (≥ 0.5 for floats)."""
    a = np.asarray(x.convert("L")) if isinstance(x, Image.Image) else (
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
    if a.ndim not in (2, 3) or 0 in a.shape:
        raise ValueError(f"{what}: shape {tuple(a.shape)}; a mask is H×W or F×H×W")
    if a.dtype.kind == "f":
        known = a >= 0.5
    elif a.dtype.kind in "iu" and a.size:
        known = a >= (1 if a.max() <= 1 else 128)
    elif a.dtype == np.bool_:
        known = a
    else:
        raise ValueError(f"{what}: {a.dtype} values; give bool, 0/1 or 0/255")
    return known if known.ndim == 3 else known[None]


def _fit(frames: np.ndarray, height: int, width: int, resample) -> np.ndarray:
    """F×h×w(×C) uint8 → F×height×width(×C): resized to cover, centre-cropped (the loader's way)."""
    h, w = frames.shape[1:3]
    if (h, w) == (height, width):
        return frames
    bucket = Bucket(height, width, 1)
    size = cover_size(w, h, bucket)
    return np.stack([centre_crop(np.asarray(Image.fromarray(f).resize(size, resample)), bucket) for f in frames])


def _planar(frames: np.ndarray) -> np.ndarray:  # F×H×W×3 → 3×F×H×W
    return np.ascontiguousarray(frames.transpose(3, 0, 1, 2))


# ------------------------------------------------------------------ conditions
def _clip(frames: np.ndarray, count: int, height: int, width: int, what: str, resample) -> np.ndarray:
    """F×h×w×3 frames → 3×count×H×W: the first ``count`` frames, at the output size."""
    if len(frames) < count:
        raise ValueError(f"{what} has {len(frames)} frames and the output {count}; give at least {count} frames "
                         f"or set num_frames={len(frames)}")
    return _planar(_fit(frames[:count], height, width, resample))


def sample_condition(task: Task, frames: int, height: int, width: int, image=None, video=None, mask=None,
                     depth=None, context_frames: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 3×F×H×W condition, uint8 1×F×H×W mask) of one prompt's inputs (see the module docstring)."""
    F, H, W, name = frames, height, width, task.name
    blank = np.zeros((3, F, H, W), np.uint8)
    if not task.given:  # t2v, t2i
        return task.build(blank, None, None)
    if name in ("i2v", "itrans"):
        if name == "itrans" and F < 3:
            raise ValueError(f"task='itrans' knows the first and the last frame: num_frames ≥ 3, not {F}")
        images, where = ([image], [0]) if name == "i2v" else (list(image), [0, F - 1])
        for i, (img, f) in enumerate(zip(images, where)):
            label = "image" if name == "i2v" else f"image[{i}] ({('first', 'last')[i]} frame)"
            blank[:, f] = _planar(_fit(_image(img, label)[None], H, W, Image.BILINEAR))[:, 0]
        return task.build(blank, None, None)
    if name in ("vexd", "vtrans"):
        ends = 1 if name == "vexd" else 2
        clips = [_video(c, "video" if ends == 1 else f"video[{i}] ({('head', 'tail')[i]} clip)")
                 for i, c in enumerate([video] if ends == 1 else video)]
        lengths = [len(c) for c in clips]
        if context_frames is None and len(set(lengths)) > 1:
            raise ValueError(f"task='vtrans': the head clip has {lengths[0]} frames and the tail clip {lengths[1]}; "
                             f"the task knows as many frames at each end: give clips of one length, or "
                             f"context_frames=k to use the head's last k and the tail's first k")
        k = context_frames or lengths[0]
        if min(lengths) < k:
            raise ValueError(f"task={name!r}: context_frames={k}, but the given clip has only {min(lengths)} frames")
        most = (F - 1) // ends
        if k > most:
            each = " at each end" if ends == 2 else ""
            raise ValueError(f"task={name!r}: {k} known frames{each} leave nothing to generate in num_frames={F}; "
                             f"give num_frames ≥ {ends * k + 1}, or context_frames ≤ {max(most, 1)}")
        blank[:, :k] = _planar(_fit(clips[0][len(clips[0]) - k:], H, W, Image.BILINEAR))  # continues the clip
        if ends == 2:
            blank[:, F - k:] = _planar(_fit(clips[1][:k], H, W, Image.BILINEAR))
        return task.build(blank, None, SimpleNamespace(context_frames=k))
    source = "depth" if name == "depth" else ("image" if task.image else "video")
    given = {"image": image, "video": video, "depth": depth}[source]
    resample = Image.BICUBIC if name in ("vsr", "isr") else Image.BILINEAR
    arr = _image(given, source)[None] if source == "image" else _video(given, source)
    clip = _clip(arr, F, H, W, source, resample)
    if "mask" in task.given:  # vinp, voutp, iinp, ioutp
        known = _known(mask, "mask")
        known = _fit(known.astype(np.uint8) * 255, H, W, Image.NEAREST) >= 128
        if len(known) == 1:
            known = np.repeat(known, F, axis=0)
        elif len(known) < F:
            raise ValueError(f"mask has {len(known)} frames and the output {F}; give an H×W mask (every frame) "
                             f"or at least {F} frames")
        return from_holes(clip, ~known[:F])
    if name in ("vsr", "isr"):  # the low-resolution clip is the condition as it is
        return all_known(clip)
    if task.side is not None:  # vedit (the source clip), depth (the depth clip, in grey)
        return task.build(clip, None, None, clip)
    return task.build(clip, None, None)  # vcolor, icolor: grey


def task_conditions(task: Task, batch: int, frames: int, height: int, width: int, image=None, video=None,
                    mask=None, depth=None, context_frames: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 B×3×F×H×W, uint8 B×1×F×H×W) for ``batch`` prompts: every input is one (for every prompt) or a
    list with one per prompt (itrans: a (first, last) pair, or a list of pairs; vtrans: (head, tail))."""
    given = {"image": image, "video": video, "mask": mask, "depth": depth}
    per = {}
    for kind in dict.fromkeys(task.given):
        is_one = _is_image if kind in ("image", "mask") else _is_video
        per[kind] = _per_prompt(given[kind], batch, is_one, kind, pair=task.given.count(kind) == 2)
    built = [sample_condition(task, frames, height, width, context_frames=context_frames,
                              **{k: v[b] for k, v in per.items()}) for b in range(batch)]
    return np.stack([c for c, _ in built]), np.stack([m for _, m in built])


def paste_given(frames: torch.Tensor, condition: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """``frames`` B×F×3×H×W in [0, 1] with the known pixels (``mask`` == 1) replaced by the condition's
    (uint8 B×3×F×H×W, B×1×F×H×W): exactly ``given / 255``, so uint8 outputs give back the given values."""
    expected = (condition.shape[0], condition.shape[2], 3) + condition.shape[3:]
    if tuple(frames.shape) != expected:
        raise ValueError(f"the decoded video is {tuple(frames.shape)} (B×F×3×H×W) and the task condition "
                         f"{expected}; they must match to paste the known pixels (or pass paste_known=False)")
    given = torch.from_numpy(condition).permute(0, 2, 1, 3, 4).float() / 255
    known = torch.from_numpy(mask).permute(0, 2, 1, 3, 4).bool()
    return torch.where(known, given, frames.float())


__all__ = ["INPUTS", "WHOLE_CLIP", "check_frames", "check_inputs", "default_frames", "paste_given", "resolve_task",
           "sample_condition", "task_conditions", "task_prompts", "takes"]
