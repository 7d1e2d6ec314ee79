"""Depth maps for the Many-for-Many ``depth`` task: a local depth-estimation model on every clip frame.

With ``depth.model_path`` set (a transformers folder that ``AutoModelForDepthEstimation`` and
``AutoImageProcessor`` load, e.g. a Depth-Anything checkpoint), every written clip gets a
``depth.mp4`` member: one depth map per frame of the clip's ``mp4`` — the same number of frames,
fps and size — so the training loader reads it at the clip's frame indices (docs/tasks.md):

1. each frame (decoded in order, as the loader counts them) goes through the image processor and
   the model, ``depth.frames_per_batch`` frames per forward; the processor's
   ``post_process_depth_estimation`` resizes each prediction to the clip's size;
2. the maps are normalised per clip, over all its frames, to 0..255 with near = bright:
   ``255 · (v − lo) / (hi − lo)`` for a disparity output (larger = nearer: Depth-Anything's relative
   head, DPT), ``255 · (hi − v) / (hi − lo)`` for a depth output (larger = farther: metric heads),
   rounded; a clip whose prediction is constant gets 0 everywhere;
3. the grey frames are written without loss (:func:`data_pipeline.video.encode_grey`: they decode to
   R = G = B = the value exactly).

The sample's json gets ``depth``: the model folder's identity (``{name, revision}``, the revision a
hash of its config.json and weights, as the latents stage records its encoders), its ``model_type``,
``output`` (disparity / depth), ``range`` (lo, hi of the raw prediction), ``frames`` and the encoding.
The raw predictions are kept at the model's resolution between the two passes, never the frames.
The actor runs on the GPU Ray gives it when ``ray.depth.gpus`` > 0, on CPU otherwise.
"""

from __future__ import annotations

import inspect
import io
import logging
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from .clip import InputResult
from .probe import Rejected

log = logging.getLogger("vchitect.curate")

DEPTH_MEMBER = "depth.mp4"
ENCODING = "grey H.264 4:4:4 full range qp 0 (lossless): R = G = B = depth level, near = 255"
# model types whose output grows with distance (metric depth); the rest predict disparity
METRIC_MODEL_TYPES = ("zoedepth", "glpn")


class DepthNotAvailable(RuntimeError):
    pass


def _depth_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

    return sorted(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES)


def load_depth_config(path: Optional[str]):
    """The transformers config of the depth model at ``path``; :class:`DepthNotAvailable` naming
    ``depth.model_path`` when it is not a local folder of a depth-estimation model."""
    if not path or not os.path.isdir(path):
        raise DepthNotAvailable(f"depth.model_path={path!r} is not a local folder; point it at a transformers "
                                "depth-estimation model folder (config.json, weights, preprocessor_config.json; e.g. "
                                "a Depth-Anything checkpoint), or unset depth.model_path to write no depth maps")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise DepthNotAvailable(f"depth.model_path={path!r}: no transformers model config there "
                                f"({type(exc).__name__}: {str(exc)[:200]}); point it at a depth-estimation "
                                "model folder") from None
    types = _depth_model_types()
    if config.model_type not in types:
        raise DepthNotAvailable(f"depth.model_path={path!r} holds a {config.model_type!r} model, not a depth-estimation "
                                f"model (AutoModelForDepthEstimation takes {', '.join(types)}); point it at e.g. "
                                "a Depth-Anything folder")
    if not os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        raise DepthNotAvailable(f"depth.model_path={path!r} has no preprocessor_config.json (its image processor); "
                                "save the processor next to the model (processor.save_pretrained(folder))")
    return config


def check_depth(cfg) -> None:
    """Fail before any work when depth maps are asked for but cannot be computed."""
    if cfg.depth.model_path:
        load_depth_config(cfg.depth.model_path)


def depth_output(config, setting: str = "auto") -> str:
    """``disparity`` (larger = nearer) or ``depth`` (larger = farther) for the model's prediction."""
    if setting != "auto":
        return setting
    metric = getattr(config, "depth_estimation_type", None) == "metric" or config.model_type in METRIC_MODEL_TYPES
    return "depth" if metric else "disparity"


def to_levels(pred: np.ndarray, lo: float, hi: float, output: str) -> np.ndarray:
    """Predictions → uint8 levels, normalised by the clip's range (lo, hi) with near = 255."""
    if hi <= lo:
        return np.zeros(pred.shape, np.uint8)
    x = (pred - lo) / (hi - lo) if output == "disparity" else (hi - pred) / (hi - lo)
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


