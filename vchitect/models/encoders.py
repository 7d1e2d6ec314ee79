"""Text encoder and VAE wrappers, loaded from local folders only (no downloads).

One text interface for every encoder: ``encode(prompts) -> (hidden B×L×D, mask B×L bool, pooled B×P)``
  - ``t5``       T5EncoderModel; pooled = masked mean of the hidden states
  - ``clip``     CLIPTextModelWithProjection; pooled = text_embeds
  - ``sentence`` a sentence-transformer checkpoint (e.g. MiniLM) through AutoModel; pooled = the
                 L2-normalised masked mean, as sentence-transformers computes it
An optional second (CLIP) folder can supply the pooled vector instead, SD3-style.

One VAE interface: ``encode(pixels B×3×F×H×W in [-1, 1]) -> latents B×C×F'×H'×W'``, already shifted
and scaled for the diffusion model. Image VAEs (``AutoencoderKL``) run per frame (F' = F); video VAEs
(``AutoencoderKLWan``, ``AutoencoderKLHunyuanVideo``, ``AutoencoderKLCogVideoX`` …) run on the clip.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _folder(path: str | Path, sub: str) -> Path:
    """``path`` itself, or its ``sub`` folder when ``path`` is a whole diffusers pipeline folder."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"{p} is not a folder; point the config at a local {sub} folder "
                                f"(weights are never downloaded)")
    if not (p / "config.json").is_file() and (p / sub / "config.json").is_file():
        return p / sub
    return p


def folder_identity(folder: str | Path) -> dict:
    """``{"name", "revision"}`` of a local model folder, cheap enough for a 10 GB T5-XXL.

    name: ``_name_or_path`` of its config.json when it names a hub model, else the folder name
    (``parent/sub`` for a pipeline's subfolder). revision: the Hugging Face snapshot hash when the
    folder lies in a hub cache (``…/snapshots/<40 hex>/…``), else a SHA-256 (first 16 hex digits) of
    config.json and, per weight file, its name, size and first and last MiB. Two folders holding the
    same weights get the same revision wherever they were copied to."""
    p = Path(folder).resolve()
    cfg_file = p / "config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    hub_name = str(cfg.get("_name_or_path") or "")
    name = hub_name if hub_name.count("/") == 1 and not Path(hub_name).is_absolute() else \
        (f"{p.parent.name}/{p.name}" if p.name.startswith(("text_encoder", "vae", "tokenizer")) else p.name)
    snapshot = re.search(r"/snapshots/([0-9a-f]{40})(/|$)", str(p))
    if snapshot:
        return {"name": name, "revision": snapshot.group(1)}
    h = hashlib.sha256(cfg_file.read_bytes() if cfg_file.is_file() else b"")
    for f in sorted(p.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read())
    return {"name": name, "revision": h.hexdigest()[:16]}


