"""Pixel-space training: with no VAE, 3 latent channels and no downsampling, decode-mode pixels in
[-1, 1] are the model input."""

import pytest
import torch

from vchitect.data.config import DataConfig
from vchitect.data.encode import PixelSpace, encode_batch, is_pixel_space, load_encoders


def _cfg(**kw):
    base = dict(source="synthetic", latent_channels=3, vae_spatial_factor=1, vae_temporal_factor=1)
    base.update(kw)
    return DataConfig(**base)


def test_pixel_space_is_recognised_only_without_vae_and_downsampling():
    assert is_pixel_space(_cfg())
    assert not is_pixel_space(_cfg(latent_channels=16))
    assert not is_pixel_space(_cfg(vae_spatial_factor=8))
    vae, text = load_encoders(_cfg())
    assert isinstance(vae, PixelSpace) and text is None
    vae, _ = load_encoders(_cfg(latent_channels=16))
    assert vae is None


def test_pixels_become_latents_in_unit_range():
    pixels = torch.tensor([0, 255, 127], dtype=torch.uint8).view(1, 3, 1, 1, 1).expand(2, 3, 2, 4, 4)
    batch = {"pixels": pixels, "text": torch.zeros(2, 4, 8), "text_mask": torch.ones(2, 4, dtype=torch.bool),
             "pooled": torch.zeros(2, 8)}
    out = encode_batch(batch, PixelSpace(), None)
    assert "pixels" not in out and out["latents"].shape == (2, 3, 2, 4, 4)
    assert out["latents"][0, :, 0, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 127 / 127.5 - 1])
    with pytest.raises(ValueError, match="pixel space"):
        encode_batch(batch, None, None)
