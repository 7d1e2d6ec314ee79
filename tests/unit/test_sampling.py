"""Euler flow sampler with classifier-free guidance: schedule, exactness, guidance arithmetic, batching."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers_ckpt import build_model
from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample


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
