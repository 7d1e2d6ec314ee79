"""AdamW with decay only on matrices, eager optimizer state, and the warmup + constant/cosine
schedule. (Gradient clipping for sharded gradients is ``vchitect.parallel.clip_grad_norm_``.)"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from .config import TrainConfig

NO_DECAY_PREFIXES = ("pos_embed.", "time_text_embed.")


def clean_name(name: str) -> str:
    """Parameter name without wrapper segments (activation checkpointing, torch.compile)."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def apply_trainable(model: nn.Module, patterns: list[str]) -> list[str]:
    """Freeze every parameter whose name matches none of ``patterns``; return the trainable names."""
    trainable = []
    for name, p in model.named_parameters():
        name = clean_name(name)
        keep = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"train.trainable={patterns!r} matches no parameter; names look like "
                         f"'transformer_blocks.0.attn.to_q_temp.weight'")
    return trainable


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(name)
        (no_decay if p.ndim < 2 or name.startswith(NO_DECAY_PREFIXES) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if device_type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(groups, **kwargs)
    init_optimizer_state(optimizer)
    return optimizer


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's state for every parameter now, exactly as its first step would (step 0, zero
    moments). Parameters that get no gradient in some steps — the temporal branch on image batches,
    the unused projections of the last block — then still have state, so every checkpoint holds the
    same keys and loads on any layout."""
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = optimizer.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu")
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
