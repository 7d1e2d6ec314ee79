"""Rectified-flow sampling: the Euler integrator with classifier-free guidance.

    x_t = (1 − t)·x0 + t·ε,   the model predicts v = ε − x0 at timestep 1000·t,
    Euler from t = 1 (noise) to t = 0:   x ← x + (t_next − t)·v.

The noise levels are ``linspace(1, 0, steps + 1)`` passed through the training shift
t' = s·t / (1 + (s − 1)·t) (the same schedule diffusers' ``FlowMatchEulerDiscreteScheduler``
builds from ``shift = s``). Guidance: v = v_uncond + g·(v_cond − v_uncond); the conditional and
unconditional rows run as one batch of 2B unless ``batch_cfg=False``. The guidance scale g of step
i comes from :func:`guidance_scales`: ``constant`` (g = s at every step), ``released`` (the released
Vchitect-2.0 pipeline's per-step formula, quirks included) or ``smooth`` (the ramp that formula
evidently meant) — docs/sampling.md, "Guidance schedules". A pixel-space ``condition`` (models with
a condition adapter, docs/model.md) is given at every step, to both passes of guidance.

Two training-free accelerations/quality tools plug into :func:`sample`:
:class:`~vchitect.diffusion.fastercache.FasterCache` (reuse attention outputs and the unconditional
prediction across steps) and :func:`~vchitect.diffusion.freeinit.freeinit_sample` (noise
re-initialisation). Sequence-parallel sampling needs nothing here: a model prepared with
:func:`vchitect.parallel.ulysses.apply_ulysses` returns the full prediction on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch


@dataclass
class TextCondition:
    """Encoded prompts: hidden B×L×Dt, mask B×L bool (None = all valid), pooled B×P."""

    hidden: torch.Tensor
    pooled: torch.Tensor
    mask: Optional[torch.Tensor] = None

    @property
    def batch(self) -> int:
        return self.hidden.shape[0]

    def valid_mask(self) -> torch.Tensor:
        if self.mask is None:
            return torch.ones(self.hidden.shape[:2], dtype=torch.bool, device=self.hidden.device)
        return self.mask.to(torch.bool)

    def padded(self, length: int) -> "TextCondition":
        """Zero-pad the token axis to ``length`` (padding masked out)."""
        L = self.hidden.shape[1]
        if L == length:
            return self
        if L > length:
            raise ValueError(f"cannot pad {L} text tokens down to {length}")
        pad = length - L
        hidden = torch.cat([self.hidden, self.hidden.new_zeros(self.batch, pad, self.hidden.shape[2])], 1)
        mask = torch.cat([self.valid_mask(), self.valid_mask().new_zeros(self.batch, pad)], 1)
        return TextCondition(hidden, self.pooled, mask)

    @staticmethod
    def cat(conds: list["TextCondition"]) -> "TextCondition":
        """Stack along the batch axis (token axes padded to the longest)."""
        L = max(c.hidden.shape[1] for c in conds)
        conds = [c.padded(L) for c in conds]
        masks = None if all(c.mask is None for c in conds) else torch.cat([c.valid_mask() for c in conds])
        return TextCondition(torch.cat([c.hidden for c in conds]), torch.cat([c.pooled for c in conds]), masks)


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: t' = s·t / (1 + (s − 1)·t) (s > 1 spends more steps at high noise)."""
    return shift * t / (1 + (shift - 1) * t)


