"""RepVideo layer aggregation: blocks read a gated mix of their input and the mean of earlier block outputs.

RepVideo (Si et al. 2025, *RepVideo: Rethinking Cross-Layer Representation for Video Generation*)
observes that the attention maps of a video DiT change strongly from one layer to the next, and that
the similarity of features between adjacent frames falls along the depth; it feeds each layer an
*enriched* representation, the features accumulated over neighbouring layers, combined with the
layer's own input through a gate. Its public code (github.com/Vchitect/RepVideo,
``sat/transformer_gating.py``, on CogVideoX-2B) does, before layer i (0-based):

    cache   = outputs of the layers of the current window, in order (the previous layer's last)
    h_in[i] = g_i · mean(cache) + (1 − g_i) · h_in[i]          h_in[i]: the layer's input
    h_out[i] = layer_i(h_in[i]);  cache = [h_out[i]] if i % W == 0 else cache + [h_out[i]]

with W = 6, one learnable scalar g_i per layer (a ``num_layers`` vector initialised to 0.5), and
before layer 0 the cache holding the embeddings themselves. So the windows are the outputs of
layers {0 … W−1}, {W … 2W−1}, …; block i ≥ 1 mixes the mean of the outputs of its window so far,
which always includes the previous output (= its input); block kW + 1 sees one output only, and its
mix is the identity. The mixed tensor *replaces* the layer's input: the residual stream that the
layer's norm (hence its attention) and its residual add read. CogVideoX's stream is [text; video]
concatenated, so text tokens are aggregated too.

Ours (:class:`LayerAggregation`), in the two-stream Multimodal Diffusion Block, is that, stream by
stream: the video tokens x (N×S×D) and the text tokens ctx (N×L×D) are each mixed with the mean of
the same stream's outputs in the window, with the block's one gate; the context-pre-only last block
mixes its (key/value-only) text input like the others. The mix is written as ``x + g·(mean − x)``
(= g·mean + (1 − g)·x). Blocks whose window holds one output are left untouched (bit for bit), as is
block 0: with W = 6 on 24 layers blocks 2–6, 8–12, 14–18 and 20–23 mix (19 of 24); with W = 4 (or
3) on the demo's 4 layers blocks 2 and 3; with W = 2 block 2 only. A model with fewer than 3 layers
mixes no block and is refused, as is a window of 1 or one larger than the depth.

The gate (``gate``): ``learned`` — one trainable scalar per block (``layer_aggregation.gate``, a
``num_layers`` vector as in RepVideo; the entries of blocks that never mix stay at their init and
get zero gradient), initialised to ``gate_init`` (default **0**: the model is exactly the one
without RepVideo at init, so a pretrained checkpoint fine-tunes from its own outputs; the gate's
gradient Σ (mean − x)·∂L/∂x_in is non-zero from the first step). RepVideo's own init is 0.5
(``gate_init: 0.5``). ``fixed`` — a constant, no parameter (default 0.5, RepVideo's init value): the
network's parameters are then exactly those of the model without RepVideo.

The running sums travel between blocks as explicit values (:class:`WindowSum`), returned by
:meth:`LayerAggregation.accumulate` and passed to the next :meth:`LayerAggregation.mix`, never as
module state: activation checkpointing recomputes a block's forward without touching them, and
Ulysses sequence parallelism needs nothing (the aggregation is per token, across layers, so it is
local to the rank that holds the token; the replicated text stream is mixed identically on every
rank). Under tensor parallelism the blocks' inputs and outputs are replicated (row-wise outputs are
all-reduced), so the sums are too. Compute: two elementwise passes per mixing block and stream (the
sum and the mix), no matrix multiply (vchitect/models/flops.py counts none). Memory: with a learned
gate, autograd keeps ``mean − x`` of every mixing block (one more token tensor per block; not
offloaded by activation offload); with a fixed gate nothing more.

This file never imports torch.distributed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

GATES = ("learned", "fixed")
FIXED_GATE_DEFAULT = 0.5  # RepVideo's init of its gates (used as the constant of a fixed gate)
KEYS = ("window", "gate", "gate_init")


@dataclass(frozen=True)
class RepVideoSettings:
    """The checked ``repvideo`` init argument of :class:`~vchitect.models.VchitectTransformer3DModel`."""

    window: int
    gate: str
    gate_init: float


def resolve_repvideo(repvideo: Optional[dict[str, Any]], num_layers: int) -> Optional[RepVideoSettings]:
    """``model.repvideo`` ({window, gate, gate_init}) → settings, or None when off (None, {} or window 0).

    Raises ``ValueError`` naming the key and what to set when the settings cannot work."""
    if dataclasses.is_dataclass(repvideo):  # vchitect.config.RepVideoConfig, e.g. from vars(cfg.model)
        repvideo = dataclasses.asdict(repvideo)
    if not repvideo:
        return None
    unknown = sorted(set(repvideo) - set(KEYS))
    if unknown:
        raise ValueError(f"model.repvideo has unknown key(s) {unknown}; it takes {', '.join(KEYS)}")
    window = int(repvideo.get("window") or 0)
    if window == 0:
        return None
    gate = repvideo.get("gate") or "learned"
    if gate not in GATES:
        raise ValueError(f"model.repvideo.gate={gate!r}: choose learned (a trained scalar per block) or fixed")
    if window < 2:
        raise ValueError(f"model.repvideo.window={window}: a window of one layer averages nothing (the model without "
                         f"RepVideo); use 2 … num_layers, or 0 to turn RepVideo off")
    if window > num_layers:
        raise ValueError(f"model.repvideo.window={window} is larger than the model's {num_layers} layers "
                         f"(model.num_layers); use a window of 2 … {num_layers} (6 suits 24 layers, 4 the demo's 4)")
    if num_layers < 3:
        raise ValueError(f"model.repvideo on {num_layers} layers mixes no block (block i ≥ 2 is the first whose window "
                         f"holds two outputs); use model.num_layers ≥ 3 or set model.repvideo.window=0")
    gate_init = repvideo.get("gate_init")
    if gate_init is None:
        gate_init = 0.0 if gate == "learned" else FIXED_GATE_DEFAULT
    gate_init = float(gate_init)
    if not 0.0 <= gate_init <= 1.0 or (gate == "fixed" and gate_init == 0.0):
        raise ValueError(f"model.repvideo.gate_init={gate_init:g}: the gate weighs the window mean against the "
                         f"block's input, so it lies in [0, 1]" + (" and a fixed gate of 0 is the model without "
                                                                   "RepVideo; use e.g. 0.5" if gate == "fixed" else ""))
    return RepVideoSettings(window, gate, gate_init)


@dataclass
class WindowSum:
    """Running sum of the block outputs of the current window: video N×S×D, text N×L×D (None once a block
    returned no text), and how many outputs it holds."""

    x: torch.Tensor
    ctx: Optional[torch.Tensor]
    count: int


class LayerAggregation(nn.Module):
    """RepVideo's gated mix of a block's input with the mean of its window's earlier outputs (module doc)."""

    def __init__(self, num_layers: int, settings: RepVideoSettings):
        super().__init__()
        self.window = settings.window
        self.learned = settings.gate == "learned"
        self.fixed_gate = settings.gate_init
        if self.learned:
            self.gate = nn.Parameter(torch.full((num_layers,), settings.gate_init))

    def mixing_blocks(self, num_layers: int) -> list[int]:
        """Indices of the blocks whose input is mixed (their window holds ≥ 2 outputs)."""
        return [i for i in range(1, num_layers) if (i - 1) % self.window >= 1]

    def mix(self, i: int, x: torch.Tensor, ctx: Optional[torch.Tensor], window: Optional[WindowSum]):
        """The input of block ``i``: (x, ctx) mixed with the window mean; unchanged where it holds < 2 outputs."""
        if window is None or window.count < 2:
            return x, ctx
        g = self.gate[i].to(x.dtype) if self.learned else self.fixed_gate
        x = x + g * (window.x / window.count - x)
        if ctx is not None and window.ctx is not None:
            ctx = ctx + g * (window.ctx / window.count - ctx)
        return x, ctx

    def accumulate(self, i: int, x: torch.Tensor, ctx: Optional[torch.Tensor],
                   window: Optional[WindowSum]) -> WindowSum:
        """The window after block ``i`` returned (x, ctx): a new one at every multiple of the window size."""
        if window is None or i % self.window == 0:
            return WindowSum(x, ctx, 1)
        text = window.ctx + ctx if window.ctx is not None and ctx is not None else None
        return WindowSum(window.x + x, text, window.count + 1)

    def extra_repr(self) -> str:
        gate = "learned" if self.learned else f"fixed {self.fixed_gate:g}"
        return f"window={self.window}, gate={gate}"


__all__ = ["FIXED_GATE_DEFAULT", "GATES", "LayerAggregation", "RepVideoSettings", "WindowSum", "resolve_repvideo"]
