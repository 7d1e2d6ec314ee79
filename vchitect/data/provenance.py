"""What a precomputed sample was encoded with, and the check that training uses the same encoders.

The curation latents stage (``data_pipeline/stages/latents.py``) records under ``latents`` in each
sample's json the ``describe()`` of its VAE and text encoder (kind, token count, and per model
folder its name and revision, :func:`~vchitect.models.encoders.folder_identity`). Training compares
that record with the encoders ``data.encoders`` names — their identity only, read from the folders
without loading a model — and refuses a shard made with others by :class:`EncoderMismatch`, a
:class:`ConfigError`: a mismatch is a config mistake, never a sample to skip. Checked per sample in
the loader workers (:class:`~vchitect.data.samples.SampleDecoder`) and once before ranks start, on
the first sample of the first shard of each local source (:func:`check_first_samples`). Samples
without a record (shards from elsewhere) only get the loader's shape checks.

    expected = configured_encoders(cfg)                 # {"text_encoder": {...}, "vae": {...}}
    check_record(sample_meta(members), expected, "shard s-000000.tar, sample abc_0000")
"""

from __future__ import annotations

import json
from typing import Optional

from vchitect.config_base import ConfigError

from .config import DataConfig

HINT = ("re-run the curation latents stage with this config's encoders (its latents.encoders and "
        "latents.text are copies of data.encoders and data.text) into a new output.path, or point "
        "data.encoders at the encoders these shards were made with")


class EncoderMismatch(ConfigError):
    """A precomputed shard encoded with other encoders than the training config names."""


def configured_encoders(cfg: DataConfig) -> dict:
    """The identity of the encoders ``cfg.encoders`` names, one entry per set path: ``text_encoder``
    (kind, max_length, encoders [{name, revision}…], and masks when the config has that key) and
    ``vae`` ({name, revision}). Reads config.json and a few MiB of each weight file, loads nothing."""
    from vchitect.models.encoders import folder_identity, text_encoder_folders, vae_folder

    from .config import text_encoder_configured

    e, out = cfg.encoders, {}
    if text_encoder_configured(cfg):
        folders = text_encoder_folders(e.text_encoder_path, e.text_encoder_kind, e.pooled_encoder_path,
                                       clip_l_path=e.clip_l_path, clip_g_path=e.clip_g_path, t5_path=e.t5_path)
        out["text_encoder"] = {"kind": e.text_encoder_kind, "max_length": cfg.text.max_length,
                               "encoders": [folder_identity(f) for f in folders]}
        if e.text_encoder_kind == "sd3":  # the one kind with a mask mode (as describe() records it)
            out["text_encoder"]["masks"] = cfg.text.masks
    if e.vae_path:
        out["vae"] = folder_identity(vae_folder(e.vae_path))
    return out


def sample_meta(members: dict) -> Optional[dict]:
    """The sample's json as a mapping, or None (absent or not a JSON object)."""
    raw = members.get("json")
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None


def _revisions(d: dict) -> list:
    return [e.get("revision") for e in d.get("encoders") or [] if isinstance(e, dict)]


def _same_text(rec: dict, want: dict) -> bool:
    return (rec.get("kind") == want["kind"] and rec.get("max_length") == want["max_length"]
            and _revisions(rec) == _revisions(want)
            and ("masks" not in rec or "masks" not in want or rec["masks"] == want["masks"]))


def _text_summary(d: dict) -> str:
    folders = " + ".join(f"{e.get('name')}@{e.get('revision')}" for e in d.get("encoders") or []
                         if isinstance(e, dict))
    masks = f", masks={d['masks']}" if "masks" in d else ""
    return f"kind={d.get('kind')}, max_length={d.get('max_length')}{masks}, {folders or 'no folders'}"


def check_record(meta: Optional[dict], expected: dict, where: str) -> None:
    """Raise :class:`EncoderMismatch` when the ``latents`` record of ``meta`` names other encoders
    than ``expected`` (:func:`configured_encoders`). ``where`` names the shard and sample. A sample
    without a record, or an encoder the config does not name, is not checked."""
    rec = (meta or {}).get("latents")
    if not isinstance(rec, dict):
        return
    problems = []
    text, want = rec.get("text_encoder"), expected.get("text_encoder")
    if isinstance(text, dict) and want is not None and not _same_text(text, want):
        problems.append(f"its text.npy / text_mask.npy / pooled.npy were encoded with text encoder "
                        f"[{_text_summary(text)}], but data.encoders.text_encoder_path (or the sd3 "
                        f"clip_l_path / clip_g_path / t5_path, with text_encoder_kind, pooled_encoder_path and "
                        f"data.text) names [{_text_summary(want)}]")
    vae, want = rec.get("vae"), expected.get("vae")
    if isinstance(vae, dict) and want is not None and vae.get("revision") != want["revision"]:
        problems.append(f"its latent.npy was encoded with VAE {vae.get('name')}@{vae.get('revision')}, "
                        f"but data.encoders.vae_path names {want['name']}@{want['revision']}")
    if problems:
        raise EncoderMismatch(f"precomputed {where}: {'; '.join(problems)}. To train on these shards, {HINT}")


def check_first_samples(cfg: DataConfig) -> None:
    """Before ranks start: :func:`check_record` on the first sample of the first shard of every local
    source, when it holds precomputed latents (``s3://`` sources are left to the loader)."""
    import os

    from .sources import list_shards, read_shard

    from .config import text_encoder_configured

    if cfg.source != "shards" or cfg.mode == "decode" or not (text_encoder_configured(cfg)
                                                               or cfg.encoders.vae_path):
        return
    expected = None
    for src in cfg.sources:
        if src.uri.startswith("s3://"):
            continue
        first = next((p for p in list_shards(src.uri, cfg.s3) if os.path.isfile(p)), None)  # a brace
        for _, key, members, _ in read_shard(first, cfg.s3, retries=0) if first else ():  # may name gaps
            if "latent.npy" in members or cfg.mode == "precomputed":
                expected = expected if expected is not None else configured_encoders(cfg)
                check_record(sample_meta(members), expected, f"shard {first}, sample {key}")
            break
