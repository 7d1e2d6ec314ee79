"""Periodic validation: sample the configured prompts with the Euler flow sampler and CFG, and
write the videos (GIF files under output_dir/samples/, a frame strip to TensorBoard).

Every rank runs the sampler (sharded models need all ranks in each forward); rank 0 writes.
Pixel-space models (no VAE) produce frames directly; latent models are decoded with the VAE.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample

log = logging.getLogger("vchitect.train")


@torch.no_grad()
def run_validation(trainer, condition=None) -> None:
    """``condition``: an optional pixel-space condition (n×Cc×F_pix×H_pix×W_pix, one per prompt) for a
    model with a condition adapter, given at every step (sampling.sample)."""
    vc = trainer.cfg.train.validation
    if not vc.prompts:
        return
    if trainer.text_encoder is None:
        if not getattr(trainer, "_warned_validation", False):
            log.warning("train.validation.prompts are set but no text encoder is configured "
                        "(data.encoders.text_encoder_path): validation sampling is skipped")
            trainer._warned_validation = True
        return
    model, device = trainer.model, trainer.device
    text, mask, pooled = trainer.text_encoder.encode(list(vc.prompts))
    cond = TextCondition(text.float().to(device), pooled.float().to(device), mask.to(device))
    n = len(vc.prompts)
    null = trainer.null_text
    uncond = TextCondition(null.text[None].expand(n, -1, -1).to(device), null.pooled[None].expand(n, -1).to(device),
                           null.mask[None].expand(n, -1).to(device)).padded(cond.hidden.shape[1])
    g = torch.Generator().manual_seed(vc.seed)
    c = trainer.cfg.model.in_channels
    noise = torch.randn(n, c, vc.frames, vc.height, vc.width, generator=g).to(device)
    model.eval()
    try:
        x0 = sample(model, noise, cond, uncond, sigmas=flow_sigmas(vc.steps, trainer.cfg.diffusion.shift),
                    guidance_scale=vc.guidance_scale,
                    condition=None if condition is None else condition.to(device))
    finally:
        model.train()
    if trainer.rank != 0:
        return
    if trainer.vae is not None and hasattr(trainer.vae, "decode"):
        x0 = trainer.vae.decode(x0)
    elif c != 3:
        log.warning("validation: cannot decode %d-channel latents without a VAE decoder; skipped", c)
        return
    videos = ((x0.float().clamp(-1, 1) + 1) / 2).cpu()  # n×3×F×H×W in [0, 1]
    from vchitect.export.cli import write_video

    out = trainer.out / "samples" / f"step-{trainer.step:09d}"
    for i, prompt in enumerate(vc.prompts):
        frames = videos[i].permute(1, 2, 3, 0).numpy()  # F×H×W×3
        write_video(frames, out / f"{i:02d}.gif")
        strip = np.concatenate(list(frames), axis=1)  # H×(F·W)×3
        if trainer.writer.tb is not None:
            trainer.writer.tb.add_image(f"validation/{i:02d}", strip, trainer.step, dataformats="HWC")
    (out / "prompts.txt").write_text("\n".join(vc.prompts) + "\n")
