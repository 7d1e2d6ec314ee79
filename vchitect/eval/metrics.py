"""Video quality metrics in the style of VBench (Huang et al., "VBench: Comprehensive Benchmark Suite
for Video Generative Models", CVPR 2024, Sec. 3 / Appendix), implemented from the paper's definitions.

* **Temporal flickering**: the mean absolute difference between consecutive frames, on 0…255 pixel
  values averaged over pixels and channels, then over the T−1 frame pairs of a video, then over the
  videos; reported as (255 − mean) / 255, so 1 means no change between frames.
* **Subject consistency** (DINO features in VBench) and **background consistency** (CLIP image
  features in VBench), one formula with different features d_t (L2-normalised) of frame t:

      S = 1/(T−1) · Σ_{t=2..T} ½ · (⟨d_1, d_t⟩ + ⟨d_{t−1}, d_t⟩)

  averaged over the videos.

The feature extractor is pluggable: any callable ``frames F×H×W×3 uint8 → F×D``. ``dino:PATH`` and
``clip:PATH`` load a local transformers checkpoint (a DINO/DINOv2 ``AutoModel``: the CLS token of the
last hidden state; a CLIP vision tower: its projected ``image_embeds``). Without one, the fallback
``pixels`` extractor uses a 16×16 thumbnail of the frame scaled to [−1, 1] as its feature. That
fallback measures the same formula on raw appearance; its values are not comparable with VBench's
published numbers (which need DINO ViT-B/16 and CLIP ViT-B/32).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

FeatureExtractor = Callable[[np.ndarray], np.ndarray]  # F×H×W×3 uint8 → F×D


def _as_video(frames) -> np.ndarray:
    x = np.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3 or x.shape[0] < 2:
        raise ValueError(f"expected F×H×W×3 frames with F >= 2, got shape {x.shape}")
    return x


def flicker_mae(frames) -> float:
    """Mean absolute difference of consecutive frames of one video (0…255 scale)."""
    x = _as_video(frames).astype(np.float64)
    return float(np.abs(x[1:] - x[:-1]).mean(axis=(1, 2, 3)).mean())


def temporal_flickering(videos: Sequence) -> float:
    """VBench temporal flickering of ``videos`` (each F×H×W×3 uint8): (255 − mean MAE) / 255."""
    if not videos:
        raise ValueError("no videos")
    mae = float(np.mean([flicker_mae(v) for v in videos]))
    return (255.0 - mae) / 255.0


def consistency(features: np.ndarray) -> float:
    """The VBench subject/background consistency of one video from its per-frame features F×D."""
    d = np.asarray(features, dtype=np.float64)
    if d.ndim != 2 or d.shape[0] < 2:
        raise ValueError(f"expected F×D features with F >= 2, got shape {d.shape}")
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    first = d[1:] @ d[0]                          # ⟨d_1, d_t⟩, t = 2..T
    prev = np.einsum("td,td->t", d[1:], d[:-1])   # ⟨d_{t−1}, d_t⟩
    return float((0.5 * (first + prev)).mean())


def pixel_features(frames: np.ndarray, size: int = 16) -> np.ndarray:
    """Fallback extractor: each frame as a ``size``×``size`` thumbnail in [−1, 1], flattened."""
    import torch

    x = torch.from_numpy(_as_video(frames)).permute(0, 3, 1, 2).float()  # F×3×H×W
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
    return (x / 127.5 - 1.0).flatten(1).numpy()


class HFImageFeatures:
    """Per-frame features from a local transformers checkpoint (never downloaded).

    ``kind="dino"``: ``AutoModel`` (ViT/DINO/DINOv2), CLS token of the last hidden state;
    ``kind="clip"``: ``CLIPVisionModelWithProjection``, ``image_embeds``.
    """

    def __init__(self, path: str, kind: str, device: str = "cpu", batch: int = 32):
        import transformers

        if kind not in ("dino", "clip"):
            raise ValueError(f"feature kind {kind!r}: use dino or clip")
        cls = transformers.CLIPVisionModelWithProjection if kind == "clip" else transformers.AutoModel
        self.model = cls.from_pretrained(path).to(device).eval()
        self.processor = transformers.AutoImageProcessor.from_pretrained(path)
        self.kind, self.device, self.batch = kind, device, batch

    def __call__(self, frames: np.ndarray) -> np.ndarray:
        import torch

        out = []
        frames = _as_video(frames)
        with torch.no_grad():
            for i in range(0, len(frames), self.batch):
                inputs = self.processor(images=list(frames[i:i + self.batch]), return_tensors="pt")
                pixel_values = inputs["pixel_values"].to(self.device)
                o = self.model(pixel_values=pixel_values)
                f = o.image_embeds if self.kind == "clip" else o.last_hidden_state[:, 0]
                out.append(f.float().cpu().numpy())
        return np.concatenate(out)


def load_feature_extractor(spec: Optional[str]) -> tuple[str, FeatureExtractor]:
    """``None``/``"pixels"`` → the thumbnail fallback; ``"dino:PATH"`` / ``"clip:PATH"`` → a local model.
    Returns (name, extractor)."""
    if spec in (None, "", "pixels"):
        return "pixels", pixel_features
    kind, sep, path = spec.partition(":")
    if not sep or kind not in ("dino", "clip"):
        raise ValueError(f"feature extractor {spec!r}: use pixels, dino:PATH or clip:PATH (a local folder)")
    return kind, HFImageFeatures(path, kind)


def video_metrics(videos: Sequence, subject: Optional[str] = None, background: Optional[str] = None) -> dict:
    """Temporal flickering, subject consistency and background consistency of ``videos``.

    ``subject`` / ``background``: feature extractor specs (see :func:`load_feature_extractor`);
    VBench uses DINO for the subject and CLIP for the background.
    """
    s_name, s_fn = load_feature_extractor(subject)
    b_name, b_fn = (s_name, s_fn) if background == subject else load_feature_extractor(background)
    subj = [consistency(s_fn(v)) for v in videos]
    back = subj if b_fn is s_fn else [consistency(b_fn(v)) for v in videos]
    return {"temporal_flickering": temporal_flickering(videos),
            "subject_consistency": float(np.mean(subj)), "subject_features": s_name,
            "background_consistency": float(np.mean(back)), "background_features": b_name,
            "videos": len(videos)}


__all__ = ["FeatureExtractor", "HFImageFeatures", "consistency", "flicker_mae", "load_feature_extractor",
           "pixel_features", "temporal_flickering", "video_metrics"]
