"""Rectified-flow objective, optimizer groups, schedule and gradient clipping (single process)."""

import pytest
import torch

from vchitect.config import load_config
from vchitect.diffusion.objective import (DiffusionConfig, NullText, drop_text, rectified_flow_loss,
                                          sample_timesteps, shift_for_tokens)
from vchitect.models import VchitectTransformer3DModel
from vchitect.train.config import TrainConfig
from vchitect.parallel import clip_grad_norm_, total_grad_norm
from vchitect.train.optim import build_optimizer, build_scheduler


def tiny():
    torch.manual_seed(0)
    return VchitectTransformer3DModel(**vars(load_config("configs/model/tiny.yaml").model))


def fixed_batch(B=2, F=3, H=8, W=8, L=6):
    g = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(B, 4, F, H, W, generator=g), "text": torch.randn(B, L, 32, generator=g),
            "text_mask": torch.ones(B, L, dtype=torch.bool), "pooled": torch.randn(B, 16, generator=g)}


def test_tiny_model_overfits_a_fixed_batch():
    model = tiny()
    batch = fixed_batch()
    g = torch.Generator().manual_seed(1)
    t = torch.rand(2, generator=g)
    noise = torch.randn(batch["latents"].shape, generator=g)
    cfg = DiffusionConfig()
    opt = build_optimizer(model, TrainConfig(lr=3e-3), "cpu")
    first = None
    for step in range(300):
        loss = rectified_flow_loss(model, batch, t, noise, cfg)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < first / 10:
            break
    assert loss.item() < first / 10, (first, loss.item(), step)


def test_loss_target_is_velocity():
    # A model that returns exactly ε − x0 has zero loss.
    batch = fixed_batch()
    noise = torch.randn_like(batch["latents"])

    class Oracle(torch.nn.Module):
        def forward(self, x_t, text, pooled, timestep, encoder_attention_mask=None, return_dict=False):
            return (noise - batch["latents"],)

    t = torch.rand(2)
    assert rectified_flow_loss(Oracle(), batch, t, noise, DiffusionConfig()).item() == 0.0


def test_timestep_shift_grows_with_tokens():
    cfg = DiffusionConfig(shift=1.0, shift_reference_tokens=1024)
    assert shift_for_tokens(cfg, 4096) == pytest.approx(2.0)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    small, large = sample_timesteps(cfg, 4000, 1024, g1), sample_timesteps(cfg, 4000, 16384, g2)
    assert large.mean() > small.mean() + 0.1
    assert 0 < small.min() and large.max() < 1
    uniform = sample_timesteps(DiffusionConfig(timestep_sampling="uniform"), 20000, 1, torch.Generator())
    assert abs(uniform.mean().item() - 0.5) < 0.02


def test_text_dropout_replaces_with_the_empty_prompt():
    batch = fixed_batch(B=64)
    null = NullText(torch.full((6, 32), 7.0), torch.tensor([True] + [False] * 5), torch.full((16,), 3.0))
    out = drop_text(batch, null, 0.5, torch.Generator().manual_seed(0))
    dropped = (out["text"] == 7.0).all(-1).all(-1)
    assert 10 < dropped.sum() < 54
    assert torch.equal(out["text_mask"][dropped][0], null.mask)
    assert (out["pooled"][dropped] == 3.0).all() and not (out["pooled"][~dropped] == 3.0).any()
    assert drop_text(batch, null, 0.0, torch.Generator()) is batch


def test_no_weight_decay_for_norms_biases_and_embeddings():
    model = tiny()
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for grp in opt.param_groups if grp["weight_decay"] > 0 for p in grp["params"]}
    assert "transformer_blocks.0.attn.to_q.weight" in decayed
    assert not any(n.endswith(".bias") or n.startswith(("pos_embed", "time_text_embed")) for n in decayed)
    assert all(len(opt.state[p]) == 3 for grp in opt.param_groups for p in grp["params"])  # state is eager


def test_warmup_then_cosine():
    model = tiny()
    cfg = TrainConfig(lr=1.0, warmup_steps=4, schedule="cosine", steps=14, min_lr_ratio=0.1)
    opt = build_optimizer(model, cfg, "cpu")
    sched = build_scheduler(opt, cfg)
    lrs = []
    for _ in range(14):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(0.9 * torch.pi)).item()))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))


def test_clip_matches_torch_on_plain_tensors():
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(3, 3))
    a.grad, b.grad = torch.randn(5) * 10, torch.randn(3, 3) * 10
    assert total_grad_norm([a, b]).item() == pytest.approx(
        torch.sqrt(a.grad.square().sum() + b.grad.square().sum()).item())
    norm = clip_grad_norm_([a, b], 1.0)
    assert norm.item() > 1 and total_grad_norm([a, b]).item() == pytest.approx(1.0, rel=1e-4)
