"""Filters. Each returns a score; :func:`check` turns a score and its bounds into a rejection.

Cheap filters (rules, blur, motion, perceptual hash) run inside the video task on frames at
analysis size. Model filters (OCR text area, NSFW, aesthetic) are classes loaded once per actor
and applied to a few sampled frames per clip.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

import cv2
import numpy as np

from .probe import Rejected

log = logging.getLogger("vchitect.curate")


def check(name: str, score: float, lo: Optional[float] = None, hi: Optional[float] = None) -> None:
    """Raise :class:`Rejected` (reason ``name``) when ``score`` is outside [lo, hi]."""
    if lo is not None and score < lo:
        raise Rejected(name, f"{name} score {score:.4g} < {lo:.4g}", score)
    if hi is not None and score > hi:
        raise Rejected(name, f"{name} score {score:.4g} > {hi:.4g}", score)


# ----------------------------------------------------------------------------- rules


def rules(duration: float, width: int, height: int, fps: float, f) -> None:
    """Duration, resolution, fps and aspect-ratio rules (``f`` is a FilterConfig)."""
    check("duration", duration, f.min_duration, f.max_duration)
    if width < f.min_width or height < f.min_height:
        raise Rejected("resolution", f"{width}x{height} below {f.min_width}x{f.min_height}")
    check("fps", fps, f.min_fps, f.max_fps)
    check("aspect", width / height, f.min_aspect, f.max_aspect)


# ----------------------------------------------------------------------------- cheap scores


def sharpness(gray_frames: Sequence[np.ndarray]) -> float:
    """Variance of the Laplacian over the edges of each contrast-stretched frame, averaged.

    Stretching the contrast and looking only at edge pixels (gradient above a tenth of the
    frame's strongest) makes the score independent of how much of the frame is flat, so a small
    sharp object on a plain background still scores as sharp and a blurred one does not.
    """
    scores = []
    for g in gray_frames:
        g = g.astype(np.float32)
        lo, hi = float(g.min()), float(g.max())
        if hi - lo < 1.0:
            scores.append(0.0)
            continue
        g = (g - lo) * (255.0 / (hi - lo))
        lap = cv2.Laplacian(g, cv2.CV_32F)
        grad = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
        edges = grad > 0.1 * float(grad.max())
        edges = cv2.dilate(edges.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        scores.append(float(lap[edges].var()) if edges.any() else 0.0)
    return float(np.mean(scores)) if scores else 0.0


FLOW_SIZE = 128  # long side (px) at which optical flow is computed


def motion(pairs: Sequence[tuple[np.ndarray, np.ndarray]], dt: float) -> float:
    """Farneback optical flow between frame pairs ``dt`` seconds apart.

    Score: mean flow magnitude of the fastest-moving 10% of pixels, in frame long sides per
    second — near 0 for a static shot, large for shake; one moving object of a few percent of
    the frame still counts.
    """
    scores = []
    for a, b in pairs:
        long_side = max(a.shape)
        if long_side > FLOW_SIZE:  # flow is measured in long sides per second: resolution-free
            size = (round(a.shape[1] * FLOW_SIZE / long_side), round(a.shape[0] * FLOW_SIZE / long_side))
            a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
            b = cv2.resize(b, size, interpolation=cv2.INTER_AREA)
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 3, 9, 3, 5, 1.1, 0)
        mag = np.sqrt((flow.astype(np.float64) ** 2).sum(-1)).ravel()
        k = max(1, mag.size // 10)
        top = np.partition(mag, mag.size - k)[-k:]
        scores.append(float(top.mean()) / max(a.shape) / dt)
    return float(np.mean(scores)) if scores else 0.0


def phash_rgb(rgb: np.ndarray) -> list[int]:
    """Three 64-bit perceptual hashes of a frame: luma and two opponent-colour channels.

    A DCT hash keeps only which coefficients are above the median, so a red and a green
    triangle on the same grey background hash alike in luma (and in each RGB channel); in the
    opponent channels R−G and (R+G)/2−B their signs differ.
    """
    f = rgb.astype(np.float32)
    r, g, b = f[:, :, 0], f[:, :, 1], f[:, :, 2]
    return [phash(0.299 * r + 0.587 * g + 0.114 * b), phash(r - g), phash((r + g) / 2 - b)]


def phash(channel: np.ndarray) -> int:
    """64-bit DCT perceptual hash of one image channel; 0 for a flat channel (stable under noise)."""
    small = cv2.resize(channel.astype(np.float32), (32, 32), interpolation=cv2.INTER_AREA)
    low = cv2.dct(small)[:8, :8].ravel()
    if np.abs(low[1:]).max() < 8.0:  # no structure: the bits would only encode noise
        return 0
    med = np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(low > med) if bit))


# ----------------------------------------------------------------------------- model filters


class TextAreaScorer:
    """Fraction of the frame covered by text boxes (rapidocr-onnxruntime, detection only)."""

    def __init__(self, det_limit: int = 320):
        from rapidocr_onnxruntime import RapidOCR

        # Detect at (at most) the analysis size: large overlaid text is what we are after, and the
        # default upscaling to 736 px is slow and finds "text" in plain shapes.
        self.engine = RapidOCR(det_limit_side_len=max(det_limit, 64), det_limit_type="max")

    def __call__(self, rgb: np.ndarray) -> float:
        h, w = rgb.shape[:2]
        result, _ = self.engine(np.ascontiguousarray(rgb[:, :, ::-1]), use_det=True, use_cls=False, use_rec=False)
        if not result:
            return 0.0
        mask = np.zeros((h, w), np.uint8)
        for box in result:
            pts = np.asarray(box[0] if len(box) and np.ndim(box[0]) == 2 else box, np.float32)
            cv2.fillPoly(mask, [pts.reshape(-1, 2).astype(np.int32)], 1)
        return float(mask.mean())


# nudenet classes that count as explicit
NSFW_CLASSES = frozenset({
    "FEMALE_GENITALIA_EXPOSED", "MALE_GENITALIA_EXPOSED", "FEMALE_BREAST_EXPOSED",
    "BUTTOCKS_EXPOSED", "ANUS_EXPOSED",
})


class NSFWScorer:
    """Highest nudenet confidence of an explicit class in the frame (0 when none)."""

    def __init__(self):
        from nudenet import NudeDetector

        self.detector = NudeDetector()

    def __call__(self, rgb: np.ndarray) -> float:
        dets = self.detector.detect(np.ascontiguousarray(rgb[:, :, ::-1]))
        return float(max([d["score"] for d in dets if d.get("class") in NSFW_CLASSES], default=0.0))


class AestheticScorer:
    """A linear/MLP head on the CLIP image embedding, both from local paths."""

    def __init__(self, clip_path: str, head_path: str):
        import torch
        from transformers import CLIPImageProcessor, CLIPModel

        self.torch = torch
        self.processor = CLIPImageProcessor.from_pretrained(clip_path)
        self.model = CLIPModel.from_pretrained(clip_path).eval()
        self.head = load_head(head_path)

    def __call__(self, frames: Sequence[np.ndarray]) -> float:
        torch = self.torch
        with torch.no_grad():
            inputs = self.processor(images=list(frames), return_tensors="pt")
            emb = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            if not isinstance(emb, torch.Tensor):  # some versions return a model output
                emb = emb.pooler_output if hasattr(emb, "pooler_output") else emb[0]
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return float(self.head(emb.float()).mean())


def load_head(path: str):
    """A torch module from a state dict: ``weight``/``bias`` (linear) or ``layers.N.weight``… (MLP)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    elif path.endswith(".npz"):
        sd = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    weights = sorted((k for k in sd if k.endswith("weight")),
                     key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])
    layers = []
    for i, k in enumerate(weights):
        w = sd[k].float()
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.weight.data.copy_(w)
        b = sd.get(k[: -len("weight")] + "bias")
        if b is not None:
            lin.bias.data.copy_(b.float())
        else:
            lin.bias.data.zero_()
        layers.append(lin)
        if i < len(weights) - 1:
            layers.append(torch.nn.ReLU())
    if not layers:
        raise ValueError(f"{path}: no `weight` tensors; expected a linear or MLP head state dict")
    return torch.nn.Sequential(*layers).eval()
