"""The run's typed configuration: one dataclass tree, loaded from YAML, overridden from the command line.

A config file is a YAML mapping whose top-level keys are the sections of :class:`Config`
(``model``, ``parallel``, …); see :mod:`vchitect.config_base` for ``include:``, dotted overrides
and validation. The machinery (:func:`setting`, :class:`ConfigError`, :func:`from_dict`, …) lives
there, with no section and nothing heavy imported, and is re-exported here; the sections live
beside the code they configure and import it from there, so none of them imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from vchitect import config_base
from vchitect.config_base import (SECRET_KEYS, ConfigError, apply_overrides, from_dict, parse_override,  # noqa: F401
                                  reference_table, setting, to_dict, to_yaml)
from vchitect.data.config import DataConfig
from vchitect.diffusion.config import DiffusionConfig
from vchitect.parallel.config import ParallelConfig
from vchitect.train.config import TrainConfig


# --------------------------------------------------------------------------------------------
# The tree
# --------------------------------------------------------------------------------------------


@dataclass
class RepVideoConfig:
    """RepVideo layer aggregation (vchitect/models/repvideo.py, docs/model.md); window 0 = off."""

    window: int = setting(0, min=0, help="layers per aggregation window: block i reads its input mixed with the mean "
                          "of the outputs of its window's earlier blocks (windows of outputs 0…W−1, W…2W−1, …); "
                          "0 = off (the plain model), else 2 … num_layers (RepVideo: 6 on 24 layers; the demo's 4 "
                          "layers: 4)")
    gate: str = setting("learned", choices=["learned", "fixed"], help="learned: one trained scalar per block "
                        "(layer_aggregation.gate); fixed: a constant, no parameter")
    gate_init: Optional[float] = setting(None, min=0.0, max=1.0, help="the gate's value at init (learned) or always "
                                         "(fixed); null = 0 for learned (identity at init: a pretrained model is "
                                         "unchanged) and 0.5 for fixed (RepVideo's init)")


@dataclass
class ModelConfig:
    """Shape of :class:`vchitect.models.VchitectTransformer3DModel`; field names are its init args."""

    sample_size: int = setting(128, min=1, help="latent size the 2D position table is scaled for "
                               "(SD3 `base_size` = sample_size / patch_size); 128 in Vchitect-2.0")
    patch_size: int = setting(2, min=1, help="spatial patch size of the per-frame patch embedding")
    in_channels: int = setting(16, min=1, help="latent channels C of the B×C×F×H×W input")
    out_channels: Optional[int] = setting(None, min=1, help="output channels; null = in_channels")
    num_layers: int = setting(24, min=1, help="number of Multimodal Diffusion Blocks "
                              "(the last one is context-pre-only)")
    num_attention_heads: int = setting(24, min=1, help="attention heads; model width = heads × head_dim")
    attention_head_dim: int = setting(64, min=2, help="channels per head (even: RoPE pairs channels)")
    joint_attention_dim: int = setting(4096, min=1, help="width of the text encoder hidden states")
    pooled_projection_dim: int = setting(2048, min=1, help="width of the pooled text embedding")
    pos_embed_max_size: int = setting(192, min=1, help="side of the 2D sin-cos position table "
                                      "(patches); larger grids are rejected")
    mlp_ratio: float = setting(4.0, min=0.25, help="hidden width of the MLPs as a multiple of the width")
    spatial_scale: float = setting(1.1, min=0.0, help="constant scale of the spatial attention branch "
                                   "before the cross branch is added (1.1 in Vchitect-2.0)")
    rope_theta: float = setting(1.0e6, min=1.0, help="RoPE base of the temporal attention")
    rope_scaling_factor: float = setting(1.0, min=1e-6, help="frame positions are divided by this "
                                         "(>1 stretches RoPE for longer videos, as in ExVideo-style extension)")
    qk_norm: str = setting("none", choices=["none", "rms_norm"], help="normalisation of queries and keys")
    frame_pos_embed: str = setting("none", choices=["none", "sincos"],
                                   help="absolute frame position added to every video token: none (Vchitect-2.0: "
                                   "frame order only through the temporal RoPE) or a fixed 1D sin-cos table over "
                                   "the frame index (no parameters; positions divided by rope_scaling_factor)")
    prediction: str = setting("velocity", choices=["velocity", "sample"],
                              help="what the last layer predicts: the velocity ε − x0 (Vchitect-2.0), or the "
                              "clean sample x0, which forward turns into the velocity (x_t − x0) / max(t, "
                              "prediction_t_min) so the objective, samplers and exports are unchanged "
                              "(x-prediction, Li & He 2025: suits pixel-space models)")
    prediction_t_min: float = setting(0.05, min=1e-4, max=1.0, help="with prediction: sample, the smallest t "
                                      "the velocity divides by")
    attention_backend: str = setting("sdpa", choices=["sdpa", "flash_attn", "te"],
                                     help="attention kernel: torch SDPA, or flash-attn / Transformer "
                                     "Engine when the `gpu` extra is installed")
    condition_channels: int = setting(0, choices=[0, 4, 5], help="Many-for-Many condition adapter (docs/model.md): "
                                      "channels of the pixel-space condition batch['condition'] — 0 = no adapter "
                                      "(the plain text-to-video model), 4 = condition RGB with unknown pixels zeroed "
                                      "+ known-pixel mask, 5 = with a depth channel; its output layer starts at zero")
    condition_vae_spatial_factor: int = setting(8, min=1, help="condition adapter: spatial downsampling of the VAE "
                                                "(pixels per latent pixel; 1 for a pixel-space model); the adapter "
                                                "downsamples by this × patch_size")
    condition_vae_temporal_factor: int = setting(4, min=1, help="condition adapter: temporal downsampling of the VAE "
                                                 "(latent frames = 1 + (F − 1) / factor; 1 for a per-frame VAE or "
                                                 "a pixel-space model)")
    condition_hidden_channels: int = setting(64, min=1, help="condition adapter: width of its first conv; each "
                                             "stride-2 stage doubles it, up to 4×")
    repvideo: RepVideoConfig = setting(default_factory=RepVideoConfig, help="RepVideo aggregated cross-layer "
                                       "representations (docs/model.md); off by default")

    def validate(self) -> None:
        r = self.repvideo
        if not r.window:
            return
        if r.window < 2 or r.window > self.num_layers:
            raise ConfigError(f"model.repvideo.window={r.window} must be 2 … model.num_layers={self.num_layers} (or 0 "
                              f"to turn RepVideo off); 6 suits 24 layers, 4 the demo's 4")
        if self.num_layers < 3:
            raise ConfigError(f"model.repvideo on model.num_layers={self.num_layers} mixes no block (the first that "
                              f"mixes is block 2); use 3 or more layers, or model.repvideo.window=0")
        if r.gate == "fixed" and r.gate_init == 0.0:
            raise ConfigError("model.repvideo.gate=fixed with gate_init=0 is the model without RepVideo; set "
                              "model.repvideo.gate_init (e.g. 0.5, RepVideo's value) or window=0")


@dataclass
class Config:
    """The whole run: model, parallel layout, data, objective and training loop."""

    model: ModelConfig = setting(default_factory=ModelConfig, help="the transformer")
    parallel: ParallelConfig = setting(default_factory=ParallelConfig, help="parallel layout and memory options")
    data: DataConfig = setting(default_factory=lambda: DataConfig(source="synthetic"), help="training data")
    diffusion: DiffusionConfig = setting(default_factory=DiffusionConfig, help="rectified-flow objective")
    train: TrainConfig = setting(default_factory=TrainConfig, help="training loop, checkpoints, logging")

    def validate(self) -> None:
        heads, p = self.model.num_attention_heads, self.parallel
        if heads % (p.tp * p.sp):
            raise ConfigError(f"parallel.tp × parallel.sp = {p.tp * p.sp} must divide "
                              f"model.num_attention_heads={heads}")

    def check_data_fits_model(self) -> None:
        """Before training: the data must produce what the model takes. Synthetic data takes its
        shapes from the model; shard data must agree with it (the message names both keys)."""
        m, d = self.model, self.data
        if d.source == "synthetic":
            d.text.dim, d.text.pooled_dim = m.joint_attention_dim, m.pooled_projection_dim
            d.latent_channels, d.patch_size = m.in_channels, m.patch_size
        pairs = [("data.text.dim", d.text.dim, "model.joint_attention_dim", m.joint_attention_dim),
                 ("data.text.pooled_dim", d.text.pooled_dim, "model.pooled_projection_dim", m.pooled_projection_dim),
                 ("data.latent_channels", d.latent_channels, "model.in_channels", m.in_channels),
                 ("data.patch_size", d.patch_size, "model.patch_size", m.patch_size)]
        if m.condition_channels:  # the adapter downsamples the pixel condition as the VAE does the pixels
            pairs += [("data.vae_spatial_factor", d.vae_spatial_factor, "model.condition_vae_spatial_factor",
                       m.condition_vae_spatial_factor),
                      ("data.vae_temporal_factor", d.vae_temporal_factor, "model.condition_vae_temporal_factor",
                       m.condition_vae_temporal_factor)]
        for a, va, b, vb in pairs:
            if va != vb:
                raise ConfigError(f"{a}={va} does not match {b}={vb}; set both to the same value")
        if d.tasks and not m.condition_channels:
            raise ConfigError(f"data.tasks={dict(d.tasks)} builds task conditions, but model.condition_channels=0 "
                              f"(no condition adapter) would train them as text-to-video; set "
                              f"model.condition_channels=4 (docs/tasks.md), or leave data.tasks empty")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, schema=None):
    """Read ``path`` (optional), apply ``overrides`` and build a validated ``schema`` (default
    :class:`Config`) instance."""
    return config_base.load_config(path, overrides, schema=schema or Config)


def describe(schema=None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every leaf field of ``schema`` (default :class:`Config`): the
    reference table in docs/configs.md."""
    return config_base.describe(schema or Config, prefix)
