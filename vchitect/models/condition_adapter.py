"""Condition adapter (Many-for-Many multi-task conditioning): pixel-space condition → patch tokens.

Many-for-Many (Yang, Li et al. 2025) trains one video DiT for many tasks (image-to-video, inpainting,
outpainting, super-resolution, colourisation, …) by turning every task's condition into the same
pixel-space tensor and feeding it through one lightweight conv network whose output is added to the
patch embeddings. Our network follows that idea with its own layout:

    condition B×Cc×F×H×W  (Cc = 4: condition RGB in [-1, 1] with unknown pixels zeroed, then the
                           0/1 mask of known pixels; Cc = 5 adds a depth channel)
    → temporal fold      B·F_lat×(tf·Cc)×H×W   latent frame k gets pixel frames 1+(k−1)·tf … k·tf,
                                              latent frame 0 gets pixel frame 0 repeated tf times
                                              (how a causal video VAE treats the first frame);
                                              F_lat = 1 + (F − 1)/tf, tf = 1 for a per-frame VAE
    → conv_in 3×3, SiLU, then one stride-2 3×3 conv (+ SiLU, + a 3×3 conv, SiLU) per factor 2 of
      r = vae_spatial_factor · patch_size, and a kernel = stride conv for what is left of r when it
      is not a power of two
    → conv_out 1×1 to the model width D, **zero-initialised** (weights and bias)
    → N×S×D tokens, N = B·F_lat, S = (H/r)·(W/r), in the patch embedding's row-major token order.

Zero-initialising the output layer is our choice, not Many-for-Many's (its adapter starts from a
random init and trains with the whole model from scratch): a pretrained text-to-video model is then
exactly unchanged when the adapter is added, and learns to use the condition during fine-tuning.

This file never imports torch.distributed; under sequence parallelism
:func:`vchitect.parallel.ulysses.apply_ulysses` slices the adapter's output to the local tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def latent_frames(num_frames: int, temporal_factor: int) -> int:
    """Frames of the latent video a ``num_frames``-frame pixel video becomes: 1 + (F − 1)/tf."""
    if temporal_factor == 1:
        return num_frames
    if (num_frames - 1) % temporal_factor:
        raise ValueError(f"a {num_frames}-frame condition does not fit model.condition_vae_temporal_factor="
                         f"{temporal_factor}: the frame count must be 1 + a multiple of {temporal_factor}")
    return 1 + (num_frames - 1) // temporal_factor


def spatial_stages(factor: int) -> tuple[int, int]:
    """(number of stride-2 stages, remaining factor) of a total spatial downsampling ``factor``."""
    halvings = 0
    while factor % 2 == 0 and factor > 1:
        factor //= 2
        halvings += 1
    return halvings, factor


class ConditionAdapter(nn.Module):
    """Pixel-space condition B×Cc×F×H×W → N×S×D tokens added to the patch embeddings (module doc)."""

    def __init__(self, condition_channels: int, dim: int, patch_size: int, vae_spatial_factor: int,
                 vae_temporal_factor: int, hidden_channels: int = 64):
        super().__init__()
        if condition_channels < 1 or vae_spatial_factor < 1 or vae_temporal_factor < 1 or hidden_channels < 1:
            raise ValueError(f"condition adapter: condition_channels={condition_channels}, vae_spatial_factor="
                             f"{vae_spatial_factor}, vae_temporal_factor={vae_temporal_factor} and hidden_channels="
                             f"{hidden_channels} must all be ≥ 1")
        self.condition_channels = condition_channels
        self.temporal_factor = vae_temporal_factor
        self.factor = vae_spatial_factor * patch_size
        halvings, rest = spatial_stages(self.factor)
        width = hidden_channels
        self.conv_in = nn.Conv2d(condition_channels * vae_temporal_factor, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        for i in range(halvings):
            out = hidden_channels * min(2 ** (i + 1), 4)  # widths grow ×2 per stage, up to 4× hidden
            self.blocks.append(nn.Conv2d(width, out, 3, stride=2, padding=1))
            self.blocks.append(nn.Conv2d(out, out, 3, padding=1))
            width = out
        if rest > 1:
            self.blocks.append(nn.Conv2d(width, width, rest, stride=rest))
        self.conv_out = nn.Conv2d(width, dim, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def fold_frames(self, condition: torch.Tensor) -> torch.Tensor:
        """B×Cc×F×H×W → (B·F_lat)×(tf·Cc)×H×W (module doc: the first frame repeated tf times)."""
        B, C, Fr, H, W = condition.shape
        tf = self.temporal_factor
        Fl = latent_frames(Fr, tf)
        if tf > 1:
            first = condition[:, :, :1].expand(B, C, tf, H, W)
            condition = torch.cat([first, condition[:, :, 1:]], dim=2)  # B×C×(Fl·tf)×H×W
        x = condition.reshape(B, C, Fl, tf, H, W).permute(0, 2, 3, 1, 4, 5)  # B×Fl×tf×C×H×W
        return x.reshape(B * Fl, tf * C, H, W)

    def forward(self, condition: torch.Tensor, latent_shape: tuple[int, int, int]) -> torch.Tensor:
        """condition B×Cc×F×H×W (pixels), latent_shape (F_lat, gh, gw) of the patch grid → N×S×D."""
        B, C, Fr, H, W = condition.shape
        Fl, gh, gw = latent_shape
        if C != self.condition_channels:
            raise ValueError(f"the condition has {C} channels but model.condition_channels={self.condition_channels} "
                             f"(4: condition RGB + mask; 5: with depth)")
        expected = (latent_frames(Fr, self.temporal_factor), H // self.factor, W // self.factor)
        if H % self.factor or W % self.factor or expected != (Fl, gh, gw):
            raise ValueError(f"a {Fr}×{H}×{W} condition maps to a {expected[0]}×{H / self.factor:g}×"
                             f"{W / self.factor:g} patch grid (vae factors {self.temporal_factor} in time, "
                             f"{self.factor} in space with the patch), but the latents are a {Fl}×{gh}×{gw} grid; "
                             f"give the condition at the pixel size of the sample, or fix "
                             f"model.condition_vae_spatial_factor / condition_vae_temporal_factor")
        x = self.fold_frames(condition.to(self.conv_in.weight.dtype))
        x = F.silu(self.conv_in(x))
        for conv in self.blocks:
            x = F.silu(conv(x))
        x = self.conv_out(x)  # N×D×gh×gw
        return x.flatten(2).transpose(1, 2)  # N×S×D
