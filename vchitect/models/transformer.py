"""``VchitectTransformer3DModel``: the Vchitect-2.0 network (an SD3-medium MMDiT extended to video).

Shapes: latents B×C×F×H×W; text hidden states B×L×Dt with mask B×L; pooled text B×P; timestep B
(in [0, 1000], SD3 convention). Each frame is patch-embedded on its own, and every frame carries
its own copy of the text stream, so blocks work on N = B·F sequences of S = (H/p)(W/p) video and
L text tokens. The last block is context-pre-only, as in SD3.

Differences from the released ``VchitectXLTransformerModel`` (numerically identical at batch 1
without text padding, which is what the released pipeline runs):

* batch sizes above 1 (the released code repeats the time embedding in the wrong order and
  attends to the first video's text);
* a text mask keeps padding tokens out of every attention branch;
* F = 1 skips the temporal branch instead of computing it and multiplying by zero;
* input is B×C×F×H×W and output B×C×F×H×W (the released one takes B×F×C×H×W at B = 1).

This file never imports torch.distributed; parallelism is applied from outside
(:func:`vchitect.parallel.parallelize`).
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import CombinedTimestepTextProjEmbeddings
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.normalization import AdaLayerNormContinuous
from torch import nn

from .attention import VchitectAttention, check_backend
from .condition_adapter import ConditionAdapter
from .embeddings import PatchEmbed, frame_sincos_table, rope_cos_sin
from .repvideo import LayerAggregation, WindowSum, resolve_repvideo


class AdaLNZero(nn.Module):
    """SiLU → Linear(D, 6D) modulation (shift, scale, gate for attention and MLP) and a LayerNorm.

    Same parameters and arithmetic as diffusers' ``AdaLayerNormZero``, but the modulation is
    computed once per video (B rows) and broadcast to its frames, instead of once per frame.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, num_frames: int):
        # x: N×T×D, emb: B×D → normalised x and five N×D modulation vectors
        mod = self.linear(self.silu(emb)).repeat_interleave(num_frames, dim=0)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


