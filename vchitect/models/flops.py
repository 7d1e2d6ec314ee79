"""Analytic parameter and FLOP counts of :class:`VchitectTransformer3DModel`.

These are the *model FLOPs* used for MFU everywhere in the project (trainer metrics, benchmarks):
matrix-multiply FLOPs at 2 per multiply-add, attention included, elementwise work (norms,
activations, softmax) excluded — the usual convention of MFU reports. They follow the network
as implemented: the temporal branch is skipped at F = 1, the context-pre-only last block has no
text queries, and adaLN modulation is computed per video, not per frame. RepVideo layer
aggregation (``model.repvideo``) adds only elementwise work (window sums and the gated mix, a few
passes over the tokens of the mixing blocks), so it adds nothing here.

A training step is forward + backward. Backward costs two forward matmuls (input and weight
gradients) except for layers fed directly by data that needs no gradient — the patch embedding,
the text projection ``context_embedder`` and the first layers of the timestep / pooled-text
embedders — which only compute their weight gradient. Activation checkpointing recomputation
is *not* model FLOPs (it is hardware FLOPs), so it is not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

TIMESTEP_CHANNELS = 256  # sinusoidal timestep features fed to the timestep embedder (SD3)


@dataclass
class FlopCount:
    """Forward FLOPs by component, and how many of them are from layers with a leaf input."""

    forward: dict[str, float] = field(default_factory=dict)
    leaf_input: float = 0.0  # forward FLOPs of layers whose input needs no gradient

    def add(self, name: str, flops: float, leaf: bool = False) -> None:
        self.forward[name] = self.forward.get(name, 0.0) + flops
        if leaf:
            self.leaf_input += flops

    @property
    def forward_total(self) -> float:
        return sum(self.forward.values())

    @property
    def backward_total(self) -> float:
        return 2 * self.forward_total - self.leaf_input

    @property
    def train_step(self) -> float:
        return self.forward_total + self.backward_total


def _get(cfg, name):
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def model_flops(cfg, batch: int, frames: int, height: int, width: int, text_len: int) -> FlopCount:
    """FLOPs of one forward pass on ``batch`` latents of ``frames``×``height``×``width`` with
    ``text_len`` text tokens. ``cfg`` is a ModelConfig, a model ``config`` or a dict."""
    p = _get(cfg, "patch_size")
    D = _get(cfg, "num_attention_heads") * _get(cfg, "attention_head_dim")
    M = int(D * _get(cfg, "mlp_ratio"))
    c_in = _get(cfg, "in_channels")
    c_out = _get(cfg, "out_channels") or c_in
    Dt, P, layers = _get(cfg, "joint_attention_dim"), _get(cfg, "pooled_projection_dim"), _get(cfg, "num_layers")
    B, Fr, L = batch, frames, text_len
    N = B * Fr  # frame sequences
    S = (height // p) * (width // p)  # video tokens per frame
    temporal = Fr > 1
    fc = FlopCount()
    mm = lambda rows, k, n: 2.0 * rows * k * n  # noqa: E731  (rows×k) @ (k×n)
    attn = lambda seqs, q, k: 4.0 * seqs * q * k * D  # noqa: E731  QKᵀ and AV over all heads

    fc.add("embed.patch", mm(N * S, c_in * p * p, D), leaf=True)
    fc.add("embed.time", mm(B, TIMESTEP_CHANNELS, D), leaf=True)
    fc.add("embed.time", mm(B, D, D))
    fc.add("embed.pooled", mm(B, P, D), leaf=True)
    fc.add("embed.pooled", mm(B, D, D))
    fc.add("embed.context", mm(B * L, Dt, D), leaf=True)

    for i in range(layers):
        last = i == layers - 1
        Q = S if last else S + L  # query tokens per frame (no text queries in the last block)
        fc.add("block.adaln", mm(B, D, 6 * D))
        fc.add("block.adaln", mm(N, D, 2 * D) if last else mm(B, D, 6 * D))
        fc.add("block.qkv", mm(N * S, D, (7 if temporal else 4) * D))  # q,k,v, q_cross (+ temporal q,k,v)
        fc.add("block.qkv", mm(N * L, D, (2 if last else 3) * D))  # text k,v (+ q)
        fc.add("block.attn_spatial", attn(N, Q, S + L))
        fc.add("block.attn_cross", attn(B, Fr * Q, L))
        if temporal:
            fc.add("block.attn_temporal", attn(B * Q, Fr, Fr))
        fc.add("block.out", mm(N * Q, D, D))  # to_out_context
        fc.add("block.out", mm(N * S, D, D))  # to_out
        if not last:
            fc.add("block.out", mm(N * L, D, D))  # to_add_out
        if temporal:
            fc.add("block.out", mm(N * Q, D, D))  # to_out_temporal (+ to_add_out_temporal on text)
        fc.add("block.mlp", 2 * mm(N * S, D, M))
        if not last:
            fc.add("block.mlp", 2 * mm(N * L, D, M))

    fc.add("final", mm(N, D, 2 * D))
    fc.add("final", mm(N * S, D, p * p * c_out))
    return fc


def train_step_flops(cfg, batch: int, frames: int, height: int, width: int, text_len: int) -> float:
    """Model FLOPs of one training step (forward + backward)."""
    return model_flops(cfg, batch, frames, height, width, text_len).train_step


def count_parameters(cfg) -> int:
    """Parameter count, built on the meta device (no memory is allocated)."""
    import torch

    from .transformer import VchitectTransformer3DModel

    kwargs = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    with torch.device("meta"):
        model = VchitectTransformer3DModel(**kwargs)
    return sum(p.numel() for p in model.parameters())
