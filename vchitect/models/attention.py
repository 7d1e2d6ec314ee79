"""The three-branch attention of the Vchitect-2.0 Multimodal Diffusion Block, and the kernels.

Layout inside this file: tokens are ``N×S×H×d`` (N sequences, S tokens, H heads of d channels).
With B videos of F frames, a block sees N = B·F frames of S video tokens and L text tokens (every
frame carries its own copy of the text stream). From the same normalised input:

1. **spatial** joint attention within each frame over [its S video tokens; its L text tokens];
2. **temporal** attention across the F frames at every spatial position and every text index,
   with its own video q/k/v and a 1D RoPE over the frame index;
3. **global cross-attention** from the video (and text) tokens of all frames of a video to the
   text keys/values of its first frame.

``out_video = to_out(spatial_scale·spatial + to_out_context(cross)) + to_out_temporal(temporal)``
and likewise for the text stream with ``to_add_out`` / ``to_add_out_temporal``. Parameter names
are those of the released ``VchitectXLTransformerModel`` so that checkpoints map one-to-one.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import apply_rope

BACKEND_EXTRA = {"flash_attn": "flash_attn", "te": "transformer_engine"}


def check_backend(backend: str) -> None:
    """Fail early, naming the extra to install, when an optional kernel is missing."""
    if backend == "sdpa":
        return
    if backend not in BACKEND_EXTRA:
        raise ValueError(f"model.attention_backend={backend!r} is unknown; choose sdpa, flash_attn or te")
    if importlib.util.find_spec(BACKEND_EXTRA[backend]) is None:
        raise ImportError(
            f"model.attention_backend={backend!r} needs the `{BACKEND_EXTRA[backend]}` package, which is not "
            f"installed. Install the GPU extra (pip install 'vchitect[gpu]') or set model.attention_backend=sdpa.")


_TE_MODULES: dict = {}


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          key_mask: Optional[torch.Tensor] = None, backend: str = "sdpa") -> torch.Tensor:
    """Softmax attention. q: N×Sq×H×d, k/v: N×Sk×H×d, key_mask: N×Sk bool (True = attend).

    flash-attn and Transformer Engine take the unmasked calls; masked calls (padded text) go to
    SDPA, which accepts an arbitrary boolean mask.
    """
    if key_mask is None and backend == "flash_attn" and q.is_cuda:
        from flash_attn import flash_attn_func  # optional extra

        return flash_attn_func(q, k, v)
    if key_mask is None and backend == "te" and q.is_cuda:
        from transformer_engine.pytorch import DotProductAttention  # optional extra

        key = (q.shape[2], q.shape[3])
        if key not in _TE_MODULES:
            _TE_MODULES[key] = DotProductAttention(q.shape[2], q.shape[3], qkv_format="bshd",
                                                   attn_mask_type="no_mask")
        return _TE_MODULES[key](q, k, v).unflatten(-1, (q.shape[2], q.shape[3]))
    mask = None if key_mask is None else key_mask[:, None, None, :]  # N×1×1×Sk
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


AttentionFn = Callable[..., torch.Tensor]


class VchitectAttention(nn.Module):
    """Projections and the three attention branches of one Multimodal Diffusion Block."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, spatial_scale: float = 1.1,
                 qk_norm: str = "none", backend: str = "sdpa"):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.context_pre_only = context_pre_only
        self.spatial_scale = spatial_scale
        self.backend = backend
        # Video stream: spatial, temporal and cross-attention queries, spatial and temporal keys/values.
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.to_q_temp = nn.Linear(dim, inner)
        self.to_k_temp = nn.Linear(dim, inner)
        self.to_v_temp = nn.Linear(dim, inner)
        self.to_q_cross = nn.Linear(dim, inner)
        # Text stream: shared by all three branches.
        self.add_q_proj = nn.Linear(dim, inner)
        self.add_k_proj = nn.Linear(dim, inner)
        self.add_v_proj = nn.Linear(dim, inner)
        # Outputs. Temporal and cross outputs start at zero, so a fresh block is the image MMDiT.
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.to_out_temporal = nn.Linear(inner, dim)
        self.to_out_context = nn.Linear(inner, dim)
        if not context_pre_only:
            self.to_add_out = nn.Linear(inner, dim)
        # The released model also creates this one in the context-pre-only block, where its output
        # is discarded; it is kept (unused there) so checkpoints load strictly.
        self.to_add_out_temporal = nn.Linear(inner, dim)
        for layer in (self.to_out_temporal, self.to_out_context, self.to_add_out_temporal):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        if qk_norm == "rms_norm":
            norm = lambda: nn.RMSNorm(head_dim, eps=1e-6)  # noqa: E731
            self.norm_q, self.norm_k = norm(), norm()
            self.norm_q_temp, self.norm_k_temp, self.norm_q_cross = norm(), norm(), norm()
            self.norm_added_q, self.norm_added_k = norm(), norm()
        elif qk_norm != "none":
            raise ValueError(f"qk_norm={qk_norm!r}: choose none or rms_norm")
        self.qk_norm = qk_norm
        # Seam for sequence parallelism: called as attention_fn(q, k, v, key_mask, branch=…).
        self.attention_fn: Optional[AttentionFn] = None

    def _heads(self, x: torch.Tensor, norm: str | None = None) -> torch.Tensor:
        x = x.unflatten(-1, (-1, self.head_dim))  # N×S×H×d (H may be local under tensor parallel)
        if norm is not None and self.qk_norm != "none":
            x = getattr(self, norm)(x)
        return x

    def _attend(self, q, k, v, key_mask, branch: str) -> torch.Tensor:
        if self.attention_fn is not None:
            return self.attention_fn(q, k, v, key_mask, branch=branch)
        return dot_product_attention(q, k, v, key_mask, self.backend)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, num_frames: int, rope: tuple[torch.Tensor, torch.Tensor],
                text_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """x: N×S×D normalised video tokens, ctx: N×L×D normalised text tokens, N = B·F (frame-major
        within each video). text_mask: B×L bool or None. Returns (video N×S×D, text N×L×D or None)."""
        N, S, _ = x.shape
        L = ctx.shape[1]
        Fr = num_frames
        B = N // Fr
        # In the context-pre-only (last) block the text outputs are discarded, so text queries are skipped.
        with_text_q = not self.context_pre_only
        Q = S + L if with_text_q else S

        tk = self._heads(self.add_k_proj(ctx), "norm_added_k")  # N×L×H×d
        tv = self._heads(self.add_v_proj(ctx))
        tq = self._heads(self.add_q_proj(ctx), "norm_added_q") if with_text_q else None

        def with_text(video: torch.Tensor, text: Optional[torch.Tensor]) -> torch.Tensor:
            return video if text is None else torch.cat([video, text], dim=1)

        # 1. spatial: each frame attends over [its video tokens; its text tokens].
        frame_mask = None
        if text_mask is not None:
            frame_mask = torch.cat([text_mask.new_ones(B, S), text_mask], dim=1).repeat_interleave(Fr, dim=0)
        q = with_text(self._heads(self.to_q(x), "norm_q"), tq)
        k = torch.cat([self._heads(self.to_k(x), "norm_k"), tk], dim=1)
        v = torch.cat([self._heads(self.to_v(x)), tv], dim=1)
        spatial = self._attend(q, k, v, frame_mask, "spatial").flatten(2)  # N×Q×(H·d)

        # 2. cross: all tokens of a video attend to the text of its first frame.
        qc = with_text(self._heads(self.to_q_cross(x), "norm_q_cross"), tq)
        qc = qc.reshape(B, Fr * Q, *qc.shape[2:])  # B×(F·Q)×H×d
        first = torch.arange(B, device=x.device) * Fr
        cross = self._attend(qc, tk[first], tv[first], text_mask, "cross")
        cross = self.to_out_context(cross.reshape(N, Q, -1))  # N×Q×D

        mixed = spatial * self.spatial_scale + cross
        video = self.to_out[1](self.to_out[0](mixed[:, :S]))
        text = None
        if with_text_q:
            text = self.to_add_out(mixed[:, S:])

        # 3. temporal: at each token index, attend across the F frames of the video (RoPE on frames).
        if Fr > 1:
            qt = with_text(self._heads(self.to_q_temp(x), "norm_q_temp"), tq)
            kt = with_text(self._heads(self.to_k_temp(x), "norm_k_temp"), tk if with_text_q else None)
            vt = with_text(self._heads(self.to_v_temp(x)), tv if with_text_q else None)

            def frames_last(t: torch.Tensor) -> torch.Tensor:  # (B·F)×Q×H×d → (B·Q)×F×H×d
                return t.reshape(B, Fr, Q, *t.shape[2:]).transpose(1, 2).reshape(B * Q, Fr, *t.shape[2:])

            cos, sin = rope
            qt, kt = apply_rope(frames_last(qt), cos, sin), apply_rope(frames_last(kt), cos, sin)
            temporal = self._attend(qt, kt, frames_last(vt), None, "temporal")  # (B·Q)×F×H×d
            temporal = temporal.reshape(B, Q, Fr, -1).transpose(1, 2).reshape(N, Q, -1)
            video = video + self.to_out_temporal(temporal[:, :S])
            if with_text_q:
                text = text + self.to_add_out_temporal(temporal[:, S:])
        return video, text
