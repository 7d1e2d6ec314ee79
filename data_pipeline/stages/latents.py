"""Latent precomputation (VAE + text encoder on GPU actors): not implemented yet.

The shard contract reserves ``latent.npy`` (float16, C×F×H×W), ``text.npy`` and
``text_mask.npy``; until this stage exists a run with ``latents.enabled=true`` stops before any
work with the error below, rather than writing shards without the latents it asked for.
"""

from __future__ import annotations


class LatentsNotAvailable(RuntimeError):
    pass


def check_latents(cfg) -> None:
    if cfg.latents.enabled:
        raise LatentsNotAvailable(
            "latents.enabled=true: latent precomputation is not implemented in this version of "
            "data_pipeline; set latents.enabled=false and let the trainer encode clips on the fly")
