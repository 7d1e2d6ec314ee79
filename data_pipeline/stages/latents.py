"""Latent precomputation: once, at curation, what decode-mode training would encode on the device.

The stage runs the training stack itself: the encoders of ``latents.encoders`` (a training config's
``data.encoders``) loaded by :func:`vchitect.data.encode.load_encoders`, and, per clip, the crop of
the trainer's decode mode (:meth:`vchitect.data.samples.SampleDecoder.decode_clip`): the bucket
of ``latents.buckets`` that :func:`~vchitect.data.buckets.choose_bucket` gives the clip, and the
frame window at ``latents.fps`` that decode mode draws for the sample key in epoch 0 of a run with
``data.seed = latents.seed``. A clip too short for every video bucket is one frame in the closest
image bucket (decode mode's image pick) when there is one, else rejected (``no_bucket``). Per sample:

    latent.npy     float16 C×F'×H'×W'  VAEEncoder.encode of the crop (shifted/scaled as in training)
    text.npy       float16 L×D         TextEncoder.encode of the caption (L = latents.text.max_length)
    text_mask.npy  uint8   L
    pooled.npy     float16 P
    json latents   the VAE's and text encoder's describe(), the shapes, the bucket, fps, seed and
                   the source frame index of each frame

The actor runs on the GPU Ray gives it when ``ray.latents.gpus`` > 0, on CPU otherwise.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
from typing import Optional

import numpy as np

from .clip import InputResult
from .probe import Rejected

log = logging.getLogger("vchitect.curate")


class LatentsNotAvailable(RuntimeError):
    pass


def check_latents(cfg) -> None:
    """Fail before any work when latents are asked for but cannot be computed."""
    if not cfg.latents.enabled:
        return
    e = cfg.latents.encoders
    keys = ["vae_path", "text_encoder_path", "pooled_encoder_path"]
    if e.text_encoder_kind == "sd3":  # a pipeline folder, or the three separate ones
        keys = ["vae_path"] + ([] if e.text_encoder_path is None and e.clip_l_path else ["text_encoder_path"]) + \
            [k for k in ("clip_l_path", "clip_g_path", "t5_path") if getattr(e, k)]
    for key in keys:
        path = getattr(e, key)
        if (path or key != "pooled_encoder_path") and not (path and os.path.isdir(path)):
            raise LatentsNotAvailable(f"latents.encoders.{key}={path!r} is not a local model folder; set it "
                                      "(as data.encoders of the training config), or latents.enabled=false "
                                      "to let the trainer encode clips on the fly")


def actor_device(gpus: float) -> str:
    """Where a model actor runs: ``cuda`` when its stage reserves GPUs (Ray then sets
    CUDA_VISIBLE_DEVICES to the actor's) and CUDA is there, else ``cpu``."""
    import torch

    if gpus > 0 and not torch.cuda.is_available():
        log.warning("curate: the stage reserves %g GPU(s) per actor but this actor sees no CUDA device; "
                    "running on CPU", gpus)
    return "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"


def training_data_config(lc):
    """The decode-mode :class:`~vchitect.data.config.DataConfig` a training run with these encoders,
    text shapes, buckets, fps and seed has (``lc`` is the curation config's ``latents``)."""
    from vchitect.data.config import DataConfig

    # the posterior mode: data.encoders.sample_posterior is decode mode's, drawn afresh every step
    encoders = dataclasses.replace(lc.encoders, sample_posterior=False, text_cache_size=0)
    return DataConfig(source="synthetic", mode="decode", buckets=list(lc.buckets), fps=lc.fps,
                      seed=lc.seed, image_ratio=0.0, text=lc.text, encoders=encoders)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


class LatentEncoder:
    """Loads the VAE and the text encoder once; encodes every clip of a list of results."""

    def __init__(self, cfg, device: Optional[str] = None):
        import torch

        from vchitect.data.encode import load_encoders
        from vchitect.data.samples import SampleDecoder

        lc = cfg.latents
        self.torch = torch
        self.device = device or actor_device(cfg.ray.latents.gpus)
        self.data = training_data_config(lc)
        self.decoder = SampleDecoder(self.data)
        self.vae, self.text_encoder = load_encoders(self.data, self.device)
        self.vae.frame_chunk = lc.frames_per_batch
        hidden, _, pooled = self.text_encoder.encode([""])  # 1×L×D, 1×P
        L, D, P = hidden.shape[1], hidden.shape[2], pooled.shape[1]
        t = lc.text
        if (L, D, P) != (t.max_length, t.dim, t.pooled_dim):
            raise LatentsNotAvailable(
                f"the text encoder gives L×D = {L}×{D} hidden states and P = {P} pooled, but latents.text "
                f"says {t.max_length}×{t.dim} and {t.pooled_dim}; set latents.text to data.text of the "
                "training config (whose model takes these widths), or use that config's encoders")
        self.record = {"vae": self.vae.describe(), "text_encoder": self.text_encoder.describe(),
                       "dtype": lc.encoders.dtype}

    def _crop(self, key: str, mp4: bytes):
        """Decode mode's epoch-0 crop of the clip as a video; one frame when no video bucket fits."""
        from vchitect.data.decode import BadSample

        try:
            return self.decoder.decode_clip(key, mp4)
        except BadSample as exc:
            if exc.reason != "no_bucket" or not any(b.is_image for b in self.decoder.buckets):
                raise
            return self.decoder.decode_clip(key, mp4, image=True)

    def __call__(self, results: list[InputResult]) -> list[InputResult]:
        from vchitect.data.decode import BadSample
        from vchitect.data.encode import pixels_to_unit

        from ..writer import sample_key

        torch = self.torch
        for res in results:
            kept = []
            for clip in res.clips:
                try:
                    crop = self._crop(sample_key(res.source_id, clip.clip), clip.mp4)
                except BadSample as exc:
                    res.reject("latents", Rejected(exc.reason, exc.detail), clip=clip.clip,
                               start=clip.start, end=clip.end)
                    continue
                pixels = torch.from_numpy(crop.arrays["pixels"])[None].to(self.device)  # 1×3×F×H×W uint8
                latent = self.vae.encode(pixels_to_unit(pixels))[0]  # C×F'×H'×W'
                clip.extra["latent.npy"] = _npy(latent.float().cpu().numpy().astype(np.float16))
                b = crop.bucket
                clip.meta["latents"] = dict(self.record, latent_shape=list(latent.shape),
                                            bucket={"height": b.height, "width": b.width, "frames": b.frames},
                                            fps=self.data.fps, seed=self.data.seed, epoch=0,
                                            frames=list(crop.frames or []))
                kept.append(clip)
            res.clips = kept
        clips = [clip for res in results for clip in res.clips]
        if clips:
            hidden, mask, pooled = self.text_encoder.encode([clip.caption for clip in clips])  # B×L×D, B×L, B×P
            for i, clip in enumerate(clips):
                text = hidden[i].float().cpu().numpy().astype(np.float16)
                vec = pooled[i].float().cpu().numpy().astype(np.float16)
                clip.extra.update({"text.npy": _npy(text), "pooled.npy": _npy(vec),
                                   "text_mask.npy": _npy(mask[i].cpu().numpy().astype(np.uint8))})
                clip.meta["latents"].update(text_shape=list(text.shape), pooled_shape=list(vec.shape))
        return results
