"""Text encoder and VAE wrappers, loaded from local folders only (no downloads).

One text interface for every encoder: ``encode(prompts) -> (hidden B×L×D, mask B×L bool, pooled B×P)``
  - ``t5``       T5EncoderModel; pooled = masked mean of the hidden states
  - ``clip``     CLIPTextModelWithProjection; pooled = text_embeds
  - ``sentence`` a sentence-transformer checkpoint (e.g. MiniLM) through AutoModel; pooled = the
                 L2-normalised masked mean, as sentence-transformers computes it
  - ``sd3``      the Stable Diffusion 3 / released Vchitect-2.0 stack (:class:`SD3TextEncoder`): CLIP-L and
                 CLIP-G penultimate hidden states (77 tokens, features concatenated and zero-padded to the
                 T5 width) followed by T5-XXL's (``max_length - 77`` tokens, 256 in the release);
                 pooled = the two CLIP ``text_embeds`` concatenated. Mask modes ``released`` / ``masked``
An optional second (CLIP) folder can supply the pooled vector instead (t5 / clip / sentence kinds).

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
        # Set when a model is FSDP-sharded (shard_text_encoder): its forward is a collective, so every
        # encode() runs one, even when the cache holds every prompt of this rank's batch.
        self.collective = False
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
        elif self.collective:
            self._encode([""])  # keeps this rank's all-gathers in step with the other ranks'
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


CLIP_TOKENS = 77  # the CLIP part of the sd3 stack (both CLIP tokenizers' model_max_length)
MASK_MODES = ("released", "masked")
# (model subfolder, tokenizer subfolder) of an SD3 pipeline folder: CLIP-L, CLIP-G, T5
SD3_SUBFOLDERS = (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3"))
SD3_KEYS = ("clip_l_path", "clip_g_path", "t5_path")


class SD3TextEncoder(TextEncoder):
    """The SD3 text stack the released Vchitect-2.0 was trained with: CLIP-L + CLIP-G + T5.

    hidden (B × (77 + N) × D_t5): rows 0..76 are CLIP-L's and CLIP-G's penultimate hidden states
    (``hidden_states[-2]``) concatenated on the feature axis (768 + 1280 = 2048 for the real models) and
    zero-padded to the T5 width; rows 77.. are T5's last hidden state (N = ``max_length - 77`` tokens,
    256 in the release: ``max_length`` 333). pooled (B × (P_l + P_g)): the two CLIP ``text_embeds``.
    The same computation, dtypes included, as diffusers' ``StableDiffusion3Pipeline.encode_prompt`` and the
    released pipeline in ``released`` mode (tests/unit/test_sd3_text.py checks it bit for bit).

    ``masks``:
      - ``released``: no attention mask anywhere: the encoders attend to their padding tokens (CLIP is
        causal, so only the padding rows themselves see padding; T5 is bidirectional, so every row does),
        and the returned mask is all True, so the transformer attends to all 77 + N rows, as the released
        weights were trained.
      - ``masked``: the encoders get their tokenizers' attention masks, and the returned mask marks the
        padding rows invalid: CLIP rows after the end-of-text token (a CLIP row is valid when it is a real
        token for both CLIP tokenizers; they split text the same way) and T5 rows after ``</s>``. The valid
        rows then do not depend on how much padding follows. The empty prompt keeps CLIP's
        start / end tokens and T5's ``</s>``, so no row is ever without a valid token.
    """

    def __init__(self, clip_l: nn.Module, tokenizer_l, clip_g: nn.Module, tokenizer_g, t5: nn.Module, tokenizer_t5,
                 max_length: int = CLIP_TOKENS + 256, masks: str = "masked", cache_size: int = 0):
        if masks not in MASK_MODES:
            raise ValueError(f"masks={masks!r} is not one of {', '.join(MASK_MODES)}")
        if max_length <= CLIP_TOKENS:
            raise ValueError(f"an sd3 text encoder's max_length is {CLIP_TOKENS} CLIP tokens + the T5 tokens "
                             f"(333 in the release), not {max_length}")
        super().__init__(t5, tokenizer_t5, "sd3", max_length, cache_size=cache_size)
        self.clip_l, self.tokenizer_l, self.clip_g, self.tokenizer_g = clip_l, tokenizer_l, clip_g, tokenizer_g
        self.masks = masks
        clip_width = clip_l.config.hidden_size + clip_g.config.hidden_size
        if clip_width > t5.config.d_model:
            raise ValueError(f"the CLIP hidden states ({clip_l.config.hidden_size} + {clip_g.config.hidden_size}) "
                             f"are wider than T5's ({t5.config.d_model}); they are zero-padded to the T5 width")

    @property
    def t5_length(self) -> int:
        return self.max_length - CLIP_TOKENS

    def describe(self) -> dict:
        return {**super().describe(), "masks": self.masks}

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        masked = self.masks == "masked"
        clip_hidden, clip_masks, pooled = [], [], []
        for model, tokenizer in ((self.clip_l, self.tokenizer_l), (self.clip_g, self.tokenizer_g)):
            ids, mask = self._tokens(tokenizer, prompts, CLIP_TOKENS)
            out = model(input_ids=ids, attention_mask=mask if masked else None, output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            clip_masks.append(mask.bool())
            pooled.append(out.text_embeds)
        ids, t5_mask = self._tokens(self.tokenizer, prompts, self.t5_length)
        t5 = self.model(input_ids=ids, attention_mask=t5_mask if masked else None).last_hidden_state
        # dtypes as diffusers: the CLIP part in CLIP-L's dtype, the T5 part in T5's, promoted by cat
        clip = torch.cat(clip_hidden, dim=-1).to(self.clip_l.dtype)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, t5.to(self.model.dtype)], dim=-2)
        pooled = torch.cat(pooled, dim=-1)
        if masked:
            mask = torch.cat([clip_masks[0] & clip_masks[1], t5_mask.bool()], dim=1)
        else:
            mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        return hidden, mask, pooled


def _sd3_folders(path: Optional[str | Path], clip_l_path=None, clip_g_path=None,
                 t5_path=None) -> list[tuple[Path, Path]]:
    """(model folder, tokenizer folder) of CLIP-L, CLIP-G and T5: a separate path wins over the SD3
    pipeline folder ``path`` (its text_encoder/, text_encoder_2/, text_encoder_3/ and tokenizer*/)."""
    found = []
    for (sub, tok_sub), key, own in zip(SD3_SUBFOLDERS, SD3_KEYS, (clip_l_path, clip_g_path, t5_path)):
        if own is not None:
            p = _folder(own, "text_encoder")
            tok = p if _has_tokenizer(p) else (Path(own) / "tokenizer" if (Path(own) / "tokenizer").is_dir() else p)
        elif path is not None:
            root = Path(path)
            if not (root / sub).is_dir():
                raise FileNotFoundError(f"{root} has no {sub}/ folder: an sd3 text_encoder_path is an SD3-style "
                                        f"pipeline folder (text_encoder/, text_encoder_2/, text_encoder_3/ and "
                                        f"tokenizer/, tokenizer_2/, tokenizer_3/); or set data.encoders.{key}")
            p = root / sub
            tok = root / tok_sub if (root / tok_sub).is_dir() else p
        else:
            raise FileNotFoundError(f"the sd3 text encoder needs data.encoders.text_encoder_path (an SD3 pipeline "
                                    f"folder) or data.encoders.{key}")
        found.append((p, tok))
    return found


def _has_tokenizer(p: Path) -> bool:
    return any((p / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json"))


def text_encoder_folders(path: Optional[str | Path], kind: str = "t5",
                         pooled_path: Optional[str | Path] = None, *, clip_l_path: Optional[str | Path] = None,
                         clip_g_path: Optional[str | Path] = None,
                         t5_path: Optional[str | Path] = None) -> list[Path]:
    """The model folders :func:`load_text_encoder` reads for this (path, kind, pooled_path), in
    :meth:`TextEncoder.describe` order; reads nothing but directory listings, so training can name
    its encoders' identity without loading them (the precomputed-shard check). Kind ``sd3``: CLIP-L,
    CLIP-G, T5 (from the pipeline folder ``path`` or the separate ``clip_l_path`` / ``clip_g_path`` /
    ``t5_path``)."""
    if kind == "sd3":
        return [model for model, _ in _sd3_folders(path, clip_l_path, clip_g_path, t5_path)]
    folders = [_folder(path, "text_encoder")]
    if pooled_path is not None:
        folders.append(_folder(pooled_path, "text_encoder"))
    return folders


def sd3_widths(folders: list[Path]) -> tuple[int, int]:
    """(hidden width D, pooled width P) of the sd3 stack in ``folders`` (CLIP-L, CLIP-G, T5), read from their
    config.json files: D = T5's d_model, P = the two CLIP projection widths."""
    cfgs = [json.loads((f / "config.json").read_text()) for f in folders]

    def clip(c: dict, key: str):  # a CLIPTextConfig, or a whole CLIPConfig's text part
        return c.get(key, (c.get("text_config") or {}).get(key))

    return int(cfgs[2]["d_model"]), int(clip(cfgs[0], "projection_dim")) + int(clip(cfgs[1], "projection_dim"))