class MultimodalDiffusionBlock(nn.Module):
    """One Vchitect-2.0 block: adaLN-Zero on both streams, three-branch attention, two MLPs."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_pre_only: bool, mlp_ratio: float = 4.0,
                 spatial_scale: float = 1.1, qk_norm: str = "none", attention_backend: str = "sdpa"):
        super().__init__()
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLNZero(dim)
        if context_pre_only:
            self.norm1_context = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6, bias=True)
        else:
            self.norm1_context = AdaLNZero(dim)
        self.attn = VchitectAttention(dim, heads, head_dim, context_pre_only, spatial_scale, qk_norm,
                                      attention_backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        inner = int(dim * mlp_ratio)
        self.ff = FeedForward(dim=dim, dim_out=dim, inner_dim=inner, activation_fn="gelu-approximate")
        if not context_pre_only:
            self.norm2_context = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.ff_context = FeedForward(dim=dim, dim_out=dim, inner_dim=inner, activation_fn="gelu-approximate")

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, num_frames: int,
                rope: tuple[torch.Tensor, torch.Tensor], text_mask: Optional[torch.Tensor] = None):
        # x: N×S×D video, ctx: N×L×D text, temb: B×D → (x, ctx or None)
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb, num_frames)
        if self.context_pre_only:
            nctx = self.norm1_context(ctx, temb.repeat_interleave(num_frames, dim=0))
        else:
            nctx, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(ctx, temb, num_frames)

        attn_video, attn_text = self.attn(nx, nctx, num_frames, rope, text_mask)

        x = x + gate_msa[:, None] * attn_video
        h = self.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp[:, None] * self.ff(h)
        if self.context_pre_only:
            return x, None
        ctx = ctx + c_gate_msa[:, None] * attn_text
        h = self.norm2_context(ctx) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        ctx = ctx + c_gate_mlp[:, None] * self.ff_context(h)
        return x, ctx


class VchitectTransformer3DModel(ModelMixin, ConfigMixin):
    """The Vchitect-2.0 video diffusion transformer.

    Args mirror :class:`vchitect.config.ModelConfig` (see there for what each means).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["MultimodalDiffusionBlock"]

    @register_to_config
    def __init__(self, sample_size: int = 128, patch_size: int = 2, in_channels: int = 16,
                 out_channels: Optional[int] = None, num_layers: int = 24, num_attention_heads: int = 24,
                 attention_head_dim: int = 64, joint_attention_dim: int = 4096, pooled_projection_dim: int = 2048,
                 pos_embed_max_size: int = 192, mlp_ratio: float = 4.0, spatial_scale: float = 1.1,
                 rope_theta: float = 1.0e6, rope_scaling_factor: float = 1.0, qk_norm: str = "none",
                 attention_backend: str = "sdpa", frame_pos_embed: str = "none", prediction: str = "velocity",
                 prediction_t_min: float = 0.05, condition_channels: int = 0, condition_vae_spatial_factor: int = 8,
                 condition_vae_temporal_factor: int = 4, condition_hidden_channels: int = 64,
                 repvideo: Optional[dict] = None):
        super().__init__()
        check_backend(attention_backend)
        repvideo_settings = resolve_repvideo(repvideo, num_layers)
        if frame_pos_embed not in ("none", "sincos"):
            raise ValueError(f"frame_pos_embed={frame_pos_embed!r}: choose 'none' or 'sincos'")
        if prediction not in ("velocity", "sample"):
            raise ValueError(f"prediction={prediction!r}: choose 'velocity' or 'sample'")
        if prediction == "sample" and (out_channels or in_channels) != in_channels:
            raise ValueError(f"prediction='sample' predicts x0, so out_channels ({out_channels}) must equal "
                             f"in_channels ({in_channels})")
        if attention_head_dim % 2:
            raise ValueError(f"attention_head_dim={attention_head_dim} must be even (RoPE rotates channel pairs)")
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.out_channels = out_channels or in_channels
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, dim, pos_embed_max_size)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(embedding_dim=dim,
                                                                  pooled_projection_dim=pooled_projection_dim)
        self.context_embedder = nn.Linear(joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList([
            MultimodalDiffusionBlock(dim, num_attention_heads, attention_head_dim, context_pre_only=i == num_layers - 1,
                                     mlp_ratio=mlp_ratio, spatial_scale=spatial_scale, qk_norm=qk_norm,
                                     attention_backend=attention_backend)
            for i in range(num_layers)
        ])
        self.norm_out = AdaLayerNormContinuous(dim, dim, elementwise_affine=False, eps=1e-6)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        # Many-for-Many condition adapter (condition_adapter.py): built last, so that turning it on
        # leaves the init of every other parameter (same seed) as it was; zero output at init.
        self.condition_adapter = None
        if condition_channels > 0:
            self.condition_adapter = ConditionAdapter(condition_channels, dim, patch_size,
                                                      condition_vae_spatial_factor, condition_vae_temporal_factor,
                                                      condition_hidden_channels)
        # RepVideo layer aggregation (repvideo.py): after everything else, for the same reason; with
        # the default learned gate of 0 the model is the one without it at init.
        self.layer_aggregation = None
        if repvideo_settings is not None:
            self.layer_aggregation = LayerAggregation(num_layers, repvideo_settings)
        self.gradient_checkpointing = False

    def unused_parameter_names(self) -> list[str]:
        """Parameters the network carries for checkpoint compatibility but never uses: in the
        context-pre-only block the text query projection and the text temporal output."""
        last = f"transformer_blocks.{len(self.transformer_blocks) - 1}.attn"
        return [f"{last}.{m}.{p}" for m in ("add_q_proj", "to_add_out_temporal") for p in ("weight", "bias")]

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                pooled_projections: torch.Tensor, timestep: torch.Tensor,
                encoder_attention_mask: Optional[torch.Tensor] = None, return_dict: bool = True,
                condition: Optional[torch.Tensor] = None):
        """hidden_states B×C×F×H×W, encoder_hidden_states B×L×Dt, encoder_attention_mask B×L (bool or
        0/1; None = all tokens valid), pooled_projections B×P, timestep B → prediction B×C×F×H×W.

        ``condition`` B×Cc×F_pix×H_pix×W_pix (pixel space: condition RGB with unknown pixels zeroed,
        the known-pixel mask, optionally depth) goes through the condition adapter and is added to
        the patch embeddings; ignored (None) means exactly the model without the adapter."""
        B, C, Fr, H, W = hidden_states.shape
        p = self.config.patch_size
        gh, gw = self.pos_embed.grid(H, W)

        frames = hidden_states.transpose(1, 2).reshape(B * Fr, C, H, W)
        x = self.pos_embed(frames)  # N×S×D, N = B·F
        if condition is not None:
            if self.condition_adapter is None:
                raise ValueError("a condition was given but the model has no condition adapter; set "
                                 "model.condition_channels (4, or 5 with depth) to train one")
            # Under sequence parallelism both outputs are sliced to the local tokens by hooks.
            x = x + self.condition_adapter(condition, (Fr, gh, gw)).to(x.dtype)
        if self.config.frame_pos_embed == "sincos":
            table = frame_sincos_table(Fr, self.inner_dim, self.config.rope_scaling_factor, device=x.device)
            x = (x.unflatten(0, (B, Fr)) + table[:, None, :].to(x.dtype)).flatten(0, 1)
        if timestep.ndim == 0:
            timestep = timestep.expand(B)
        temb = self.time_text_embed(timestep, pooled_projections)  # B×D
        ctx = self.context_embedder(encoder_hidden_states).repeat_interleave(Fr, dim=0)  # N×L×D

        text_mask = None
        if encoder_attention_mask is not None:
            text_mask = encoder_attention_mask.to(torch.bool)
            if not bool(text_mask.any(dim=1).all()):
                empty = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
                raise ValueError(f"encoder_attention_mask rows {empty} mask out every text token, which leaves "
                                 f"cross-attention without keys; keep at least one token (e.g. end-of-text) valid")
            if bool(text_mask.all()):
                text_mask = None  # lets fused kernels run unmasked
        rope = rope_cos_sin(Fr, self.config.attention_head_dim, self.config.rope_theta,
                            self.config.rope_scaling_factor, device=x.device)

        aggregation = self.layer_aggregation
        window: Optional[WindowSum] = None  # RepVideo: the running sum of the window's block outputs
        for i, block in enumerate(self.transformer_blocks):
            if aggregation is not None:
                x, ctx = aggregation.mix(i, x, ctx, window)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, ctx = self._gradient_checkpointing_func(block, x, ctx, temb, Fr, rope, text_mask)
            else:
                x, ctx = block(x, ctx, temb, Fr, rope, text_mask)
            if aggregation is not None:
                window = aggregation.accumulate(i, x, ctx, window)

        x = self.norm_out(x, temb.repeat_interleave(Fr, dim=0))
        x = self.proj_out(x)  # N×S×(p·p·C)
        x = x.reshape(B, Fr, gh, gw, p, p, self.out_channels)
        out = torch.einsum("bfhwpqc->bcfhpwq", x).reshape(B, self.out_channels, Fr, gh * p, gw * p)
        if self.config.prediction == "sample":  # x0 → velocity of x_t = (1 − t)·x0 + t·ε: (x_t − x0) / t
            t = (timestep.float() / 1000.0).clamp(min=self.config.prediction_t_min).view(B, 1, 1, 1, 1)
            out = ((hidden_states.float() - out.float()) / t).to(out.dtype)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
