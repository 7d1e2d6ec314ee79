"""``VchitectPipeline``: text-to-video with a Vchitect transformer, in the diffusers format.

Components: ``transformer`` (VchitectTransformer3DModel), ``scheduler``
(FlowMatchEulerDiscreteScheduler carrying the training shift), optional ``vae`` (absent for
pixel-space models such as the CPU demo: decode is the identity), ``text_encoder`` + ``tokenizer``
and optionally ``text_encoder_2`` + ``tokenizer_2`` (a CLIP whose ``text_embeds`` are the pooled
vector, SD3-style), encoded the way :mod:`vchitect.models.encoders` encodes them in training. Text
encoder kind ``sd3`` (the released Vchitect-2.0 conditioning): ``text_encoder`` / ``text_encoder_2`` /
``text_encoder_3`` are CLIP-L / CLIP-G / T5 with ``tokenizer`` / ``tokenizer_2`` / ``tokenizer_3``
(diffusers' SD3 names), and the config's ``text_masks`` is the mask mode (``data.text.masks``).

Many-for-Many tasks (a transformer with the condition adapter, ``condition_channels=4``): ``task=`` names
one (``vchitect.data.tasks.TASKS``), ``image`` / ``video`` / ``mask`` / ``depth`` are its inputs
(:mod:`vchitect.export.task_inputs` builds the condition with the training builders), the prompt gets
the training caption's ``#task:`` suffix, and ``paste_known`` puts the given pixels back into the output
where the task says they are the answer (docs/sampling.md, "Tasks (Many-for-Many)").

Loading an export folder (docs/export.md, "Loading it")::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("exported/")              # vchitect installed: this class
    pipe = DiffusionPipeline.from_pretrained("exported/", trust_remote_code=True)   # anywhere: the folder's copy

The folder's copy is this module and the modules it imports, generated at export time
(:mod:`vchitect.export.remote_code`); so this file imports only torch, diffusers, numpy and other
vchitect modules that do the same, and registers nothing on import (:mod:`vchitect.export` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from vchitect.data.pixels import condition_to_unit
from vchitect.diffusion.fastercache import FasterCacheConfig
from vchitect.diffusion.freeinit import FreeInitConfig, freeinit_sample
from vchitect.diffusion.sampling import TextCondition, guidance_scales, sample
from vchitect.models import VchitectTransformer3DModel
from vchitect.models.encoders import SD3TextEncoder, TextEncoder

from .task_inputs import (check_frames, check_inputs, default_frames, paste_given, resolve_task, task_conditions,
                          task_prompts)

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
TIMESTEP_SPACINGS = ("uniform", "released")


@dataclass
class VchitectPipelineOutput(BaseOutput):
    """``frames``: np B×F×H×W×3 / pt B×F×3×H×W in [0, 1], a list of lists of PIL images, or latents."""

    frames: Union[np.ndarray, torch.Tensor, list]


class VchitectPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3",
                            "tokenizer_3"]

    def __init__(self, transformer: VchitectTransformer3DModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                 text_encoder_kind: str = "t5", max_sequence_length: int = 77, shift_reference_tokens: int = 0,
                 text_encoder_3=None, tokenizer_3=None, text_masks: str = "masked"):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                              text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
        self.register_to_config(text_encoder_kind=text_encoder_kind, max_sequence_length=max_sequence_length,
                                shift_reference_tokens=shift_reference_tokens, text_masks=text_masks)

    # ------------------------------------------------------------------ shapes
    @property
    def vae_spatial_factor(self) -> int:
        if self.vae is None:
            return 1
        ratio = getattr(self.vae, "spatial_compression_ratio", None)
        if isinstance(ratio, int):
            return ratio
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def vae_temporal_factor(self) -> int:
        if self.vae is None:
            return 1
        ratio = getattr(self.vae, "temporal_compression_ratio", None)
        return ratio if isinstance(ratio, int) else 1

    @property
    def _video_vae(self) -> bool:
        return self.vae is not None and type(self.vae).__name__ not in ("AutoencoderKL", "AsymmetricAutoencoderKL",
                                                                        "AutoencoderTiny")

    def latent_shape(self, batch: int, num_frames: int, height: int, width: int) -> tuple[int, ...]:
        s, tf = self.vae_spatial_factor, self.vae_temporal_factor
        p = self.transformer.config.patch_size
        if height % (s * p) or width % (s * p):
            raise ValueError(f"height {height} and width {width} must be multiples of {s * p} "
                             f"(VAE factor {s} × patch size {p})")
        frames = (num_frames - 1) // tf + 1 if self._video_vae else num_frames
        return (batch, self.transformer.config.in_channels, frames, height // s, width // s)

    # ------------------------------------------------------------------ text
    def encode_prompt(self, prompts: list[str]) -> TextCondition:
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder/tokenizer; pass prompt_embeds (a TextCondition) "
                             "or export with --base DIR holding text_encoder/ and tokenizer/")
        if self.config.text_encoder_kind == "sd3":
            if self.text_encoder_2 is None or self.text_encoder_3 is None or self.tokenizer_3 is None:
                raise ValueError("this sd3 pipeline lacks text_encoder_2 / text_encoder_3 / tokenizer_3 (CLIP-G, T5); "
                                 "pass prompt_embeds, or export with --base DIR holding an SD3 pipeline's encoders")
            enc = SD3TextEncoder(self.text_encoder, self.tokenizer, self.text_encoder_2, self.tokenizer_2,
                                 self.text_encoder_3, self.tokenizer_3, self.config.max_sequence_length,
                                 self.config.get("text_masks", "masked"))
        else:
            enc = TextEncoder(self.text_encoder, self.tokenizer, self.config.text_encoder_kind,
                              self.config.max_sequence_length, self.text_encoder_2, self.tokenizer_2)
        hidden, mask, pooled = enc.encode(prompts)
        # A row without any valid token (an empty prompt with a tokenizer that adds no special
        # token) would leave the text attention without keys; keep its first token, as training does.
        empty = ~mask.any(1)
        if bool(empty.any()):
            mask = mask.clone()
            mask[empty, 0] = True
        return TextCondition(hidden.float(), pooled.float(), mask)

    # ------------------------------------------------------------------ schedule
    def sigmas(self, num_inference_steps: int, tokens: int, device, timestep_spacing: str = "uniform") -> torch.Tensor:
        """Shifted noise levels 1 → 0 (num_inference_steps + 1) from the scheduler's config.

        ``uniform``: the shift of linspace(1, 0, N + 1). ``released``: what the scheduler's own
        ``set_timesteps(N)`` gives, as the released Vchitect-2.0 pipeline used it — the shift of
        linspace(1, σ_min, N) with σ_min the smallest training noise level (0.003 at shift 3), then 0.
        """
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r}: choose one of {', '.join(TIMESTEP_SPACINGS)}")
        kwargs = {}
        if self.scheduler.config.use_dynamic_shifting:
            ref = self.config.shift_reference_tokens or tokens
            kwargs["mu"] = math.log(self.scheduler.config.shift * math.sqrt(tokens / ref))
        if timestep_spacing == "released":
            self.scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        else:
            base = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]
            self.scheduler.set_timesteps(sigmas=base.tolist(), device=device, **kwargs)
        return self.scheduler.sigmas.to(torch.float32).cpu()

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """B×C×F×h×w latents → B×3×F×H×W pixels in [-1, 1] (identity without a VAE)."""
        if self.vae is None:
            if latents.shape[1] != 3:
                raise ValueError(f"this pipeline has no VAE and the model makes {latents.shape[1]}-channel latents, "
                                 f"not RGB; use output_type='latent', or export with --base DIR holding a vae/")
            return latents
        cfg = self.vae.config
        z = latents.float()
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            z = z * torch.tensor(std, device=z.device).view(1, -1, 1, 1, 1) + \
                torch.tensor(mean, device=z.device).view(1, -1, 1, 1, 1)
        else:
            z = z / float(cfg.get("scaling_factor", 1.0) or 1.0) + float(cfg.get("shift_factor", 0.0) or 0.0)
        z = z.to(self.vae.dtype)
        if self._video_vae:
            return self.vae.decode(z).sample.float()
        B, C, F, h, w = z.shape
        frames = z.permute(0, 2, 1, 3, 4).reshape(B * F, C, h, w)
        out = torch.cat([self.vae.decode(c).sample for c in frames.split(8)]).float()
        return out.reshape(B, F, *out.shape[1:]).permute(0, 2, 1, 3, 4)

    @staticmethod
    def to_output(video: torch.Tensor, output_type: str, known: Optional[tuple[np.ndarray, np.ndarray]] = None):
        """B×3×F×H×W in [-1, 1] → ``output_type``. ``known``: (uint8 B×3×F×H×W condition, uint8 B×1×F×H×W
        mask) whose known pixels replace the video's (:func:`~vchitect.export.task_inputs.paste_given`)."""
        frames = ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 1, 3, 4).cpu()  # B×F×3×H×W in [0, 1]
        if known is not None:
            frames = paste_given(frames, *known)
        if output_type == "pt":
            return frames
        arr = frames.permute(0, 1, 3, 4, 2).numpy()  # B×F×H×W×3
        if output_type == "np":
            return arr
        from PIL import Image

        return [[Image.fromarray((f * 255).round().astype(np.uint8)) for f in clip] for clip in arr]

    # ------------------------------------------------------------------ tasks
    def prepare_task(self, task: Optional[str], batch: int, num_frames: Optional[int] = None,
                     height: Optional[int] = None, width: Optional[int] = None, context_frames: Optional[int] = None,
                     **inputs):
        """(the :class:`~vchitect.data.tasks.Task` or None, num_frames, height, width, and the uint8
        (B×3×F×H×W condition, B×1×F×H×W mask) or None) of a call with ``task`` and its ``inputs`` (image=,
        video=, mask=, depth=), the defaults filled in; a ``ValueError`` says what is wrong with them. The
        condition is None without a task, and for t2v / t2i on a model without the condition adapter."""
        adapter = int(getattr(self.transformer.config, "condition_channels", 0) or 0)
        spec = resolve_task(task, adapter)
        check_inputs(spec, inputs, context_frames)
        num_frames = default_frames(spec, inputs) if num_frames is None else num_frames
        if spec is not None:
            check_frames(spec, num_frames)
        scale = self.vae_spatial_factor
        height = height or self.transformer.config.sample_size * scale
        width = width or self.transformer.config.sample_size * scale
        built = None
        if spec is not None and adapter:
            built = task_conditions(spec, batch, num_frames, height, width, context_frames=context_frames, **inputs)
        return spec, num_frames, height, width, built

    # ------------------------------------------------------------------ generate
    @torch.no_grad()
    def __call__(self, prompt: Union[str, list[str], None] = None, negative_prompt: Union[str, list[str], None] = None,
                 num_frames: Optional[int] = None, height: Optional[int] = None, width: Optional[int] = None,
                 num_inference_steps: int = 50, guidance_scale: float = 6.0,
                 generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
                 prompt_embeds: Optional[TextCondition] = None,
                 negative_prompt_embeds: Optional[TextCondition] = None, output_type: str = "np",
                 return_dict: bool = True, batch_cfg: bool = True,
                 fastercache: Union[FasterCacheConfig, dict, bool, None] = None,
                 freeinit: Union[FreeInitConfig, dict, bool, None] = None, callback=None,
                 guidance_schedule: str = "constant", timestep_spacing: str = "uniform", task: Optional[str] = None,
                 image=None, video=None, mask=None, depth=None, context_frames: Optional[int] = None,
                 paste_known: bool = True):
        """``num_frames``: default 16 (1 for an image task; the given clip's frames for vinp, voutp, vsr,
        vcolor, vedit and depth).

        ``task``: a Many-for-Many task of ``vchitect.data.tasks.TASKS`` (t2v, i2v, vexd, itrans, vtrans, vinp,
        voutp, vsr, vcolor, vedit, depth, t2i, iinp, ioutp, isr, icolor); every task but t2v / t2i needs the
        condition adapter. ``image`` / ``video`` / ``mask`` / ``depth``: the task's inputs, one for every prompt
        or a list with one per prompt (itrans: a (first, last) image pair; vtrans: a (head, tail) clip pair),
        resized to the output; ``context_frames``: vexd / vtrans use that many frames of the given clip(s).
        On a model with the adapter the prompts end in ``#task: <full name>`` as in training (the negative
        prompt does not: training's text dropout replaces the whole caption by the empty prompt).
        ``paste_known``: where the task's known pixels are the answer (i2v, itrans, vexd, vtrans, vinp, voutp,
        iinp, ioutp) they replace the decoded output's (not for ``output_type="latent"``); False returns the
        model's output as it is. docs/sampling.md, "Tasks (Many-for-Many)".

        ``fastercache`` / ``freeinit``: a :class:`FasterCacheConfig` / :class:`FreeInitConfig`, a dict of its
        fields, or True for its defaults (plain values work where the config classes are not importable,
        e.g. with the export folder's own code). ``guidance_schedule``: ``constant``, ``released`` or
        ``smooth`` (:func:`~vchitect.diffusion.sampling.guidance_scales`); ``timestep_spacing``:
        ``uniform`` or ``released`` (:meth:`sigmas`). The released Vchitect-2.0 settings: docs/sampling.md."""
        fastercache = _sampler_config(fastercache, FasterCacheConfig)
        freeinit = _sampler_config(freeinit, FreeInitConfig)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}: choose one of {', '.join(OUTPUT_TYPES)}")
        prompts = None
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("pass a prompt (or prompt_embeds)")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        B = prompt_embeds.batch if prompt_embeds is not None else len(prompts)
        # the task's condition before any encoding, so that bad inputs fail at once
        spec, num_frames, height, width, built = self.prepare_task(
            task, B, num_frames, height, width, context_frames, image=image, video=video, mask=mask, depth=depth)
        shape = self.latent_shape(B, num_frames, height, width)
        device = self._execution_device
        condition = known = None
        if built is not None:
            condition = condition_to_unit(*(torch.from_numpy(a) for a in built)).to(device)
            known = built if paste_known and spec.paste else None
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(task_prompts(prompts, spec, built is not None))
        if latents is None:
            gen_device = generator.device if generator is not None else "cpu"
            latents = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        latents = latents.to(device, torch.float32)
        p = self.transformer.config.patch_size
        tokens = shape[2] * (shape[3] // p) * (shape[4] // p)
        sigmas = self.sigmas(num_inference_steps, tokens, device, timestep_spacing)
        use_cfg = any(g != 1.0 for g in guidance_scales(guidance_schedule, guidance_scale, sigmas))
        if use_cfg and negative_prompt_embeds is None:
            neg = negative_prompt if negative_prompt is not None else ""
            negs = [neg] * B if isinstance(neg, str) else list(neg)
            if len(negs) != B:
                raise ValueError(f"{len(negs)} negative prompts for {B} prompts")
            negative_prompt_embeds = self.encode_prompt(negs)

        cond = _to(prompt_embeds, device)
        uncond = _to(negative_prompt_embeds, device) if use_cfg else None

        passes = freeinit.reinits + 1 if freeinit is not None else 1
        # diffusers' bar: one tick per denoising step of every pass; set_progress_bar_config(disable=True) hides it
        with self.progress_bar(total=passes * (len(sigmas) - 1)) as bar:
            def step_done(i: int, t: float, z: torch.Tensor) -> None:
                bar.update()
                if callback is not None:
                    callback(i, t, z)

            def run(z: torch.Tensor) -> torch.Tensor:
                return sample(self.transformer, z, cond, uncond, sigmas=sigmas, guidance_scale=guidance_scale,
                              guidance_schedule=guidance_schedule, batch_cfg=batch_cfg, fastercache=fastercache,
                              callback=step_done, condition=condition)

            x0 = freeinit_sample(run, latents, freeinit, generator) if freeinit is not None else run(latents)
        if output_type == "latent":
            frames = x0
        else:
            frames = self.to_output(self.decode_latents(x0), output_type, known)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames,)
        return VchitectPipelineOutput(frames=frames)


def _to(c: Optional[TextCondition], device) -> Optional[TextCondition]:
    if c is None:
        return None
    return TextCondition(c.hidden.to(device), c.pooled.to(device), None if c.mask is None else c.mask.to(device))


def _sampler_config(value, cls):
    """None / False → None; True → ``cls()``; a dict → ``cls(**value)``; anything else is used as it is."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, dict):
        return cls(**value)
    return value


__all__ = ["FasterCacheConfig", "FreeInitConfig", "TIMESTEP_SPACINGS", "TextCondition", "VchitectPipeline",
           "VchitectPipelineOutput"]
