"""FreeInit: the low-pass filters keep low frequencies and remove high ones; the re-initialisation loop."""

from __future__ import annotations

import math

import pytest
import torch

from vchitect.diffusion.freeinit import (FILTERS, FreeInitConfig, freeinit_sample, low_pass_filter, mix_frequencies,
                                         renoise)

F, H, W = 16, 32, 32


def wave(ft: float, fh: float, fw: float) -> torch.Tensor:
    """A 1×1×F×H×W cosine with the given frequencies in cycles per sample."""
    t, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.cos(2 * math.pi * (ft * t + fh * h + fw * w)).double()[None, None]


def apply(x: torch.Tensor, lpf: torch.Tensor) -> torch.Tensor:
    return mix_frequencies(x, torch.zeros_like(x), lpf)


@pytest.mark.parametrize("kind", FILTERS)
def test_low_pass_keeps_low_and_removes_high_frequencies(kind):
    lpf = low_pass_filter(F, H, W, FreeInitConfig(filter=kind))
    low = wave(1 / F, 1 / H, 0)  # half the temporal and a quarter of the spatial cut-off
    high = wave(0.5, 0.5, 0.5)  # Nyquist on every axis
    kept = apply(low, lpf)
    gain = (kept * low).sum() / (low * low).sum()  # the wave's amplitude after filtering
    assert 0.85 < gain <= 1.0 + 1e-9 and (kept - gain * low).norm() < 1e-6 * low.norm()
    assert apply(high, lpf).norm() / high.norm() < 1e-2
    spatial_only = wave(0.0, 0.5, 0.0)  # high spatial, constant in time
    assert apply(spatial_only, lpf).norm() / spatial_only.norm() < 1e-2
    temporal_only = wave(0.5, 0.0, 0.0)  # flicker: high temporal frequency
    assert apply(temporal_only, lpf).norm() / temporal_only.norm() < 1e-2


def test_filters_differ_in_shape_and_respect_their_cutoff():
    base = dict(spatial_cutoff=0.25, temporal_cutoff=0.5)
    ideal = low_pass_filter(F, H, W, FreeInitConfig(filter="ideal", **base))
    gauss = low_pass_filter(F, H, W, FreeInitConfig(filter="gaussian", **base))
    butter = low_pass_filter(F, H, W, FreeInitConfig(filter="butterworth", order=4, **base))
    # at the spatial cut-off (normalised frequency 0.25 = 4 cycles over 32 samples along h)
    assert ideal[0, 4, 0] == 1 and ideal[0, 5, 0] == 0
    assert abs(butter[0, 4, 0] - 0.5) < 1e-6 and abs(gauss[0, 4, 0] - math.exp(-0.5)) < 1e-6
    assert ideal[0, 0, 0] == gauss[0, 0, 0] == butter[0, 0, 0] == 1
    wider = low_pass_filter(F, H, W, FreeInitConfig(filter="gaussian", spatial_cutoff=0.5))
    assert wider[0, 8, 0] > gauss[0, 8, 0]
    with pytest.raises(ValueError, match="choose one of"):
        FreeInitConfig(filter="box")


def test_mix_takes_low_from_one_and_high_from_the_other():
    lpf = low_pass_filter(F, H, W, FreeInitConfig(filter="ideal"))
    low, high = wave(1 / F, 1 / H, 0), wave(0.5, 0.5, 0.5)
    mixed = mix_frequencies(low + high, 3 * low + 2 * high, lpf)
    assert torch.allclose(mixed, low + 2 * high, atol=1e-9)


def test_renoise_level_keeps_signal_and_unit_variance():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 32, 32, generator=g), torch.randn(4, 4, 8, 32, 32, generator=g)
    z = renoise(x0, eps, 0.936)
    assert abs(z.std().item() - 1.0) < 0.01
    corr = torch.corrcoef(torch.stack([z.flatten(), x0.flatten()]))[0, 1].item()
    assert 0.05 < corr < 0.09  # sqrt(ᾱ) ≈ 0.068 signal, as at DDPM's last step
    assert torch.equal(renoise(x0, eps, 1.0), eps)  # t = 1 keeps nothing: why FreeInit uses t_r < 1


def test_freeinit_reinitialises_from_the_previous_result():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 2, F, H, W, generator=g)
    starts = []
    target = wave(1 / F, 1 / H, 1 / W).float().expand(1, 2, F, H, W) * 3

    def run(z):
        starts.append(z.clone())
        return target.clone()

    cfg = FreeInitConfig(reinits=2, filter="ideal", noise_level=0.5)  # ideal: bands do not overlap
    out = freeinit_sample(run, noise, cfg, torch.Generator().manual_seed(1))
    assert len(starts) == 3 and torch.equal(starts[0], noise) and torch.equal(out, target)
    lpf = low_pass_filter(F, H, W, cfg)
    expected_low = apply(renoise(target, noise, 0.5).double(), lpf.double())
    got_low = apply(starts[1].double(), lpf.double())
    assert torch.allclose(got_low, expected_low, atol=1e-4)  # low band: the re-noised result
    hp = (1 - lpf).double()
    high_new = mix_frequencies(torch.zeros_like(starts[1]).double(), starts[1].double(), lpf.double())
    high_old = mix_frequencies(torch.zeros_like(noise).double(), noise.double(), lpf.double())
    assert (high_new - high_old).norm() > 0.5 * high_old.norm()  # high band: fresh noise
    assert hp.sum() > 0
