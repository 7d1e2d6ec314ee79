"""Smoke run of the demo model: one rectified-flow forward and backward pass on random data.

`vchitect demo --smoke`: a quick check that the install works without the full demo (curation →
training → sampling → export); it prints the loss and the time taken.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from ..config import load_config
from ..resources import resource_dir



def run_smoke(config: str | None = None, overrides: list[str] | None = None, batch: int = 2, frames: int = 8,
              text_len: int = 12, seed: int = 0) -> int:
    from ..models import VchitectTransformer3DModel

    cfg = load_config(config or resource_dir("configs") / "model" / "demo.yaml", overrides)
    torch.manual_seed(seed)
    model = VchitectTransformer3DModel(**dataclasses.asdict(cfg.model))
    m = cfg.model
    size = min(m.sample_size, m.pos_embed_max_size * m.patch_size)
    x0 = torch.randn(batch, m.in_channels, frames, size, size)  # B×C×F×H×W
    text = torch.randn(batch, text_len, m.joint_attention_dim)
    pooled = torch.randn(batch, m.pooled_projection_dim)
    t = torch.rand(batch)
    noise = torch.randn_like(x0)
    tt = t.view(-1, 1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * noise  # rectified flow: x_t = (1−t)·x0 + t·ε, target v = ε − x0
    start = time.perf_counter()
    pred = model(x_t, text, pooled, t * 1000).sample
    loss = torch.nn.functional.mse_loss(pred, noise - x0)
    loss.backward()
    elapsed = time.perf_counter() - start
    grads = sum(p.grad is not None for p in model.parameters())
    params = sum(p.numel() for p in model.parameters())
    print(f"demo model: {params:,} parameters; batch {batch}×{m.in_channels}×{frames}×{size}×{size}")
    print(f"loss {loss.item():.4f}  (forward+backward {elapsed:.2f}s, {grads} parameter tensors received gradients)")
    return 0
