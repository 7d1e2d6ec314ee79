"""``DiffusionConfig``: the ``diffusion:`` section of a run's config (attached as ``Config.diffusion``),
used by :mod:`vchitect.diffusion.objective`; kept apart from it so reading a config imports no torch."""

from __future__ import annotations

from dataclasses import dataclass

from vchitect.config_base import setting


@dataclass
class DiffusionConfig:
    """The ``diffusion:`` section: how noise levels are drawn and the loss is weighted."""

    timestep_sampling: str = setting("logit_normal", choices=["logit_normal", "uniform"],
                                     help="distribution of t before the shift")
    logit_mean: float = setting(0.0, help="mean of the logit-normal (positive = more noise)")
    logit_std: float = setting(1.0, min=1e-6, help="std of the logit-normal")
    shift: float = setting(1.0, min=1e-6, help="timestep shift s (1 = none); with shift_reference_tokens the "
                           "shift at that token count. Exported to the sampler's scheduler")
    shift_reference_tokens: int = setting(0, min=0, help="0: fixed shift; >0: s = shift·sqrt(tokens / this), "
                                          "tokens = video tokens per sample (SD3-style resolution shift)")
    loss_weighting: str = setting("none", choices=["none", "cosmap"],
                                  help="per-sample loss weight: none, or SD3's cosmap 2/(π(1−2t+2t²))")
    text_dropout: float = setting(0.1, min=0.0, max=1.0, help="probability of training a sample on the "
                                  "empty-prompt embedding (classifier-free guidance)")
