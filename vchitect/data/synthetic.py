"""Synthetic data: random latents and text embeddings of the configured shapes, no I/O.

Same batch format, ``state_dict`` / ``load_state_dict`` and ``metrics`` as :class:`ShardLoader`; used
by benchmarks and smoke tests. Batch ``n`` of DP rank ``r`` depends only on (seed, r, n), so SP/TP
ranks that pass the same ``dp_rank`` get identical batches and a resumed loader continues exactly.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from .buckets import Bucket, batch_size, latent_shape
from .config import DataConfig


class SyntheticLoader:
    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        buckets = [Bucket(b.height, b.width, b.frames) for b in cfg.buckets]
        self.videos = [b for b in buckets if not b.is_image] or buckets
        self.images = [b for b in buckets if b.is_image]
        self.step = 0
        self._t0, self._samples = None, 0  # for the rate: samples since this loader was built
        self.total_samples = 0  # every sample delivered, resumes included (checkpointed)

    def _bucket(self, g: torch.Generator) -> Bucket:
        pool = self.images if self.images and torch.rand((), generator=g) < self.cfg.image_ratio \
            else self.videos
        return pool[int(torch.randint(len(pool), (), generator=g))]

    def make_batch(self, n: int) -> dict:
        c = self.cfg
        g = torch.Generator().manual_seed(((c.seed * 1_000_003 + self.dp_rank) * 1_000_003 + n) % 2**63)
        b = self._bucket(g)
        B = batch_size(b, c.token_budget, c.max_batch_size, c.vae_spatial_factor, c.vae_temporal_factor,
                       c.patch_size)
        L, D, P = c.text.max_length, c.text.dim, c.text.pooled_dim
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        keys = [f"synthetic-{self.dp_rank}-{n}-{i}" for i in range(B)]
        return {
            "latents": torch.randn((B,) + latent_shape(b, c.latent_channels, c.vae_spatial_factor,
                                                       c.vae_temporal_factor), generator=g),
            "text": torch.randn(B, L, D, generator=g),
            "text_mask": torch.arange(L)[None, :] < lengths[:, None],  # B×L
            "pooled": torch.randn(B, P, generator=g),
            "captions": [f"synthetic caption {k}" for k in keys], "keys": keys,
            "bucket": (b.height, b.width, b.frames), "epoch": 0, "epochs": [0] * B,
        }

    def __iter__(self) -> Iterator[dict]:
        self._t0 = self._t0 or time.perf_counter()
        while True:
            batch = self.make_batch(self.step)
            self.step += 1
            self._samples += len(batch["keys"])
            self.total_samples += len(batch["keys"])
            yield batch

    def state_dict(self) -> dict:
        return {"synthetic_step": self.step, "samples": self.total_samples}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["synthetic_step"])
        self.total_samples = int(sd.get("samples", 0))

    def metrics(self) -> dict:
        elapsed = time.perf_counter() - self._t0 if self._t0 else 0.0
        return {"data/samples": self.total_samples, "data/batches": self.step, "data/skipped": 0,
                "data/delivered_per_s": self._samples / elapsed if elapsed else 0.0}
