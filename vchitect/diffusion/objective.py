"""Rectified-flow training objective.

    x_t = (1 − t)·x0 + t·ε,   target v = ε − x0,   model input timestep = 1000·t

Timesteps come from a logit-normal (SD3: t = sigmoid(n), n ~ N(mean, std)) or a uniform
distribution, then pass through the shift t' = s·t / (1 + (s − 1)·t), which moves mass towards
high noise. With ``shift_reference_tokens > 0`` the shift grows with the token count like SD3's
resolution-dependent shift, s = shift · sqrt(tokens / shift_reference_tokens): larger videos keep
more of their layout at a given t, so they need more noise for the same difficulty.
Text is replaced by the empty-prompt embedding with probability ``text_dropout`` so that the
model also learns the unconditional prediction used by classifier-free guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import DiffusionConfig


def shift_for_tokens(cfg: DiffusionConfig, tokens: int) -> float:
    if cfg.shift_reference_tokens <= 0:
        return cfg.shift
    return cfg.shift * math.sqrt(tokens / cfg.shift_reference_tokens)


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_timesteps(cfg: DiffusionConfig, batch: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    """``batch`` noise levels t in (0, 1), 1 = pure noise (float32, CPU)."""
    if cfg.timestep_sampling == "logit_normal":
        t = torch.sigmoid(torch.randn(batch, generator=generator) * cfg.logit_std + cfg.logit_mean)
    else:
        t = torch.rand(batch, generator=generator)
    return shift_timesteps(t, shift_for_tokens(cfg, tokens))


def loss_weights(cfg: DiffusionConfig, t: torch.Tensor) -> torch.Tensor:
    if cfg.loss_weighting == "cosmap":
        return 2.0 / (math.pi * (1 - 2 * t + 2 * t * t))
    return torch.ones_like(t)


@dataclass
class NullText:
    """The empty-prompt conditioning: text L×D, mask L, pooled P."""

    text: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    @classmethod
    def zeros(cls, length: int, dim: int, pooled_dim: int) -> "NullText":
        """Stand-in when no text encoder is loaded (precomputed / synthetic data): zero embeddings with a
        single valid token (a fully masked row would leave attention without keys)."""
        mask = torch.zeros(length, dtype=torch.bool)
        mask[0] = True
        return cls(torch.zeros(length, dim), mask, torch.zeros(pooled_dim))


def drop_text(batch: dict, null: NullText, p: float, generator: torch.Generator) -> dict:
    """Replace each sample's text by ``null`` with probability ``p`` (same draw on every SP/TP rank)."""
    B = batch["text"].shape[0]
    drop = torch.rand(B, generator=generator) < p
    if not bool(drop.any()):
        return batch
    batch = dict(batch)
    d = drop.to(batch["text"].device)
    L = batch["text"].shape[1]
    text_null = _fit(null.text.to(batch["text"]), L)
    mask_null = _fit(null.mask.to(batch["text_mask"].device), L)
    batch["text"] = torch.where(d[:, None, None], text_null[None], batch["text"])
    batch["text_mask"] = torch.where(d[:, None], mask_null[None], batch["text_mask"].bool())
    batch["pooled"] = torch.where(d[:, None], null.pooled.to(batch["pooled"])[None], batch["pooled"])
    return batch


def _fit(x: torch.Tensor, length: int) -> torch.Tensor:
    if x.shape[0] >= length:
        return x[:length]
    pad = x.new_zeros((length - x.shape[0],) + tuple(x.shape[1:]))
    return torch.cat([x, pad])


def rectified_flow_loss(model, batch: dict, t: torch.Tensor, noise: torch.Tensor,
                        cfg: DiffusionConfig) -> torch.Tensor:
    """Mean-squared error between the model's velocity and ε − x0 at noise level t (B).

    ``batch["condition"]`` (B×Cc×F×H×W pixel space, optional) goes to the model's condition adapter;
    text dropout leaves it in place, so the model learns the text-unconditional prediction with the
    condition that classifier-free guidance asks for (see sampling.py)."""
    x0 = batch["latents"]
    tt = t.to(x0.device, x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    x_t = (1 - tt) * x0 + tt * noise
    kwargs = {} if batch.get("condition") is None else {"condition": batch["condition"]}
    pred = model(x_t, batch["text"], batch["pooled"], t.to(x0.device) * 1000,
                 encoder_attention_mask=batch.get("text_mask"), return_dict=False, **kwargs)[0]
    per_sample = (pred.float() - (noise - x0).float()).square().flatten(1).mean(1)
    w = loss_weights(cfg, t.to(per_sample.device))
    return (w * per_sample).mean()


def sample_noise(shape, generator: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    """Noise drawn on CPU from ``generator`` (identical on every rank with the same seed), then moved."""
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


__all__ = ["DiffusionConfig", "NullText", "drop_text", "loss_weights", "rectified_flow_loss", "sample_noise",
           "sample_timesteps", "shift_for_tokens", "shift_timesteps"]