def _masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # B×L×D, B×L → B×D
    m = mask.to(hidden.dtype)[..., None]
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class TextEncoder(nn.Module):
    """Frozen text encoder: prompts → (hidden B×L×D, mask B×L, pooled B×P).

    ``cache_size`` > 0 keeps the embeddings of that many prompts (least recently used evicted first), so
    a repeated caption is not encoded again; only the prompts missing from the cache go through the model.
    """

    def __init__(self, model: nn.Module, tokenizer, kind: str, max_length: int,
                 pooled_model: Optional[nn.Module] = None, pooled_tokenizer=None, cache_size: int = 0):
        super().__init__()
        self.model, self.tokenizer, self.kind, self.max_length = model, tokenizer, kind, max_length
        self.pooled_model, self.pooled_tokenizer = pooled_model, pooled_tokenizer
        self.cache_size = cache_size
        self.folders: list[Path] = []  # set by load_text_encoder: the model folder(s), for describe()
        self._cache: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]" = OrderedDict()

    def describe(self) -> dict:
        """What a precomputed text embedding depends on: kind, token count and the identity of every
        model folder (:func:`folder_identity`). Curation records it in each sample's json; training
        refuses shards whose record differs from its own encoder's."""
        return {"kind": self.kind, "max_length": self.max_length,
                "encoders": [folder_identity(f) for f in self.folders]}

    def _tokens(self, tokenizer, prompts: list[str], max_length: int):
        t = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                      return_tensors="pt")
        device = next(self.model.parameters()).device
        return t["input_ids"].to(device), t["attention_mask"].to(device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cache_size <= 0:
            return self._encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing:
            for p, h, m, pl in zip(missing, *self._encode(missing)):
                self._cache[p] = (h, m, pl)
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tuple(torch.stack(parts) for parts in zip(*rows))

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self._tokens(self.tokenizer, prompts, self.max_length)
        out = self.model(input_ids=ids, attention_mask=mask)
        hidden = out.last_hidden_state  # B×L×D
        if self.kind == "clip":
            pooled = out.text_embeds  # B×P
        else:
            pooled = _masked_mean(hidden, mask)
            if self.kind == "sentence":
                pooled = nn.functional.normalize(pooled, dim=-1)
        if self.pooled_model is not None:
            max_len = getattr(self.pooled_tokenizer, "model_max_length", 77)
            pids, pmask = self._tokens(self.pooled_tokenizer, prompts, min(max_len, 77))
            pooled = self.pooled_model(input_ids=pids, attention_mask=pmask).text_embeds
        return hidden, mask.bool(), pooled


def text_encoder_folders(path: str | Path, kind: str = "t5",
                         pooled_path: Optional[str | Path] = None) -> list[Path]:
    """The model folders :func:`load_text_encoder` reads for this (path, kind, pooled_path), in
    :meth:`TextEncoder.describe` order; reads nothing but directory listings, so training can name
    its encoders' identity without loading them (the precomputed-shard check)."""
    folders = [_folder(path, "text_encoder")]
    if pooled_path is not None:
        folders.append(_folder(pooled_path, "text_encoder"))
    return folders


def load_text_encoder(path: str | Path, kind: str = "t5", max_length: int = 77,
                      device: str | torch.device = "cpu", dtype: str = "float32",
                      pooled_path: Optional[str | Path] = None, cache_size: int = 0) -> TextEncoder:
    """A :class:`TextEncoder` from a local transformers folder holding the model and its tokenizer."""
    import transformers

    classes = {"t5": "T5EncoderModel", "clip": "CLIPTextModelWithProjection", "sentence": "AutoModel"}
    if kind not in classes:
        raise ValueError(f"text encoder kind {kind!r} is not one of {', '.join(classes)}")
    p = _folder(path, "text_encoder")
    tok_dir = p if any((p / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                                  "spiece.model")) else _folder(path, "tokenizer")
    cls = getattr(transformers, classes[kind])
    # transformers >= 4.56 names the argument `dtype`; older releases `torch_dtype`
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    dt = {"dtype" if new else "torch_dtype": DTYPES[dtype]}
    model = cls.from_pretrained(p, **dt).to(device).eval().requires_grad_(False)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    pooled_model = pooled_tok = None
    if pooled_path is not None:
        pp = _folder(pooled_path, "text_encoder")
        pooled_model = transformers.CLIPTextModelWithProjection.from_pretrained(
            pp, **dt).to(device).eval().requires_grad_(False)
        pooled_tok = transformers.AutoTokenizer.from_pretrained(pp)
    enc = TextEncoder(model, tok, kind, max_length, pooled_model, pooled_tok, cache_size)
    enc.folders = text_encoder_folders(path, kind, pooled_path)
    return enc


class VAEEncoder(nn.Module):
    def __init__(self, vae: nn.Module, sample_posterior: bool = False, frame_chunk: int = 16):
        super().__init__()
        self.vae, self.sample_posterior, self.frame_chunk = vae, sample_posterior, frame_chunk
        cfg = vae.config
        self.is_video = cfg.get("temporal_compression_ratio") is not None or \
            type(vae).__name__ not in ("AutoencoderKL", "AsymmetricAutoencoderKL", "AutoencoderTiny")
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        self.stats = (torch.tensor(mean), torch.tensor(std)) if mean is not None and std is not None \
            else None
        self.scaling = float(cfg.get("scaling_factor", 1.0) or 1.0)
        self.shift = float(cfg.get("shift_factor", 0.0) or 0.0)
        self.folder: Optional[Path] = None  # set by load_vae, for describe()

    def describe(self) -> dict:
        """The VAE a precomputed latent depends on: class, identity of its folder, scaling."""
        d = {"class": type(self.vae).__name__, "scaling_factor": self.scaling, "shift_factor": self.shift,
             "per_frame": not self.is_video}
        if self.folder is not None:
            d.update(folder_identity(self.folder))
        return d

    def _latent(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        dist = self.vae.encode(x).latent_dist
        return dist.sample(generator) if self.sample_posterior else dist.mode()

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        B, _, F, H, W = pixels.shape  # B×3×F×H×W in [-1, 1]
        x = pixels.to(self.vae.dtype)
        if self.is_video:
            z = self._latent(x, generator)  # B×C×F'×H'×W'
        else:
            frames = x.permute(0, 2, 1, 3, 4).reshape(B * F, 3, H, W)
            z = torch.cat([self._latent(c, generator) for c in frames.split(self.frame_chunk)])
            z = z.reshape(B, F, *z.shape[1:]).permute(0, 2, 1, 3, 4)  # B×C×F×H'×W'
        z = z.float()
        if self.stats is not None:
            mean, std = (s.to(z.device).view(1, -1, 1, 1, 1) for s in self.stats)
            return (z - mean) / std
        return (z - self.shift) * self.scaling


def vae_folder(path: str | Path) -> Path:
    """The folder :func:`load_vae` reads for ``path`` (its ``vae/`` in a pipeline folder), unloaded."""
    return _folder(path, "vae")


def load_vae(path: str | Path, device: str | torch.device = "cpu", dtype: str = "float32",
             sample_posterior: bool = False) -> VAEEncoder:
    """A :class:`VAEEncoder` from a local diffusers VAE folder (the class is read from config.json)."""
    import diffusers

    p = vae_folder(path)
    name = json.loads((p / "config.json").read_text()).get("_class_name", "AutoencoderKL")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise ValueError(f"{p}/config.json names VAE class {name!r}, which this diffusers "
                         f"({diffusers.__version__}) does not have; upgrade diffusers")
    vae = cls.from_pretrained(p, torch_dtype=DTYPES[dtype]).to(device).eval().requires_grad_(False)
    enc = VAEEncoder(vae, sample_posterior)
    enc.folder = p
    return enc
