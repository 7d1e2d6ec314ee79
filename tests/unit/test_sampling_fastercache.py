"""FasterCache: counted savings follow the schedule; outputs stay close; CFG-Cache rebuild is exact
when the guidance residual is constant; the model is restored afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.helpers_ckpt import build_model
from vchitect.diffusion.fastercache import FasterCacheConfig
from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample

STEPS = 10
# attention_start 0.2 → step 2, interval 2: attention computed at 0 1 2 4 6 8, reused at 3 5 7 9.
# cfg_start 0.3 → step 3, interval 3: unconditional pass at 0 1 2 3 6 9, rebuilt at 4 5 7 8.
SCHEDULE = dict(attention_start=0.2, attention_interval=2, cfg_start=0.3, cfg_interval=3)


@pytest.fixture(scope="module")
def setup():
    model = build_model(0)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(1, 4, 3, 8, 8, generator=g)
    cond = TextCondition(torch.randn(1, 6, 16, generator=g), torch.randn(1, 16, generator=g))
    uncond = TextCondition(torch.randn(1, 6, 16, generator=g) * 0.1, torch.randn(1, 16, generator=g) * 0.1)
    ref = sample(model, noise, cond, uncond, sigmas=flow_sigmas(STEPS, 3.0), guidance_scale=5.0)
    return model, noise, cond, uncond, ref


class BlockCounter:
    def __init__(self, model):
        self.rows = 0
        self.hooks = [b.register_forward_pre_hook(self.hook) for b in model.transformer_blocks]

    def hook(self, _m, args):
        self.rows += args[2].shape[0]

    def remove(self):
        for h in self.hooks:
            h.remove()


def run(setup, **kw):
    model, noise, cond, uncond, _ = setup
    fc = FasterCacheConfig(**{**SCHEDULE, **kw})
    counter = BlockCounter(model)
    out = sample(model, noise, cond, uncond, sigmas=flow_sigmas(STEPS, 3.0), guidance_scale=5.0, fastercache=fc)
    counter.remove()
    return out, fc.stats, counter.rows


def test_block_and_attention_evaluations_drop_by_the_scheduled_amount(setup):
    layers = len(setup[0].transformer_blocks)
    out, stats, block_rows = run(setup)
    # uncached: 10 steps × (cond + uncond) = 20 block and attention evaluations per layer
    assert block_rows == stats["block_rows"] == layers * (10 + 6)  # uncond only at 6 steps
    cond_attn = 6  # steps 0 1 2 4 6 8
    uncond_attn = 4  # of 0 1 2 3 6 9, step 3 and 9 reuse (two computed outputs already exist)
    assert stats["attention_rows"] == layers * (cond_attn + uncond_attn)
    assert stats["attention_reused_rows"] == layers * (4 + 2)
    assert stats["uncond_rebuilt"] == 4 and stats["model_calls"] == 10
    ref = setup[4]
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel


def test_each_cache_alone_and_neither(setup):
    layers = len(setup[0].transformer_blocks)
    ref = setup[4]
    out, stats, rows = run(setup, cfg=False)
    assert rows == layers * 20 and stats["attention_rows"] == layers * (6 + 6)
    assert ((out - ref).norm() / ref.norm()).item() < 0.03
    out, stats, rows = run(setup, attention=False)
    assert rows == layers * 16 and stats["attention_rows"] == layers * 16 and stats["attention_reused_rows"] == 0
    out, stats, rows = run(setup, attention=False, cfg=False)
    assert rows == layers * 20 and stats["attention_rows"] == layers * 20
    assert torch.allclose(out, ref, atol=1e-5)  # nothing skipped: identical to the uncached sampler


def test_extrapolation_weight_changes_the_reused_output(setup):
    ref = setup[4]
    plain, _, _ = run(setup, cfg=False, weight_start=0.0, weight_end=0.0)
    extrapolated, _, _ = run(setup, cfg=False, weight_start=0.0, weight_end=1.0)
    assert not torch.allclose(plain, extrapolated, atol=1e-6)
    for out in (plain, extrapolated):
        assert ((out - ref).norm() / ref.norm()).item() < 0.03


def test_model_is_restored_after_sampling(setup):
    model, noise, cond, uncond, ref = setup
    run(setup)
    assert all("forward" not in b.attn.__dict__ for b in model.transformer_blocks)
    assert not any(b._forward_pre_hooks for b in model.transformer_blocks)
    again = sample(model, noise, cond, uncond, sigmas=flow_sigmas(STEPS, 3.0), guidance_scale=5.0)
    assert torch.equal(again, ref)


class ConstantResidualFlow(nn.Module):
    """v = 0.5·x + field(cond): the cond/uncond difference is the same at every step."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.register_buffer("smooth", torch.randn(1, 3, 2, 1, 1, generator=g).expand(1, 3, 2, 8, 8).clone())
        self.register_buffer("rough", torch.randn(1, 3, 2, 8, 8, generator=g))
        self.dummy = nn.Parameter(torch.zeros(1))
        self.transformer_blocks = nn.ModuleList()

    def forward(self, x, text, pooled, timestep, encoder_attention_mask=None, return_dict=True):
        cond = (pooled[:, :1] > 0).float().view(-1, 1, 1, 1, 1)
        return (0.5 * x + cond * self.rough + (1 - cond) * self.smooth,)


@pytest.mark.parametrize("cutoff", [0.0, 0.25, 2.0])
def test_cfg_cache_rebuilds_the_unconditional_prediction_from_both_bands(cutoff):
    model = ConstantResidualFlow()
    noise = torch.randn(1, 3, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = TextCondition(torch.zeros(1, 2, 4), torch.ones(1, 4))
    uncond = TextCondition(torch.zeros(1, 2, 4), -torch.ones(1, 4))
    sig = flow_sigmas(8)
    ref = sample(model, noise, cond, uncond, sigmas=sig, guidance_scale=6.0)
    fc = FasterCacheConfig(attention=False, cfg_start=0.25, cfg_interval=4, cfg_freq_cutoff=cutoff)
    out = sample(model, noise, cond, uncond, sigmas=sig, guidance_scale=6.0, fastercache=fc)
    assert fc.stats["uncond_rebuilt"] == 4
    assert torch.allclose(out, ref, atol=1e-5)
    boosted = FasterCacheConfig(attention=False, cfg_start=0.25, cfg_interval=4, cfg_freq_cutoff=0.25,
                                low_boost=0.5, high_boost=0.5)
    assert not torch.allclose(sample(model, noise, cond, uncond, sigmas=sig, guidance_scale=6.0,
                                     fastercache=boosted), ref, atol=1e-3)


def test_sequential_cfg_passes_give_the_same_cached_result(setup):
    model, noise, cond, uncond, _ = setup
    outs, stats = [], []
    for batch_cfg in (True, False):
        fc = FasterCacheConfig(**SCHEDULE)
        outs.append(sample(model, noise, cond, uncond, sigmas=flow_sigmas(STEPS, 3.0), guidance_scale=5.0,
                           fastercache=fc, batch_cfg=batch_cfg))
        stats.append(fc.stats)
    assert torch.allclose(outs[0], outs[1], atol=1e-5)
    assert stats[0]["attention_rows"] == stats[1]["attention_rows"] and stats[1]["model_calls"] == 10 + 6
