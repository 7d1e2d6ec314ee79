"""Euler flow sampler with classifier-free guidance: schedule, exactness, guidance arithmetic, batching, and
the guidance schedules (constant, the released Vchitect-2.0 formula, smooth)."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from torch import nn

from tests.helpers_ckpt import build_model
from vchitect.diffusion.sampling import (TextCondition, flow_sigmas, guidance_scales, released_guidance_check,
                                         sample)


class PointMassFlow(nn.Module):
    """The exact velocity field of a data distribution concentrated on ``target``: v = (x_t − x0)/t.

    With pooled[:, 0] < 0 (the "unconditional" rows) it flows to ``-target`` instead."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.transformer_blocks = nn.ModuleList()
        self.calls = []

    def forward(self, x, text, pooled, timestep, encoder_attention_mask=None, return_dict=True):
        self.calls.append(x.shape[0])
        t = (timestep / 1000).view(-1, 1, 1, 1, 1)
        sign = torch.where(pooled[:, :1] < 0, -1.0, 1.0).view(-1, 1, 1, 1, 1)
        return ((x - sign * self.target) / t,)


def conds(batch=1, length=4, dim=16, pooled=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = TextCondition(torch.randn(batch, length, dim, generator=g), torch.randn(batch, pooled, generator=g).abs())
    u = TextCondition(torch.randn(batch, length, dim, generator=g), -torch.randn(batch, pooled, generator=g).abs())
    return c, u


def test_sigmas_run_from_one_to_zero_with_the_sd3_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = flow_sigmas(8, shift=3.0)
    assert s.shape == (9,) and s[0] == 1.0 and s[-1] == 0.0
    assert bool((s[1:] < s[:-1]).all())
    t = 0.5
    assert torch.isclose(flow_sigmas(2, 3.0)[1], torch.tensor(3 * t / (1 + 2 * t)))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(sigmas=torch.linspace(1, 0, 9)[:-1].tolist())
    assert torch.allclose(sched.sigmas, s, atol=1e-6)
    with pytest.raises(ValueError, match="at least one step"):
        flow_sigmas(0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_integrates_the_exact_flow_to_the_data_point(shift):
    target = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    model = PointMassFlow(target)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    c, _ = conds()
    x0 = sample(model, noise, c, sigmas=flow_sigmas(5, shift))
    assert torch.allclose(x0, target, atol=1e-5)
    assert model.calls == [1] * 5


def test_guidance_combines_conditional_and_unconditional_velocities():
    target = torch.randn(1, 3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    model = PointMassFlow(target)
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    c, u = conds()
    g = 4.0
    x = sample(model, noise, c, u, sigmas=flow_sigmas(1), guidance_scale=g)
    v_c, v_u = noise - target, noise + target  # at t = 1
    assert torch.allclose(x, noise - (v_u + g * (v_c - v_u)), atol=1e-5)
    assert model.calls == [2]  # one batched call of cond + uncond
    model.calls.clear()
    sample(model, noise, c, u, sigmas=flow_sigmas(3), guidance_scale=g, batch_cfg=False)
    assert model.calls == [1, 1] * 3
    model.calls.clear()
    sample(model, noise, c, u, sigmas=flow_sigmas(3), guidance_scale=1.0)  # g = 1: no unconditional pass
    assert model.calls == [1] * 3


def test_batched_and_sequential_cfg_agree_on_the_transformer():
    model = build_model(0)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 3, 8, 8, generator=g)
    c, u = conds(batch=2, length=5)
    u = TextCondition(u.hidden[:, :3], u.pooled)  # different text lengths are padded and masked
    sig = flow_sigmas(4, 2.0)
    a = sample(model, noise, c, u, sigmas=sig, guidance_scale=5.0, batch_cfg=True)
    b = sample(model, noise, c, u, sigmas=sig, guidance_scale=5.0, batch_cfg=False)
    assert torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError, match="must match"):
        sample(model, noise, c, TextCondition(u.hidden[:1], u.pooled[:1]), sigmas=sig, guidance_scale=5.0)


# ------------------------------------------------------------------ guidance schedules
def _f32(x: float) -> float:
    """Round a double to float32 (the dtype the scheduler keeps its noise levels and timesteps in)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def released_timesteps_by_hand(n: int, shift: float = 3.0) -> list[float]:
    """FlowMatchEulerDiscreteScheduler(shift).set_timesteps(n).timesteps, in plain Python: the shift of
    linspace(1, σ_min, n), σ_min = the shifted smallest training level 1/1000, each σ and t = 1000·σ
    in float32."""
    sigma_min = _f32(shift * 0.001 / (1 + (shift - 1) * 0.001))
    out = []
    for i in range(n):
        u = 1 + (sigma_min - 1) * i / (n - 1) if n > 1 else 1.0
        out.append(_f32(_f32(shift * u / (1 + (shift - 1) * u)) * 1000))
    return out


def scheduler_sigmas(n: int, shift: float = 3.0) -> torch.Tensor:
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)  # the released checkpoint's scheduler: SD3's, shift 3
    sched.set_timesteps(n)
    return sched.sigmas


@pytest.mark.parametrize("n", [100, 4, 9])
def test_released_guidance_is_the_released_formula_over_the_shifted_scheduler_timesteps(n):
    s = 7.5
    timesteps = released_timesteps_by_hand(n)
    table = [1 + s * (1 - math.cos(math.pi * ((n - t) / n) ** 5)) / 2 for t in timesteps]
    sigmas = scheduler_sigmas(n)
    assert (sigmas[:-1] * 1000).tolist() == timesteps  # the hand-made timesteps are the scheduler's
    assert guidance_scales("released", s, sigmas) == table  # to the last bit: g is chaotic in t
    if n == 100:  # the released settings: t = 1000 → u = −9, u⁵ = −59049 (odd) → g = 1 + s
        assert table[:6] == pytest.approx([8.5, 6.1813, 1.0437, 4.6441, 7.9293, 7.462], abs=1e-4)
        assert sum(g < 1.5 for g in table) == 24 and sum(g > 7.5 for g in table) == 18  # jumps, not a ramp
        assert min(table) > 1  # guidance stays on at every step: the released pipeline runs
        assert table[-1] == pytest.approx(6.2012, abs=1e-4)  # t = 8.93 < N: the only smooth part, at the end
    if n == 9:  # t = 8.93 lies within 1 % of N: u⁵ ≈ 3e-11, cos = 1 in doubles, g = 1 on the last step
        assert table[-1] == 1.0 and min(table[:-1]) > 1
        released_guidance_check(table, s)  # the released code runs (and reuses the previous velocity)


def test_released_guidance_refuses_what_the_released_pipeline_cannot_run():
    # 40 steps: u = (40 − 1000)/40 = −24, u⁵ = −7962624 is even → g = 1 at step 0 (a NameError there)
    scales = guidance_scales("released", 7.5, scheduler_sigmas(40))
    assert scales[0] == 1.0
    with pytest.raises(ValueError, match="at 40 steps: .* step 0, where the released pipeline stops"):
        released_guidance_check(scales, 7.5)
    with pytest.raises(ValueError, match="guidance_scale=1.0: the released pipeline guides only with a scale > 1"):
        released_guidance_check(guidance_scales("released", 1.0, scheduler_sigmas(6)), 1.0)
    model = PointMassFlow(torch.zeros(1, 3, 2, 4, 4))
    c, u = conds()
    with pytest.raises(ValueError, match="at 40 steps"):
        sample(model, torch.randn(1, 3, 2, 4, 4), c, u, sigmas=scheduler_sigmas(40), guidance_scale=7.5,
               guidance_schedule="released")
    assert model.calls == []  # refused before any model call
    with pytest.raises(ValueError, match="choose one of constant, released, smooth"):
        guidance_scales("cosine", 7.5, scheduler_sigmas(6))


def test_smooth_guidance_rises_from_one_towards_one_plus_s_and_constant_is_flat():
    s, n = 7.5, 100
    g = guidance_scales("smooth", s, flow_sigmas(n, 3.0))
    assert len(g) == n and g[0] == 1.0
    assert all(b >= a for a, b in zip(g, g[1:])) and g[-1] > g[n // 2]
    assert g[-1] == pytest.approx(1 + s * (1 - math.cos(math.pi * 0.99 ** 5)) / 2) and 8.4 < g[-1] < 1 + s
    assert g[50] == pytest.approx(1 + s * (1 - math.cos(math.pi / 32)) / 2)  # u⁵ = 1/32: still ≈ 1 at half-way
    assert guidance_scales("constant", s, flow_sigmas(n, 3.0)) == [s] * n
    # the step with g = 1 runs the conditional pass only; the others run one batch of cond + uncond
    model = PointMassFlow(torch.zeros(1, 3, 2, 4, 4))
    c, u = conds()
    sample(model, torch.randn(1, 3, 2, 4, 4), c, u, sigmas=flow_sigmas(4, 3.0), guidance_scale=s,
           guidance_schedule="smooth")
    assert model.calls == [1, 2, 2, 2]


def released_loop(model, noise, cond, uncond, n, s):
    """The released VchitectXLPipeline denoising loop, written out: the scheduler's own timesteps, two
    batch-1 transformer calls per step, g overwritten per step by its formula and then checked (g > 1)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(n)
    latents, current_scale, noise_pred = noise.clone(), s, None
    for t in sched.timesteps:
        assert current_scale > 1  # else the released code indexes row 1 of a batch of one
        timestep = t.expand(1)
        pred_uncond = model(latents, uncond.hidden, uncond.pooled, timestep, return_dict=False)[0]
        pred_text = model(latents, cond.hidden, cond.pooled, timestep, return_dict=False)[0]
        current_scale = 1 + s * ((1 - math.cos(math.pi * ((n - t.item()) / n) ** 5.0)) / 2)
        if current_scale > 1:
            noise_pred = pred_uncond + current_scale * (pred_text - pred_uncond)
        latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("n", [6, 9])  # 9: g = 1 on the last step, which reuses step 7's prediction
def test_released_schedule_in_the_batched_sampler_equals_the_released_loop(n):
    model = build_model(0)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    c, u = conds(batch=1, length=5)
    want = released_loop(model, noise, c, u, n, 7.5)
    got = sample(model, noise, c, u, sigmas=scheduler_sigmas(n), guidance_scale=7.5, guidance_schedule="released")
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    constant = sample(model, noise, c, u, sigmas=scheduler_sigmas(n), guidance_scale=7.5)
    assert (constant - want).abs().max() > 1e-3  # the schedule matters


def test_per_step_scales_given_directly_equal_the_named_schedule():
    model = build_model(0)
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    c, u = conds(batch=1, length=5)
    sig = scheduler_sigmas(6)
    named = sample(model, noise, c, u, sigmas=sig, guidance_scale=7.5, guidance_schedule="smooth")
    given = sample(model, noise, c, u, sigmas=sig, guidance_scale=guidance_scales("smooth", 7.5, sig))
    assert torch.equal(named, given)
    with pytest.raises(ValueError, match="5 guidance scales for 6 steps"):
        sample(model, noise, c, u, sigmas=sig, guidance_scale=[2.0] * 5)
