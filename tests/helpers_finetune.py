"""Stand-ins for the released Vchitect-2.0 artefacts, shrunk: a transformer saved in the released
format (``VchitectXLTransformerModel`` config.json + safetensors) and an SD3-style image VAE
(16 → a few latent channels, SD3's shift and scaling factors), for the fine-tune recipe test."""

from __future__ import annotations

import json
import os

# SD3's VAE (stabilityai/stable-diffusion-3-medium-diffusers, vae/config.json): latents are
# (z − shift) · scaling with these two values.
SD3_VAE_SCALING, SD3_VAE_SHIFT = 1.5305, 0.0609


def save_released_transformer(folder: str, seed: int = 0, **config) -> str:
    """A randomised VchitectTransformer3DModel written the way the released checkpoint is: a
    ``config.json`` naming ``VchitectXLTransformerModel`` (with the released-only keys tp_size and
    caption_projection_dim) beside ``diffusion_pytorch_model.safetensors``. Returns the folder."""
    import torch
    from safetensors.torch import save_file

    from vchitect.models import VchitectTransformer3DModel

    torch.manual_seed(seed)
    model = VchitectTransformer3DModel(**config)
    # Random outputs layers too: the model's zero-initialised temporal / cross outputs would make a
    # "released" checkpoint that never used them, hiding a loader that drops those keys.
    for name, p in model.named_parameters():
        if not p.any():
            p.data.normal_(0, 0.02)
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    c = dict(model.config)
    released = {"_class_name": "VchitectXLTransformerModel", "tp_size": 1,
                "caption_projection_dim": c["num_attention_heads"] * c["attention_head_dim"],
                **{k: c[k] for k in ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers",
                                     "attention_head_dim", "num_attention_heads", "joint_attention_dim",
                                     "pooled_projection_dim", "pos_embed_max_size")}}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(released, f, indent=1)
    return folder


def save_tiny_sd3_vae(folder: str, latent_channels: int = 4, seed: int = 0) -> str:
    """A tiny ``AutoencoderKL`` with SD3's latent shift and scaling (2× spatial downsampling)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                  latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
                  scaling_factor=SD3_VAE_SCALING, shift_factor=SD3_VAE_SHIFT,
                  use_quant_conv=False, use_post_quant_conv=False).save_pretrained(folder)
    return folder
