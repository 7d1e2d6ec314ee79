"""Latent precomputation: VAE latents of each clip and text-encoder states of its caption.

Writes, per sample, ``latent.npy`` (float16, C×F×H×W: the VAE applied frame by frame, scaled by
the VAE's ``scaling_factor`` after subtracting ``shift_factor`` when it has one), ``text.npy``
(float16, L×D encoder hidden states) and ``text_mask.npy`` (uint8, L), and records the encoder
names and shapes in the json. Models load from local folders only: a diffusers
``AutoencoderKL`` and a transformers text encoder with its tokenizer. Runs on GPU actors when
``ray.latents_gpus`` > 0, on CPU otherwise.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np

from .clip import InputResult


class LatentsNotAvailable(RuntimeError):
    pass


def check_latents(cfg) -> None:
    """Fail before any work when latents are asked for but cannot be computed."""
    if not cfg.latents.enabled:
        return
    import os

    for key in ("vae_path", "text_encoder_path"):
        path = getattr(cfg.latents, key)
        if not path or not os.path.isdir(path):
            raise LatentsNotAvailable(f"latents.{key}={path!r} is not a local model folder; set it, or "
                                      "latents.enabled=false to let the trainer encode clips on the fly")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _decode_clip(mp4: bytes, size: tuple[int, int]) -> np.ndarray:
    """F×H×W×3 uint8 frames of an in-memory mp4, resized to ``size`` (w, h)."""
    import av

    with av.open(io.BytesIO(mp4)) as c:
        return np.stack([f.to_ndarray(width=size[0], height=size[1], format="rgb24")
                         for f in c.decode(video=0)])


class LatentEncoder:
    """Loads the VAE and the text encoder once; encodes every clip of a list of results."""

    def __init__(self, cfg, device: Optional[str] = None):
        import torch
        from diffusers import AutoencoderKL
        from transformers import AutoModel, AutoTokenizer

        lc = cfg.latents
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = getattr(torch, lc.dtype)
        self.vae = AutoencoderKL.from_pretrained(lc.vae_path, torch_dtype=self.dtype).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(lc.text_encoder_path)
        model = AutoModel.from_pretrained(lc.text_encoder_path, dtype=self.dtype)
        if getattr(model.config, "is_encoder_decoder", False):  # T5 and friends: the encoder only
            model = model.get_encoder()
        self.text_encoder = model.to(self.device).eval()
        self.max_text_length = lc.max_text_length
        self.frames_per_batch = lc.frames_per_batch
        self.multiple = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.names = {"vae": lc.vae_path.rstrip("/").rsplit("/", 1)[-1],
                      "text_encoder": lc.text_encoder_path.rstrip("/").rsplit("/", 1)[-1]}

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """F×H×W×3 uint8 → C×F×h×w float16."""
        torch = self.torch
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).to(self.device, self.dtype) / 127.5 - 1.0
        outs = []
        with torch.no_grad():
            for i in range(0, x.shape[0], self.frames_per_batch):
                z = self.vae.encode(x[i:i + self.frames_per_batch]).latent_dist.mode()  # f×C×h×w
                shift = getattr(self.vae.config, "shift_factor", None) or 0.0
                outs.append((z - shift) * self.vae.config.scaling_factor)
        return torch.cat(outs).permute(1, 0, 2, 3).float().cpu().numpy().astype(np.float16)

    def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """caption → (L×D float16 hidden states, L uint8 mask)."""
        torch = self.torch
        tok = self.tokenizer(text, padding="max_length", max_length=self.max_text_length, truncation=True,
                             return_tensors="pt")
        with torch.no_grad():
            out = self.text_encoder(input_ids=tok["input_ids"].to(self.device),
                                    attention_mask=tok["attention_mask"].to(self.device))
        hidden = out.last_hidden_state[0].float().cpu().numpy().astype(np.float16)
        return hidden, tok["attention_mask"][0].cpu().numpy().astype(np.uint8)

    def __call__(self, results: list[InputResult]) -> list[InputResult]:
        for res in results:
            for clip in res.clips:
                w, h = clip.meta["width"], clip.meta["height"]
                m = self.multiple
                size = (max(m, w // m * m), max(m, h // m * m))
                latent = self.encode_video(_decode_clip(clip.mp4, size))
                text, mask = self.encode_text(clip.caption)
                clip.extra = {"latent.npy": _npy(latent), "text.npy": _npy(text), "text_mask.npy": _npy(mask)}
                clip.meta["latents"] = dict(self.names, latent_shape=list(latent.shape),
                                            text_shape=list(text.shape), pixel_size=[size[0], size[1]],
                                            scaling_factor=float(self.vae.config.scaling_factor))
        return results
