"""FreeInit: re-initialise the starting noise from a finished sample's low frequencies.

A first sampling pass turns noise z into a video x0. The video is noised again, its low
spatio-temporal frequencies are kept, the high ones are drawn fresh, and sampling starts over
from that mix. Training-time noisy latents always carry some low-frequency signal that pure
Gaussian noise lacks; this closes that gap and makes the layout and motion more coherent.

Re-noising level under rectified flow. The flow's x_1 = ε holds no signal at all, so noising x0
"to the start" would erase what we want to keep. We noise to ``noise_level`` t_r < 1 instead,

    z' = ((1 − t_r)·x0 + t_r·ε) / sqrt((1 − t_r)² + t_r²),

and divide by the standard deviation the mix would have for unit-variance x0, so z' has the unit
variance the sampler expects at t = 1. The default t_r = 0.936 has the signal-to-noise ratio
(1 − t_r)/t_r = 0.068 of the last step of the 1000-step scaled-linear DDPM schedule
(sqrt(ᾱ_999) ≈ 0.068) at which FreeInit was designed; with that t_r, z' equals that DDPM z_T.
ε is the first pass's noise, as in FreeInit; the high frequencies come from fresh noise.

Filters act on the 3-D FFT over (frames, height, width) of B×C×F×H×W tensors. Frequencies are
normalised to [-1, 1) (1 = Nyquist) and scaled by the cut-offs, d² = (f_t/c_t)² + (f_h/c_s)² + (f_w/c_s)²:
ideal ``d ≤ 1``; Gaussian ``exp(−d²/2)``; Butterworth ``1 / (1 + d^(2n))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

FILTERS = ("butterworth", "gaussian", "ideal")


@dataclass
class FreeInitConfig:
    reinits: int = 2  # re-initialisations: the sampler runs reinits + 1 times
    filter: str = "butterworth"
    spatial_cutoff: float = 0.25  # c_s: normalised spatial stop frequency (1 = Nyquist)
    temporal_cutoff: float = 0.25  # c_t: normalised temporal stop frequency
    order: int = 4  # Butterworth order n
    noise_level: float = 0.936  # t_r, see the module docstring

    def __post_init__(self):
        if self.filter not in FILTERS:
            raise ValueError(f"FreeInit filter {self.filter!r}: choose one of {', '.join(FILTERS)}")
        if self.reinits < 0:
            raise ValueError(f"FreeInit reinits={self.reinits}: must be >= 0")
        if not (0 < self.spatial_cutoff and 0 < self.temporal_cutoff):
            raise ValueError("FreeInit cut-offs must be > 0 (1 = Nyquist)")
        if not 0.0 < self.noise_level <= 1.0:
            raise ValueError(f"FreeInit noise_level={self.noise_level}: must be in (0, 1]")


def _freq(n: int) -> torch.Tensor:
    return torch.fft.fftfreq(n, dtype=torch.float64) * 2.0  # [-1, 1), 1 = Nyquist


def low_pass_filter(frames: int, height: int, width: int, cfg: FreeInitConfig) -> torch.Tensor:
    """F×H×W frequency response (unshifted FFT layout, float32) of ``cfg.filter``."""
    ft, fh, fw = torch.meshgrid(_freq(frames), _freq(height), _freq(width), indexing="ij")
    d2 = (ft / cfg.temporal_cutoff) ** 2 + (fh / cfg.spatial_cutoff) ** 2 + (fw / cfg.spatial_cutoff) ** 2
    if cfg.filter == "ideal":
        h = (d2 <= 1.0).double()
    elif cfg.filter == "gaussian":
        h = torch.exp(-d2 / 2)
    else:
        h = 1.0 / (1.0 + d2 ** cfg.order)
    return h.float()


def mix_frequencies(low_src: torch.Tensor, high_src: torch.Tensor, lpf: torch.Tensor) -> torch.Tensor:
    """Low frequencies of ``low_src`` + high frequencies of ``high_src`` (both B×C×F×H×W)."""
    dims = (-3, -2, -1)
    lo = torch.fft.fftn(low_src.double(), dim=dims)
    hi = torch.fft.fftn(high_src.double(), dim=dims)
    h = lpf.to(lo.device, torch.float64)
    return torch.fft.ifftn(lo * h + hi * (1 - h), dim=dims).real.to(low_src.dtype)


def renoise(x0: torch.Tensor, noise: torch.Tensor, level: float) -> torch.Tensor:
    """Rectified-flow noising to t_r = ``level``, rescaled to unit variance (see module docstring)."""
    return ((1 - level) * x0 + level * noise) / math.sqrt((1 - level) ** 2 + level ** 2)


def freeinit_sample(run: Callable[[torch.Tensor], torch.Tensor], noise: torch.Tensor, cfg: FreeInitConfig,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Run ``run(z) -> x0`` ``cfg.reinits + 1`` times, re-initialising z between passes."""
    lpf = low_pass_filter(*noise.shape[-3:], cfg)
    z = noise
    for it in range(cfg.reinits + 1):
        x0 = run(z)
        if it == cfg.reinits:
            return x0
        device = generator.device if generator is not None else "cpu"
        fresh = torch.randn(noise.shape, generator=generator, device=device, dtype=torch.float32).to(noise.device)
        z = mix_frequencies(renoise(x0, noise, cfg.noise_level), fresh, lpf).to(noise.dtype)
    return x0


__all__ = ["FILTERS", "FreeInitConfig", "freeinit_sample", "low_pass_filter", "mix_frequencies", "renoise"]