class DepthEstimator:
    """Loads the depth model once; writes ``depth.mp4`` (and the json's ``depth``) for every clip."""

    def __init__(self, cfg, device: Optional[str] = None):
        import torch
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        from vchitect.models.encoders import folder_identity

        from .latents import actor_device

        d = cfg.depth
        config = load_depth_config(d.model_path)
        self.torch = torch
        self.device = device or actor_device(cfg.ray.depth.gpus)
        self.processor = AutoImageProcessor.from_pretrained(d.model_path, local_files_only=True)
        self.model = AutoModelForDepthEstimation.from_pretrained(
            d.model_path, dtype=getattr(torch, d.dtype), local_files_only=True).to(self.device).eval()
        self.output = depth_output(config, d.output)
        self.batch = d.frames_per_batch
        self.record = {"model": folder_identity(d.model_path), "model_type": config.model_type,
                       "output": self.output, "dtype": d.dtype, "encoding": ENCODING}

    def _resized(self, raw, size: tuple[int, int]) -> np.ndarray:
        """Raw predictions (B×h×w) at the clip size, float32 B×H×W, as the processor post-processes them."""
        from transformers.modeling_outputs import DepthEstimatorOutput

        torch = self.torch
        out = DepthEstimatorOutput(predicted_depth=raw)
        post = getattr(self.processor, "post_process_depth_estimation", None)
        if post is not None:
            sizes = {"target_sizes": [size] * len(raw)}
            if "source_sizes" in inspect.signature(post).parameters:  # ZoeDepth: crops its padding off first
                sizes["source_sizes"] = sizes["target_sizes"]
            maps = [r["predicted_depth"] for r in post(out, **sizes)]
            return torch.stack([m.reshape(size) for m in maps]).float().numpy()
        return torch.nn.functional.interpolate(raw[:, None].float(), size=size, mode="bicubic",
                                               align_corners=False)[:, 0].numpy()

    def _predict(self, frames: Iterable[np.ndarray]) -> tuple[list, tuple[int, int], float, float]:
        """Pass 1: raw predictions per batch (CPU, model resolution), the clip size and the range of the
        predictions at the clip size."""
        torch = self.torch
        raws, batch, size = [], [], None
        lo, hi = np.inf, -np.inf

        def run():
            nonlocal lo, hi
            inputs = self.processor(images=batch, return_tensors="pt").to(self.device)
            inputs = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.no_grad():
                raw = self.model(**inputs).predicted_depth.float().cpu()
            maps = self._resized(raw, size)
            lo, hi = min(lo, float(maps.min())), max(hi, float(maps.max()))
            raws.append(raw)
            batch.clear()

        for frame in frames:
            size = size or frame.shape[:2]
            batch.append(frame)
            if len(batch) == self.batch:
                run()
        if batch:
            run()
        if size is None:
            raise ValueError("the clip has no frames")
        return raws, size, lo, hi

    def depth_levels(self, frames: Iterable[np.ndarray]) -> tuple[Iterator[np.ndarray], int, float, float]:
        """uint8 H×W depth levels of ``frames`` (RGB H×W×3), normalised over all of them: (an iterator
        over the levels, the frame count, lo, hi)."""
        raws, size, lo, hi = self._predict(frames)

        def levels():
            for raw in raws:  # pass 2: the same post-processing, then the clip's normalisation
                yield from to_levels(self._resized(raw, size), lo, hi, self.output)

        return levels(), sum(len(r) for r in raws), lo, hi

    def clip_depth(self, mp4: bytes) -> tuple[bytes, dict]:
        """``depth.mp4`` of one clip and its json record."""
        import av

        from ..video import encode_grey, stream_fps

        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            rate = stream_fps(stream)
            frames = (f.to_ndarray(format="rgb24") for f in container.decode(stream))
            levels, n, lo, hi = self.depth_levels(frames)
        if not rate:
            raise ValueError("the clip has no frame rate")
        return encode_grey(levels, rate), dict(self.record, range=[round(lo, 6), round(hi, 6)], frames=n)

    def __call__(self, results: list[InputResult]) -> list[InputResult]:
        for res in results:
            kept = []
            for clip in res.clips:
                try:
                    data, record = self.clip_depth(clip.mp4)
                except Exception as exc:  # one clip the model or codec fails on is rejected, not the job
                    log.exception("curate: depth failed on %s clip %d", res.uri, clip.clip)
                    res.reject("depth", Rejected("depth_error", f"{type(exc).__name__}: {exc}"), clip=clip.clip,
                               start=clip.start, end=clip.end)
                    continue
                clip.extra[DEPTH_MEMBER] = data
                clip.meta["depth"] = record
                kept.append(clip)
            res.clips = kept
        return results