def _dtype_kwargs(dtype: str) -> dict:
    import transformers

    # transformers >= 4.56 names the argument `dtype`; older releases `torch_dtype`
    new = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (4, 56)
    return {"dtype" if new else "torch_dtype": DTYPES[dtype]}


def load_text_encoder(path: Optional[str | Path], kind: str = "t5", max_length: int = 77,
                      device: str | torch.device = "cpu", dtype: str = "float32",
                      pooled_path: Optional[str | Path] = None, cache_size: int = 0, *, masks: str = "masked",
                      clip_l_path: Optional[str | Path] = None, clip_g_path: Optional[str | Path] = None,
                      t5_path: Optional[str | Path] = None, shard_mesh=None) -> TextEncoder:
    """A :class:`TextEncoder` from a local transformers folder holding the model and its tokenizer.

    Kind ``sd3``: an :class:`SD3TextEncoder` from an SD3 pipeline folder ``path`` and / or the separate
    ``clip_l_path``, ``clip_g_path``, ``t5_path`` folders (each a model with its tokenizer); ``masks``
    is its mask mode. ``shard_mesh`` (a DeviceMesh): FSDP2-shard the T5 over it
    (:func:`shard_text_encoder`); every rank of the mesh must then call ``encode`` equally often."""
    import transformers

    classes = {"t5": "T5EncoderModel", "clip": "CLIPTextModelWithProjection", "sentence": "AutoModel",
               "sd3": "T5EncoderModel"}
    if kind not in classes:
        raise ValueError(f"text encoder kind {kind!r} is not one of {', '.join(classes)}")
    dt = _dtype_kwargs(dtype)

    def frozen(cls, folder):
        return cls.from_pretrained(folder, **dt).to(device).eval().requires_grad_(False)

    if kind == "sd3":
        (lp, lt), (gp, gt), (tp, tt) = _sd3_folders(path, clip_l_path, clip_g_path, t5_path)
        clip_cls, tok = transformers.CLIPTextModelWithProjection, transformers.AutoTokenizer.from_pretrained
        enc = SD3TextEncoder(frozen(clip_cls, lp), tok(lt), frozen(clip_cls, gp), tok(gt),
                             frozen(transformers.T5EncoderModel, tp), tok(tt), max_length, masks, cache_size)
        enc.folders = [lp, gp, tp]
    else:
        p = _folder(path, "text_encoder")
        tok_dir = p if any((p / n).exists() for n in ("tokenizer.json", "tokenizer_config.json",
                                                      "spiece.model")) else _folder(path, "tokenizer")
        model = frozen(getattr(transformers, classes[kind]), p)
        tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
        pooled_model = pooled_tok = None
        if pooled_path is not None:
            pp = _folder(pooled_path, "text_encoder")
            pooled_model = frozen(transformers.CLIPTextModelWithProjection, pp)
            pooled_tok = transformers.AutoTokenizer.from_pretrained(pp)
        enc = TextEncoder(model, tok, kind, max_length, pooled_model, pooled_tok, cache_size)
        enc.folders = text_encoder_folders(path, kind, pooled_path)
    if shard_mesh is not None:
        shard_text_encoder(enc, shard_mesh)
    return enc


