"""Checks that stop a training run before any rank starts, each as one :class:`ConfigError`.

Run by the trainer in every process before the process group exists (``vchitect train``, a
torchrun rank) and by ``vchitect launch`` once, before it spawns ranks, so that a mistake in the
config or a path is one ``config error: …`` line with exit code 2, not a traceback per rank.

What is checked: the data fits the model; the parallel layout fits the world; every local data
source holds at least one shard (``s3://`` sources are listed by the ranks, whose loader raises
the same error); the encoder folders exist; precomputed shards were made with the encoders
``data.encoders`` names (the first sample of each local source's first shard; the loader checks
every sample); ``train.init_from`` names safetensors files that exist; an explicit
``train.resume`` is a checkpoint whose files have the sizes its manifest records and whose
metadata reads (the ranks then also check the SHA-256s, sharing the hashing). Everything here is
cheap: no tensor is read, no model loaded, no folder listed in full but a local source's.
"""

from __future__ import annotations

from pathlib import Path

from vchitect.config import Config, ConfigError

RESUME_HINT = "give a step-XXXXXXXXX checkpoint folder, auto (the newest in train.output_dir) or none"


def preflight(cfg: Config, world_size: int):
    """Raise :class:`ConfigError` (or ``ParallelLayoutError``) for the first problem; return the
    :class:`~vchitect.parallel.dims.ParallelDims` of ``world_size`` ranks."""
    cfg.check_data_fits_model()
    dims = cfg.parallel.dims(world_size=world_size, num_heads=cfg.model.num_attention_heads)
    check_data_sources(cfg)
    check_encoder_folders(cfg)
    check_precomputed_encoders(cfg)
    check_init_from(cfg.train.init_from)
    check_resume(cfg.train.resume)
    return dims


def check_data_sources(cfg: Config) -> None:
    from vchitect.data.sources import local_source_problem, source_error

    if cfg.data.source != "shards":
        return
    for i, src in enumerate(cfg.data.sources):
        if src.uri.startswith("s3://"):
            continue  # listing a bucket prefix can take long; the ranks' loader reports an empty one
        problem = local_source_problem(src.uri)
        if problem:
            raise source_error(i, src.uri, problem)


def check_encoder_folders(cfg: Config) -> None:
    e = cfg.data.encoders
    for key, path in (("vae_path", e.vae_path), ("text_encoder_path", e.text_encoder_path),
                      ("pooled_encoder_path", e.pooled_encoder_path), ("clip_l_path", e.clip_l_path),
                      ("clip_g_path", e.clip_g_path), ("t5_path", e.t5_path)):
        if path and not Path(path).is_dir():
            raise ConfigError(f"data.encoders.{key}={path!r}: no such folder; give a local diffusers / "
                              f"transformers model folder (weights are never downloaded)")
    check_sd3_widths(cfg)


def check_sd3_widths(cfg: Config) -> None:
    """kind sd3: data.text.dim is the T5 width and data.text.pooled_dim the two CLIP projections (read from the
    folders' config.json: 4096 and 768 + 1280 = 2048 for the released models)."""
    from vchitect.data.config import text_encoder_configured
    from vchitect.models.encoders import sd3_widths, text_encoder_folders

    e, t = cfg.data.encoders, cfg.data.text
    if e.text_encoder_kind != "sd3" or not text_encoder_configured(cfg.data):
        return
    try:
        folders = text_encoder_folders(e.text_encoder_path, "sd3", clip_l_path=e.clip_l_path,
                                       clip_g_path=e.clip_g_path, t5_path=e.t5_path)
        dim, pooled = sd3_widths(folders)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"data.encoders (sd3): {exc}") from None
    if t.dim != dim:
        raise ConfigError(f"data.text.dim={t.dim} does not match the sd3 text encoder's T5 width {dim} "
                          f"({folders[2]}); set data.text.dim and model.joint_attention_dim to {dim}")
    if t.pooled_dim != pooled:
        raise ConfigError(f"data.text.pooled_dim={t.pooled_dim} does not match the sd3 text encoder's pooled width "
                          f"{pooled} (the CLIP-L and CLIP-G projections); set data.text.pooled_dim and "
                          f"model.pooled_projection_dim to {pooled}")


def check_precomputed_encoders(cfg: Config) -> None:
    """:class:`~vchitect.data.provenance.EncoderMismatch` (a ConfigError) for local shards encoded
    with other encoders than ``data.encoders`` names."""
    from vchitect.data.provenance import check_first_samples

    check_first_samples(cfg.data)


def check_init_from(spec: str | None) -> None:
    if not spec:
        return
    from vchitect.models.weights import WeightImportError, weight_files

    _, path = spec.split(":", 1)  # the prefix was validated with the config
    try:
        weight_files(path)
    except WeightImportError as exc:
        raise init_from_error(spec, exc) from None


def init_from_error(spec: str, exc: Exception) -> ConfigError:
    return ConfigError(f"train.init_from={spec!r}: {exc}")


def check_resume(resume: str) -> None:
    if resume in ("auto", "none"):
        return
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"train.resume={resume!r}: no such folder; {RESUME_HINT}")
    if not path.is_dir():
        raise ConfigError(f"train.resume={resume!r} is a file, not a checkpoint folder; {RESUME_HINT}")
    from vchitect.train.checkpoint import STEP_DIR, verify

    reason = (f"{path} is not a step-XXXXXXXXX checkpoint folder" if STEP_DIR.match(path.name) is None
              else verify(path, checksum=False))
    if reason:
        raise ConfigError(f"train.resume={resume!r} cannot be resumed from: {reason}; {RESUME_HINT}")
