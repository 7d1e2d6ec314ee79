"""Embeddings of the Vchitect-2.0 transformer: per-frame patches with SD3's cropped 2D sin-cos
table, and the 1D rotary embedding over the frame index used by the temporal branch."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_sincos_pos_embed_from_grid
from torch import nn


class PatchEmbed(nn.Module):
    """Conv patchify of every frame plus SD3's 2D sin-cos position embedding.

    The table covers ``pos_embed_max_size``² patches, built for ``base_size = sample_size //
    patch_size`` exactly as SD3 / Vchitect-2.0 do, and is centre-cropped to the frame's grid. It is
    a persistent buffer (``pos_embed.pos_embed``) because the released checkpoints carry it;
    :meth:`reset_buffers` recomputes it in place (meta-device init materialises it empty).
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int,
                 pos_embed_max_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.base_size = sample_size // patch_size
        table = torch.empty(1, pos_embed_max_size ** 2, embed_dim)
        self.register_buffer("pos_embed", table, persistent=True)  # 1×(M·M)×D
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """(Re)compute the sin-cos table in place."""
        fill_sincos_table(self.pos_embed, self.pos_embed_max_size, self.base_size)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of a H×W latent, with the errors users hit when a shape does not fit."""
        p, m = self.patch_size, self.pos_embed_max_size
        if height % p or width % p:
            raise ValueError(f"latent height and width must be divisible by patch_size={p}; got {height}×{width}")
        gh, gw = height // p, width // p
        if gh > m or gw > m:
            raise ValueError(
                f"a {height}×{width} latent is a {gh}×{gw} patch grid, larger than the "
                f"{m}×{m} position table; raise model.pos_embed_max_size (new rows are then "
                f"untrained for imported weights) or use a smaller resolution")
        return gh, gw

    def cropped_table(self, gh: int, gw: int) -> torch.Tensor:
        m = self.pos_embed_max_size
        top, left = (m - gh) // 2, (m - gw) // 2
        table = self.pos_embed.reshape(1, m, m, -1)[:, top:top + gh, left:left + gw, :]
        return table.reshape(1, gh * gw, -1)  # 1×S×D

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # frames: N×C×H×W (N = batch·frames) → N×S×D, S = (H/p)·(W/p)
        gh, gw = self.grid(*frames.shape[-2:])
        x = self.proj(frames).flatten(2).transpose(1, 2)
        return (x + self.cropped_table(gh, gw)).to(x.dtype)


def fill_sincos_table(out: torch.Tensor, grid_size: int, base_size: int) -> torch.Tensor:
    """Write SD3's 2D sin-cos table of a ``grid_size``² patch grid into ``out`` (1×(M·M)×D).

    Position (row r, column c) gets ``[e(x_c), e(x_r)]`` with ``x = arange(M) / (M / base_size)``
    and ``e`` diffusers' 1D sin-cos embedding of D/2 channels (float64, then cast), which is what
    ``get_2d_sincos_pos_embed`` computes — bitwise — but from the M distinct coordinates instead of
    all M² positions: no M²×D float64 temporaries (≈ 1.9 GB at the 8B width).
    """
    M, D = grid_size, out.shape[-1]
    coords = torch.arange(M, dtype=torch.float32, device=out.device) / (M / base_size)
    e = get_1d_sincos_pos_embed_from_grid(D // 2, coords, output_type="pt").float()  # M×D/2 (cast on write)
    table = out.view(M, M, D)  # rows × columns × channels
    table[:, :, : D // 2] = e[None, :, :]  # column coordinate
    table[:, :, D // 2:] = e[:, None, :]  # row coordinate
    return out


def frame_sincos_table(num_frames: int, dim: int, scaling_factor: float = 1.0, device=None) -> torch.Tensor:
    """F×dim fp32 table of absolute frame positions: diffusers' 1D sin-cos embedding (sin in the first
    half of the channels, cos in the second; the 1D form of the 2D patch table). Positions are divided
    by ``scaling_factor`` like the RoPE's, so a temporally extended model sees the trained range."""
    if dim % 2:
        raise ValueError(f"the frame position table needs an even width, got {dim}")
    pos = torch.arange(num_frames, device=device, dtype=torch.float32) / scaling_factor
    return get_1d_sincos_pos_embed_from_grid(dim, pos, output_type="pt").float()


def rope_cos_sin(num_positions: int, head_dim: int, theta: float, scaling_factor: float,
                 device=None, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (T×head_dim/2, fp32) of the 1D rotary embedding over frame positions.

    Frequencies are ``theta^(-2i/head_dim)`` and positions are divided by ``scaling_factor``, as in
    Vchitect-2.0 (theta = 1e6 there).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device)[: head_dim // 2].float() / head_dim))
    pos = torch.arange(offset, offset + num_positions, device=device, dtype=torch.float32) / scaling_factor
    angles = torch.outer(pos, freqs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs (2i, 2i+1) of ``x`` (…×T×H×d) by the angle of position T.

    Computed in fp32 and cast back, like the released model's complex-number form.
    """
    dtype = x.dtype
    xf = x.float().unflatten(-1, (-1, 2))  # …×T×H×d/2×2
    even, odd = xf[..., 0], xf[..., 1]
    c = cos[:, None, :]  # T×1×d/2, broadcast over heads
    s = sin[:, None, :]
    out = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return out.flatten(-2).to(dtype)
