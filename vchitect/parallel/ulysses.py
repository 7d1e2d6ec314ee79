"""Ulysses sequence parallelism for the Vchitect Multimodal Diffusion Block.

What is split. Each of the N = B·F frames has S video tokens; every rank of the SP group keeps
``S_loc = ceil(S / sp)`` of them (the same token range in every frame; the last rank's range is
padded with zeros when S is not divisible). Text tokens (L per frame) are *replicated*: every
SP rank runs the text stream in full.

What is exchanged, per block (P = sp, D = model width, all figures per rank):

* **spatial** joint attention (each frame's video tokens attend to all video tokens of that
  frame): one all-to-all of the stacked video q/k/v from sequence-split to head-split
  (``3·N·S_loc·D·(P-1)/P`` elements sent), one all-to-all of the video output back
  (``N·S_loc·D·(P-1)/P``), and an all-gather of the text-query output heads
  (``N·L·D·(P-1)/P``; backward: the same volume as a reduce-scatter). Text keys/values are
  replicated, so each rank simply takes its own heads of them: no exchange.
* **temporal** attention runs across the F frames at a fixed token index. The split is along the
  token index inside a frame and identical for every frame, so every temporal sequence lives on
  one rank: **no exchange** (a proven optimisation, see ``tests/distributed``). Text temporal
  sequences are replicated and computed on every rank.
* **global cross** attention: queries are per token and the keys/values are the first frame's
  text, which every rank has: **no exchange**.

Why the text stream is replicated rather than split: L (≤ 120–256 tokens) is small against S
(thousands of tokens per frame), text keys/values are needed by every video query, and the
text-query rows of the spatial branch need all video keys. Splitting text would add an all-to-all
of text q/k/v per block to save ``L/(S/P+L)`` of the activation memory; replicating costs one
all-gather of ``N·L·D`` per block and redundant text-stream compute of the same fraction.

Gradient convention. Sharded tensors (video tokens) carry their true gradient; replicated
tensors (text stream, time embedding, parameters) carry a *partial* gradient on each SP rank, and
the true one is the sum over the SP group. Parameters are therefore reduced with a **sum over SP**
and a mean over data-parallel ranks; FSDP2 does that reduction (``fsdp.py`` sets the divide
factor to the data-parallel size). The output gather's backward is a plain slice because the loss
downstream of it is computed identically on every SP rank.

Hooks (the model file stays free of torch.distributed): a forward hook on ``pos_embed`` pads and
slices the tokens (and one on the condition adapter, whose tokens are added to them, slices its
output the same way), a forward hook on ``proj_out`` gathers them back (so the final adaLN and the
output projection run on the local shard), and each ``VchitectAttention.attention_fn`` seam is a
:class:`UlyssesAttention`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from vchitect.models.attention import dot_product_attention


# ------------------------------------------------------------------ collectives with autograd
def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """x: P×… contiguous; chunk j goes to rank j; returns P×… where chunk r came from rank r."""
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(out, x, group=group)
    return out


def _seq_to_heads(x: torch.Tensor, group, P: int) -> torch.Tensor:
    # x: N×S_loc×H×d (tokens of this rank, all heads) → N×(P·S_loc)×(H/P)×d (all tokens, own heads)
    N, S, H, d = x.shape
    send = x.reshape(N, S, P, H // P, d).permute(2, 0, 1, 3, 4)  # P×N×S_loc×Hl×d
    recv = _all_to_all(send, group)  # recv[r] = tokens of rank r, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(N, P * S, H // P, d)


def _heads_to_seq(x: torch.Tensor, group, P: int) -> torch.Tensor:
    # x: N×(P·S_loc)×Hl×d → N×S_loc×(P·Hl)×d
    N, S_all, Hl, d = x.shape
    S = S_all // P
    send = x.reshape(N, P, S, Hl, d).permute(1, 0, 2, 3, 4)  # P×N×S_loc×Hl×d
    recv = _all_to_all(send, group)  # recv[r] = my tokens, heads of rank r
    return recv.permute(1, 2, 0, 3, 4).reshape(N, S, P * Hl, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, P):
        ctx.group, ctx.P = group, P
        return _seq_to_heads(x, group, P)

    @staticmethod
    def backward(ctx, g):
        return _heads_to_seq(g, ctx.group, ctx.P), None, None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, P):
        ctx.group, ctx.P = group, P
        return _heads_to_seq(x, group, P)

    @staticmethod
    def backward(ctx, g):
        return _seq_to_heads(g, ctx.group, ctx.P), None, None


# torch ≥ 2.13 names these *_single; 2.11/2.12 only have *_tensor.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group, P: int) -> torch.Tensor:
    """P×… stacked copies of x from every rank."""
    out = x.new_empty((P * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out.unflatten(0, (P, x.shape[0]))


class GatherHeads(torch.autograd.Function):
    """Replicate a head-split tensor (N×L×Hl×d → N×L×H×d). Backward: sum the partial gradients of
    the replicated result over the group and keep this rank's heads (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, P, rank):
        ctx.group, ctx.P, ctx.rank = group, P, rank
        parts = _all_gather(x, group, P)  # P×N×L×Hl×d
        return parts.permute(1, 2, 0, 3, 4).flatten(2, 3)

    @staticmethod
    def backward(ctx, g):
        N, L, H, d = g.shape
        P = ctx.P
        chunks = g.reshape(N, L, P, H // P, d).permute(2, 0, 1, 3, 4).contiguous()  # P×N×L×Hl×d
        if dist.get_backend(ctx.group) == "nccl":
            out = chunks.new_empty(chunks.shape[1:])
            _reduce_scatter_single(out, chunks.flatten(0, 1), group=ctx.group)  # input: P·N×L×Hl×d
            return out, None, None, None
        dist.all_reduce(chunks, group=ctx.group)  # gloo has no reduce-scatter of tensors
        return chunks[ctx.rank], None, None, None


# The collectives run eagerly even inside a torch.compile'd block: the compiled graph breaks around
# them instead of tracing process-group calls inside autograd Functions.
@torch.compiler.disable
def seq_to_heads(x: torch.Tensor, group, P: int) -> torch.Tensor:
    return SeqToHeads.apply(x, group, P)


@torch.compiler.disable
def heads_to_seq(x: torch.Tensor, group, P: int) -> torch.Tensor:
    return HeadsToSeq.apply(x, group, P)


@torch.compiler.disable
def gather_heads(x: torch.Tensor, group, P: int, rank: int) -> torch.Tensor:
    return GatherHeads.apply(x, group, P, rank)


def _local_slice(x: torch.Tensor, rank: int, P: int, S: int) -> torch.Tensor:
    """Tokens [rank·S_loc, (rank+1)·S_loc) of x (N×S×…), zero-padded to S_loc."""
    S_loc = -(-S // P)
    lo, hi = rank * S_loc, min((rank + 1) * S_loc, S)
    part = x[:, lo:hi] if lo < S else x[:, :0]
    if part.shape[1] < S_loc:
        pad = x.new_zeros((x.shape[0], S_loc - part.shape[1], *x.shape[2:]))
        part = torch.cat([part, pad], dim=1)
    return part


# ------------------------------------------------------------------ the shared context
@dataclass
class UlyssesContext:
    """State shared by the hooks and the attention seams of one model."""

    group: object
    size: int
    rank: int
    num_tokens: int = 0  # S: real video tokens per frame (set by the pos_embed hook each forward)

    @property
    def local_tokens(self) -> int:
        return -(-self.num_tokens // self.size)

    @property
    def padded_tokens(self) -> int:
        return self.local_tokens * self.size

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """N×S×D (replicated) → N×S_loc×D (this rank's tokens, zero-padded)."""
        self.num_tokens = x.shape[1]
        return _local_slice(x, self.rank, self.size, self.num_tokens)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return _GatherTokens.apply(x, self)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sp: UlyssesContext):
        ctx.sp = sp
        ctx.S = sp.num_tokens
        parts = _all_gather(x, sp.group, sp.size)  # P×N×S_loc×C
        return parts.permute(1, 0, 2, 3).flatten(1, 2)[:, :sp.num_tokens].contiguous()

    @staticmethod
    def backward(ctx, g):
        return _local_slice(g, ctx.sp.rank, ctx.sp.size, ctx.S).contiguous(), None


# ------------------------------------------------------------------ the attention seam
class UlyssesAttention:
    """``attention_fn`` for :class:`VchitectAttention` under sequence parallelism (see module doc)."""

    def __init__(self, sp: UlyssesContext, backend: str = "sdpa"):
        self.sp = sp
        self.backend = backend

    def __call__(self, q, k, v, key_mask: Optional[torch.Tensor] = None, *, branch: str):
        if branch != "spatial":
            # temporal: every sequence (one token index, all frames) is local;
            # cross: per-token queries against the replicated first-frame text.
            return dot_product_attention(q, k, v, key_mask, self.backend)
        return self.spatial(q, k, v, key_mask)

    def spatial(self, q, k, v, key_mask):
        # q: N×(S_loc+Lq)×H×d, k/v: N×(S_loc+L)×H×d — [local video tokens; replicated text tokens]
        sp = self.sp
        P, r, S_loc, S_pad = sp.size, sp.rank, sp.local_tokens, sp.padded_tokens
        H = q.shape[2]
        Hl = H // P
        heads = slice(r * Hl, (r + 1) * Hl)
        N = q.shape[0]
        qkv = torch.stack([q[:, :S_loc], k[:, :S_loc], v[:, :S_loc]]).flatten(0, 1)  # 3N×S_loc×H×d
        qkv = seq_to_heads(qkv, sp.group, P).unflatten(0, (3, N))  # 3×N×S_pad×Hl×d
        qt, kt, vt = q[:, S_loc:, heads], k[:, S_loc:, heads], v[:, S_loc:, heads]
        Lq = qt.shape[1]
        qh = torch.cat([qkv[0], qt], dim=1)
        kh = torch.cat([qkv[1], kt], dim=1)
        vh = torch.cat([qkv[2], vt], dim=1)
        mask = None
        if key_mask is not None or S_pad != sp.num_tokens:
            valid = torch.arange(S_pad, device=q.device) < sp.num_tokens
            video_mask = valid.expand(N, S_pad)
            text_mask = (key_mask[:, S_loc:] if key_mask is not None
                         else torch.ones(N, k.shape[1] - S_loc, dtype=torch.bool, device=q.device))
            mask = torch.cat([video_mask, text_mask], dim=1)
        out = dot_product_attention(qh, kh, vh, mask, self.backend)  # N×(S_pad+Lq)×Hl×d
        video = heads_to_seq(out[:, :S_pad].contiguous(), sp.group, P)  # N×S_loc×H×d
        if Lq == 0:
            return video
        text = gather_heads(out[:, S_pad:].contiguous(), sp.group, P, r)  # N×Lq×H×d
        return torch.cat([video, text], dim=1)


# ------------------------------------------------------------------ applying it to a model
def apply_ulysses(model: nn.Module, sp_mesh) -> UlyssesContext:
    """Split video tokens over ``sp_mesh`` for ``model`` (a VchitectTransformer3DModel)."""
    group = sp_mesh.get_group()
    sp = UlyssesContext(group=group, size=sp_mesh.size(), rank=sp_mesh.get_local_rank())

    def split_tokens(_module, _inputs, x):  # pos_embed output N×S×D → N×S_loc×D
        return sp.split(x)

    def gather_tokens(_module, _inputs, x):  # proj_out output N×S_loc×C → N×S×C
        return sp.gather(x)

    model.pos_embed.register_forward_hook(split_tokens)
    if getattr(model, "condition_adapter", None) is not None:
        # its N×S×D tokens are added to pos_embed's: the same local range (computed on every rank
        # from the replicated condition; its parameters get partial gradients, summed over SP)
        model.condition_adapter.register_forward_hook(split_tokens)
    model.proj_out.register_forward_hook(gather_tokens)
    for block in model.transformer_blocks:
        block.attn.attention_fn = UlyssesAttention(sp, block.attn.backend)
    model._ulysses = sp
    return sp
