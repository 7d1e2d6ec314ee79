"""Gradient norm and clipping for parameters spread over several meshes.

After ``parallelize`` a model's gradients are a mix of DTensors on the FSDP mesh, DTensors on the
2-D (data, tp) mesh and, without FSDP, plain tensors replicated over TP. ``torch.nn.utils.
clip_grad_norm_`` cannot stack norms of DTensors on different meshes, so the norm is taken per
mesh group (one reduction per group) and the groups are combined locally.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def total_grad_norm(parameters: Iterable[torch.Tensor], norm_type: float = 2.0) -> torch.Tensor:
    """The norm of all gradients as if they were one unsharded vector (same value on every rank)."""
    groups: dict = {}
    for p in parameters:
        g = p.grad
        if g is None:
            continue
        key = (id(g.device_mesh), g.placements) if isinstance(g, DTensor) else ("local", g.device)
        groups.setdefault(key, []).append(g)
    norms = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, norm_type, foreach=True)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        norms.append(n.float())
    if not norms:
        return torch.tensor(0.0)
    norms = [n.to(norms[0].device) for n in norms]
    if math.isinf(norm_type):
        return torch.stack(norms).max()
    return torch.stack(norms).pow(norm_type).sum().pow(1.0 / norm_type)


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """Scale gradients so their total norm is at most ``max_norm``; returns the norm before clipping."""
    parameters = [p for p in parameters if p.grad is not None]
    total = total_grad_norm(parameters, norm_type)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in parameters:
        p.grad.mul_(coef.to(p.grad.device) if not isinstance(p.grad, DTensor) else coef.item())
    return total
