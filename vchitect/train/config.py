"""The ``train:`` section of a run config: schedule, optimizer, EMA, checkpoints, logging."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from vchitect.config_base import ConfigError, setting


@dataclass
class ValidationConfig:
    """Periodic sampling of a few prompts during training."""

    every: int = setting(0, min=0, help="sample every N steps (0 = never)")
    prompts: list[str] = setting(default_factory=list, help="prompts to sample (needs a text encoder)")
    steps: int = setting(20, min=1, help="Euler steps per sample")
    guidance_scale: float = setting(5.0, min=0.0, help="classifier-free guidance scale")
    frames: int = setting(1, min=1, help="latent frames of the validation samples")
    height: int = setting(32, min=2, help="latent height of the validation samples")
    width: int = setting(32, min=2, help="latent width of the validation samples")
    seed: int = setting(0, min=0, help="seed of the validation noise")


@dataclass
class WandbConfig:
    mode: str = setting("auto", choices=["auto", "offline", "online", "disabled"],
                        help="auto: online when WANDB_API_KEY is set, else offline (never needs network)")
    project: str = setting("vchitect", help="wandb project name")


@dataclass
class TrainConfig:
    """Steps, optimisation and everything that makes a run resumable and observable."""

    output_dir: str = setting("runs/default", help="run folder: checkpoints/, metrics.jsonl, tb/, wandb/, "
                              "samples/")
    steps: int = setting(1000, min=1, help="optimizer steps of the whole run")
    seed: int = setting(0, min=0, help="seed of initialisation, noise, timesteps and text dropout")
    lr: float = setting(1e-4, min=0.0, help="peak learning rate")
    min_lr_ratio: float = setting(0.0, min=0.0, max=1.0, help="cosine schedule floor as a fraction of lr")
    warmup_steps: int = setting(0, min=0, help="linear warmup steps from 0 to lr")
    schedule: str = setting("constant", choices=["constant", "cosine"], help="after warmup: constant or cosine")
    weight_decay: float = setting(0.0, min=0.0, help="AdamW decay of matrices (never of norms, biases, "
                                  "position/timestep embeddings)")
    betas: list[float] = setting(default_factory=lambda: [0.9, 0.999], help="AdamW betas")
    eps: float = setting(1e-8, min=0.0, help="AdamW epsilon")
    grad_accum: int = setting(1, min=1, help="micro-batches per optimizer step")
    grad_clip: float = setting(1.0, min=0.0, help="clip the global gradient norm to this (0 = off)")
    trainable: list[str] = setting(default_factory=lambda: ["*"],
                                   help="glob patterns of trainable parameter names; others are frozen and "
                                   "kept out of the optimizer (e.g. ['*_temp*', '*temporal*'] for ExVideo)")
    ema_decay: float = setting(0.0, min=0.0, max=1.0, help="EMA decay of trainable parameters (0 = no EMA)")
    init_from: Optional[str] = setting(None, help="initial weights: a Vchitect-2.0 checkpoint "
                                       "(vchitect2:PATH; a released one or a `vchitect export` folder) or an SD3 "
                                       "transformer (sd3:PATH); safetensors only")
    checkpoint_every: int = setting(500, min=0, help="save every N steps (0 = only at the end)")
    keep_checkpoints: int = setting(3, min=1, help="keep the newest K complete checkpoints")
    async_checkpoint: bool = setting(True, help="save in the background on GPU (CPU runs save synchronously)")
    checkpoint_checksums: bool = setting(True, help="record a SHA-256 of every checkpoint file and check it "
                                         "before resuming or exporting (false: sizes only; hashing is shared "
                                         "by all ranks)")
    resume: str = setting("auto", help="auto: newest checkpoint in output_dir that verifies (newer damaged or "
                          "unfinished ones are passed over, each with a line saying why); none: start fresh; or "
                          "a path to a step-… folder, which must verify")
    log_every: int = setting(10, min=1, help="log metrics every N steps")
    peak_flops: float = setting(0.0, min=0.0, help="dense bf16 FLOP/s of one device for MFU; 0 = from the "
                                "GPU name (H100/H800/H200/A100/…); on CPU achieved FLOP/s is reported")
    max_nonfinite_steps: int = setting(10, min=1, help="abort after this many consecutive non-finite losses")
    tensorboard: bool = setting(True, help="write TensorBoard events to output_dir/tb")
    wandb: WandbConfig = setting(default_factory=WandbConfig, help="Weights & Biases logging")
    progress: bool = setting(True, help="rank 0: a rich progress bar on a terminal, plain progress lines "
                             "(step/total, rate, ETA) when stdout is not one")
    validation: ValidationConfig = setting(default_factory=ValidationConfig, help="periodic sampling")
    device: str = setting("auto", choices=["auto", "cpu", "cuda"], help="auto: cuda when available")
    simulate_crash: str = setting("", help="fault injection for resume tests: 'after_save:N' kills every rank "
                                  "(SIGKILL) once checkpoint N is complete; 'in_save:N' kills them after the "
                                  "shards of checkpoint N are written but before it is renamed complete; "
                                  "'at_step:N' kills them once step N is done and logged (between checkpoints)")

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas!r}: give two numbers in [0, 1), e.g. [0.9, 0.999]")
        if self.simulate_crash and not re.fullmatch(r"(after_save|in_save|at_step):\d+", self.simulate_crash):
            raise ConfigError(f"train.simulate_crash={self.simulate_crash!r}: use after_save:N, in_save:N or "
                              f"at_step:N")
        if self.init_from and not self.init_from.startswith(("vchitect2:", "sd3:")):
            raise ConfigError(f"train.init_from={self.init_from!r}: prefix the path with vchitect2: or sd3:")