def shard_text_encoder(enc: TextEncoder, mesh) -> TextEncoder:
    """FSDP2-shard the T5 of ``enc`` (kind t5 or sd3) over ``mesh``: each T5 block, then the whole T5
    (embedding, final norm), so a rank holds 1/mesh-size of its weights and all-gathers one block at a
    time in the forward. Frozen, no gradients: only the forward's all-gathers run. The CLIPs stay whole
    (1/10 of the stack). A block whose parameters differ in dtype (transformers keeps T5's ``wo`` in fp32
    under fp16) gets those modules sharded on their own, since an FSDP group holds one dtype."""
    from torch.distributed.fsdp import fully_shard

    t5 = enc.model
    if enc.kind not in ("t5", "sd3") or not hasattr(t5, "encoder"):
        raise ValueError(f"data.encoders.shard shards a T5 encoder; the {enc.kind} kind has none")
    for block in t5.encoder.block:
        dtypes = [p.dtype for p in block.parameters()]
        common = max(set(dtypes), key=dtypes.count)
        for module in block.modules():
            own = list(module.parameters(recurse=False))
            if own and module is not block and any(p.dtype != common for p in own):
                fully_shard(module, mesh=mesh)
        fully_shard(block, mesh=mesh)
    fully_shard(t5, mesh=mesh)
    enc.collective = True
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
