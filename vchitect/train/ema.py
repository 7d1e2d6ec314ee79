"""Exponential moving average of the trainable parameters, sharded exactly like them (the EMA copy
of a DTensor parameter is a DTensor with the same mesh and placements)."""

from __future__ import annotations

import torch
from torch import nn

from .optim import clean_name


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.names, self.params, self.shadow = [], [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                self.names.append(clean_name(name))
                self.params.append(p)
                self.shadow.append(p.detach().clone().float() if not hasattr(p, "device_mesh")
                                   else p.detach().clone())

    @torch.no_grad()
    def update(self) -> None:
        # shadow ← decay·shadow + (1 − decay)·param
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(p.detach().to(shadow.dtype), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, t in zip(self.names, self.shadow):
                t.copy_(state[name])
