"""Buckets: the (height, width, frames) shapes a batch can have, and the batch size of each.

A video goes to the video bucket (frames > 1) whose aspect ratio is closest to its own among those
whose duration (frames / fps) it can fill; ties go to the longer bucket. An image (or a video picked
to serve as an image) goes to the closest image bucket (frames == 1). A bucket's batch size is the
token budget divided by its latent patch tokens, so every batch costs roughly the same compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Bucket:
    height: int
    width: int
    frames: int

    @property
    def is_image(self) -> bool:
        return self.frames == 1

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}x{self.frames}"


def cover_size(w: int, h: int, bucket: Bucket) -> tuple[int, int]:
    """Smallest size with the clip's aspect ratio that covers the bucket (then :func:`centre_crop`):
    how the loader, and VchitectPipeline's task inputs, bring a frame to a bucket's size."""
    scale = max(bucket.width / w, bucket.height / h)
    return max(bucket.width, round(w * scale)), max(bucket.height, round(h * scale))


def centre_crop(img, bucket: Bucket):
    """The bucket-sized centre of an H×W(×C) array that covers it."""
    top = (img.shape[0] - bucket.height) // 2
    left = (img.shape[1] - bucket.width) // 2
    return img[top:top + bucket.height, left:left + bucket.width]


def latent_shape(b: Bucket, channels: int, spatial: int, temporal: int) -> tuple[int, int, int, int]:
    """C×F'×H'×W' of a bucket's latent (causal video VAE: F' = 1 + (F - 1) // temporal)."""
    return (channels, 1 + (b.frames - 1) // temporal, b.height // spatial, b.width // spatial)


def tokens(b: Bucket, spatial: int, temporal: int, patch: int) -> int:
    _, f, h, w = latent_shape(b, 1, spatial, temporal)
    return f * (h // patch) * (w // patch)


def batch_size(b: Bucket, token_budget: int, max_batch: int, spatial: int, temporal: int, patch: int) -> int:
    return max(1, min(max_batch, token_budget // tokens(b, spatial, temporal, patch)))


def choose_bucket(buckets: list[Bucket], width: int, height: int, duration: Optional[float],
                  fps: float, image: bool) -> Optional[Bucket]:
    """The bucket for a ``width``×``height`` clip of ``duration`` seconds; None when none fits."""
    if width <= 0 or height <= 0:
        return None
    aspect = math.log(width / height)
    if image:
        cands = [b for b in buckets if b.is_image]
    else:
        cands = [b for b in buckets if not b.is_image
                 and duration is not None and (b.frames - 1) / fps <= duration + 1e-6]
    if not cands:
        return None
    return min(cands, key=lambda b: (round(abs(math.log(b.width / b.height) - aspect), 6), -b.frames,
                                     -b.height * b.width))