def flow_sigmas(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` noise levels from 1 to 0 (float32), shifted; the last one is exactly 0."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps={num_steps}: need at least one step")
    if shift <= 0:
        raise ValueError(f"shift={shift}: must be > 0 (1 = no shift)")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return shift_sigmas(t, shift).to(torch.float32)


def predict_velocity(model, x: torch.Tensor, text: TextCondition, t: float,
                     condition: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One transformer call: x B×C×F×H×W at noise level t (same for the batch) → v B×C×F×H×W.
    ``condition`` (B×Cc×F_pix×H_pix×W_pix, optional) goes to the model's condition adapter."""
    timestep = torch.full((x.shape[0],), float(t) * 1000.0, device=x.device, dtype=torch.float32)
    dtype = next(model.parameters()).dtype
    kwargs = {} if condition is None else {"condition": condition.to(x.device, dtype)}
    out = model(x.to(dtype), text.hidden.to(dtype), text.pooled.to(dtype), timestep,
                encoder_attention_mask=text.mask, return_dict=False, **kwargs)[0]
    return out.float()


DEPTH_CHANNEL = 4  # of a 5-channel condition: RGB, mask, depth


def unconditional_condition(condition: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The condition of the unconditional (negative-prompt) pass of guidance: the same condition —
    guidance is over the text only, as in Many-for-Many's pipeline — except that a depth channel is
    zeroed there, as Many-for-Many's pipeline does (so guidance also pushes towards the depth)."""
    if condition is None or condition.shape[1] <= DEPTH_CHANNEL:
        return condition
    out = condition.clone()
    out[:, DEPTH_CHANNEL:] = 0
    return out


GUIDANCE_SCHEDULES = ("constant", "released", "smooth")


def _cosine_ramp(scale: float, u: float) -> float:
    """1 + s·(1 − cos(π·u⁵))/2 — in Python floats (doubles), as the released pipeline computes it."""
    return 1 + scale * ((1 - math.cos(math.pi * u ** 5.0)) / 2)


def guidance_scales(schedule: str, scale: float, sigmas: torch.Tensor) -> list[float]:
    """The guidance scale g_i of each of the N = len(sigmas) − 1 steps along ``sigmas`` (1 → 0).

    ``constant``: g_i = s. ``smooth``: g_i = 1 + s·(1 − cos(π·(i/N)⁵))/2, rising from 1 at i = 0
    towards 1 + s. ``released``: the same ramp over u = (N − t_i)/N, with t_i the *scheduler
    timestep* of step i (1000·σ_i in float32, 0 … 1000, after the shift) — what the released code
    computes. For t_i > N the base u is negative (down to −9 at N = 100) and u⁵ reaches −59049, so
    cos(π·u⁵) is effectively pseudo-random and g_i jumps between ≈1 and ≈1 + s instead of rising.
    The exponent 5.0 is integral, so a negative base gives a real, negative power (no NaN).
    """
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule={schedule!r}: choose one of {', '.join(GUIDANCE_SCHEDULES)}")
    n = len(sigmas) - 1
    if schedule == "constant":
        return [float(scale)] * n
    if schedule == "smooth":
        return [_cosine_ramp(scale, i / n) for i in range(n)]
    timesteps = sigmas[:-1].to(torch.float32) * 1000  # float32, as FlowMatchEulerDiscreteScheduler.timesteps
    return [_cosine_ramp(scale, (n - t) / n) for t in timesteps.tolist()]


def released_guidance_check(scales: list[float], scale: float) -> None:
    """Refuse a ``released`` schedule that the released pipeline itself cannot run.

    It decides whether to guide from the scale its formula just wrote (g > 1) and, from the next
    step on, whether to run the unconditional pass at all. Where g comes out exactly 1 (cos(π·u⁵) = 1
    in doubles: a timestep within ≈2 % of N, or u⁵ an even integer) that step reuses the previous
    step's velocity and the next one fails (it indexes the second row of a batch of one). On the
    last step that reuse is reproduced by :func:`sample`; anywhere else there is no released output.
    """
    if scale <= 1:
        raise ValueError(f"guidance_schedule='released' with guidance_scale={scale}: the released pipeline "
                         f"guides only with a scale > 1 (it fails without one); use 'constant' or 'smooth'")
    n = len(scales)
    for i, g in enumerate(scales):
        if not g > 1 and (i == 0 or i < n - 1):
            raise ValueError(f"guidance_schedule='released' at {n} steps: the released formula gives g = {g} "
                             f"at step {i}, where the released pipeline stops with an error; choose another "
                             f"step count (e.g. {n + 1}) or guidance_schedule='smooth'")


StepCallback = Callable[[int, float, torch.Tensor], None]


@torch.no_grad()
def sample(model, noise: torch.Tensor, cond: TextCondition, uncond: Optional[TextCondition] = None, *,
           sigmas: torch.Tensor, guidance_scale: Union[float, list[float], tuple[float, ...]] = 1.0,
           guidance_schedule: str = "constant", batch_cfg: bool = True, fastercache=None,
           callback: Optional[StepCallback] = None, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Integrate ``noise`` (B×C×F×H×W, float32) along ``sigmas`` (1 → 0) and return x0 (float32).

    ``condition`` (B×Cc×F_pix×H_pix×W_pix, for a model with a condition adapter) is the same at
    every step; the unconditional pass gets :func:`unconditional_condition` of it.

    ``uncond`` (same batch as ``cond``) enables guidance on the steps whose scale (see
    :func:`guidance_scales`; or one value per step given as ``guidance_scale``) is not 1; a step
    with g = 1 runs the conditional pass only (except under FasterCache, whose schedule decides per
    step which attention outputs and which unconditional predictions are computed or reused).
    """
    num_steps = len(sigmas) - 1
    released = False
    if isinstance(guidance_scale, (list, tuple)):
        scales = [float(g) for g in guidance_scale]
        if len(scales) != num_steps:
            raise ValueError(f"{len(scales)} guidance scales for {num_steps} steps: give one per step")
    else:
        scales = guidance_scales(guidance_schedule, float(guidance_scale), sigmas)
        released = guidance_schedule == "released" and uncond is not None
        if released:
            released_guidance_check(scales, float(guidance_scale))
    use_cfg = uncond is not None and any(g != 1.0 for g in scales)
    if use_cfg and uncond.batch != cond.batch:
        raise ValueError(f"negative prompts ({uncond.batch}) and prompts ({cond.batch}) must match in number")
    x = noise.float()
    both = TextCondition.cat([cond, uncond]) if use_cfg else None
    c_cond, c_uncond = condition, unconditional_condition(condition)
    c_both = None if condition is None or not use_cfg else torch.cat([c_cond, c_uncond])
    session = fastercache.attach(model, num_steps) if fastercache is not None else None
    v = None
    try:
        for i in range(num_steps):
            t, t_next = float(sigmas[i]), float(sigmas[i + 1])
            g = scales[i]
            if released and not g > 1:
                pass  # the released last-step quirk (released_guidance_check): the previous velocity again
            elif not use_cfg or (g == 1.0 and session is None):
                if session is not None:
                    session.begin_step(i, ("cond",))
                v = predict_velocity(model, x, cond, t, c_cond)
            else:
                full = session is None or session.cfg_full(i)
                if full and batch_cfg:
                    if session is not None:
                        session.begin_step(i, ("cond", "uncond"))
                    v_c, v_u = predict_velocity(model, torch.cat([x, x]), both, t, c_both).chunk(2)
                elif full:
                    if session is not None:
                        session.begin_step(i, ("cond",))
                    v_c = predict_velocity(model, x, cond, t, c_cond)
                    if session is not None:
                        session.begin_step(i, ("uncond",))
                    v_u = predict_velocity(model, x, uncond, t, c_uncond)
                else:  # FasterCache CFG-Cache: only the conditional pass runs
                    session.begin_step(i, ("cond",))
                    v_c = predict_velocity(model, x, cond, t, c_cond)
                    v_u = session.rebuild_uncond(v_c, i)
                if session is not None and full:
                    session.store_cfg_residual(v_c, v_u, i)
                v = v_u + g * (v_c - v_u)
            x = x + (t_next - t) * v
            if callback is not None:
                callback(i, t, x)
    finally:
        if session is not None:
            session.detach()
    return x


def enable_sequence_parallel(model, mesh=None):
    """Split ``model``'s video tokens over the ranks of ``mesh`` (1-D; default: all ranks) with the
    training code's Ulysses sequence parallelism. Every rank must then call :func:`sample` with the
    same noise and text; each gets the full result. Returns the mesh."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vchitect.parallel.ulysses import apply_ulysses

    if mesh is None:
        if not dist.is_initialized():
            raise RuntimeError("sequence-parallel sampling needs a process group: launch with torchrun "
                               "(or call torch.distributed.init_process_group first)")
        device_type = next(model.parameters()).device.type
        mesh = init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("sp",))
    heads = model.config.num_attention_heads
    if heads % mesh.size():
        raise ValueError(f"the model has {heads} attention heads, not divisible by {mesh.size()} sequence-parallel "
                         f"ranks; use a rank count that divides {heads}")
    apply_ulysses(model, mesh)
    return mesh


__all__ = ["GUIDANCE_SCHEDULES", "TextCondition", "enable_sequence_parallel", "flow_sigmas", "guidance_scales",
           "predict_velocity", "released_guidance_check", "sample", "shift_sigmas", "unconditional_condition"]
