"""uint8 pixels → the model's input range, shared by the training encode step
(:func:`vchitect.data.encode.encode_batch`) and the pipeline's task inputs
(:mod:`vchitect.export.task_inputs`), so both hand the condition adapter the same tensor.

Imports torch only: the export folder carries this module for ``trust_remote_code`` loading."""

from __future__ import annotations

import torch


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 → float in [-1, 1] (the VAE's input range)."""
    return pixels.float().div_(127.5).sub_(1.0)


def condition_to_unit(condition: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """uint8 B×3×F×H×W condition + uint8 B×1×F×H×W mask (1 = known) → float32 B×4×F×H×W: channels
    0–2 the condition in [-1, 1] with unknown pixels 0, channel 3 the mask (0/1)."""
    m = mask.float()
    return torch.cat([pixels_to_unit(condition).mul_(m), m], dim=1)


__all__ = ["condition_to_unit", "pixels_to_unit"]
