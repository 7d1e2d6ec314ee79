"""The on-device step of decode mode: pixels → VAE latents (split across the SP group), captions →
text embeddings. Precomputed batches pass through unchanged apart from the device move.

    batch = encode_batch(batch, vae, text_encoder, device, sp_group=mesh["sp"].get_group())
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from vchitect.config import ConfigError
from vchitect.data.config import text_encoder_configured  # noqa: F401  (re-exported)
from vchitect.data.pixels import condition_to_unit, pixels_to_unit


def vae_encode_split(encode: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                     group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """``encode`` a B×3×F×H×W batch with the work split across the ranks of ``group``.

    The ranks of an SP group hold the same batch. Rank r encodes samples [r·k, (r+1)·k) with
    k = ceil(B / world); the pieces are all-gathered so every rank returns the full B×C×F'×H'×W'.
    When B is not a multiple of the group size the last sample is repeated to fill the pieces.
    """
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return encode(pixels)
    world, rank, B = dist.get_world_size(group), dist.get_rank(group), pixels.shape[0]
    k = math.ceil(B / world)
    idx = torch.arange(rank * k, (rank + 1) * k).clamp_(max=B - 1)
    local = encode(pixels[idx.to(pixels.device)]).contiguous()  # k×C×F'×H'×W'
    pieces = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(pieces, local, group=group)
    return torch.cat(pieces)[:B]


class PixelSpace:
    """The "VAE" of a pixel-space model: pixels in [-1, 1] are the model input unchanged."""

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float()


def is_pixel_space(cfg) -> bool:
    """No VAE configured and latents shaped like pixels: 3 channels, no spatial or temporal
    downsampling (``cfg`` is a :class:`DataConfig`). Such a run trains on [-1, 1] RGB directly."""
    return (cfg.encoders.vae_path is None and cfg.latent_channels == 3
            and cfg.vae_spatial_factor == 1 and cfg.vae_temporal_factor == 1)


def text_encoder_options(cfg, shard_mesh=None) -> dict:
    """The keyword arguments of :func:`~vchitect.models.encoders.load_text_encoder` beyond its positional
    (path, kind, max_length, device, dtype, pooled_path) that ``cfg`` (a :class:`DataConfig`) sets: the sd3
    kind's mask mode and separate folders, and ``shard_mesh`` when ``data.encoders.shard`` is on."""
    e = cfg.encoders
    opts = {"masks": cfg.text.masks} if e.text_encoder_kind == "sd3" else {}
    opts.update({k: getattr(e, k) for k in ("clip_l_path", "clip_g_path", "t5_path") if getattr(e, k)})
    if e.shard and shard_mesh is not None:
        opts["shard_mesh"] = shard_mesh
    return opts


def load_encoders(cfg, device: str | torch.device = "cpu", shard_mesh=None):
    """(vae, text_encoder) from ``cfg.encoders`` (a :class:`DataConfig`); None for an unset path.
    ``shard_mesh``: the mesh a ``data.encoders.shard`` T5 is sharded over (the trainer's data-parallel
    mesh; None in one process).

    Decode mode needs both (checked here); precomputed batches need neither; in auto mode a batch
    that needs them and lacks them fails in :func:`encode_batch` with the same advice. A pixel-space
    config (:func:`is_pixel_space`) gets :class:`PixelSpace` as its VAE."""
    from vchitect.models.encoders import load_text_encoder, load_vae

    e = cfg.encoders
    vae = load_vae(e.vae_path, device, e.dtype, e.sample_posterior) if e.vae_path else None
    if vae is None and is_pixel_space(cfg):
        vae = PixelSpace()
    text = load_text_encoder(e.text_encoder_path, e.text_encoder_kind, cfg.text.max_length, device,
                             e.dtype, e.pooled_encoder_path, cache_size=e.text_cache_size,
                             **text_encoder_options(cfg, shard_mesh)) \
        if text_encoder_configured(cfg) else None
    if cfg.source == "shards" and cfg.mode == "decode" and (vae is None or text is None):
        raise ConfigError(f"data.mode={cfg.mode} decodes videos, which needs data.encoders.vae_path and "
                         f"data.encoders.text_encoder_path (local folders); set both (or train in "
                         f"pixel space: latent_channels 3, vae factors 1, no vae_path), or use "
                         f"mode=precomputed with shards that hold latent.npy / text.npy")
    return vae, text


def encode_batch(batch: dict, vae=None, text_encoder=None, device: str | torch.device = "cpu",
                 sp_group: Optional[dist.ProcessGroup] = None) -> dict:
    """Make ``latents``, ``text``, ``text_mask``, ``pooled`` present and on ``device``; a multi-task
    batch's ``condition`` + ``condition_mask`` become ``condition`` float32 B×4×F×H×W (pixel space,
    :func:`condition_to_unit`)."""
    batch = dict(batch)
    if "condition_mask" in batch:
        batch["condition"] = condition_to_unit(batch.pop("condition").to(device, non_blocking=True),
                                               batch.pop("condition_mask").to(device, non_blocking=True))
    if "pixels" in batch:
        if vae is None:
            raise ValueError("this batch holds pixels (decode mode) but no VAE was given; set "
                             "data.encoders.vae_path, use precomputed latents, or train in pixel "
                             "space (latent_channels 3, vae_spatial_factor 1, vae_temporal_factor 1)")
        x = pixels_to_unit(batch.pop("pixels").to(device, non_blocking=True))
        batch["latents"] = vae_encode_split(vae.encode, x, sp_group)
    if "text" not in batch:
        if text_encoder is None:
            raise ValueError("this batch has captions but no text embeddings, and no text encoder was "
                             "given; set data.encoders.text_encoder_path")
        batch["text"], batch["text_mask"], batch["pooled"] = text_encoder.encode(batch["captions"])
    elif getattr(text_encoder, "collective", False):
        text_encoder.encode([""])  # a sharded encoder's forward is a collective: run it on every rank
    for k in ("latents", "text", "text_mask", "pooled"):
        batch[k] = batch[k].to(device, non_blocking=True)
    return batch
