"""Activation checkpointing and offload give the same gradients as a plain run (single process)."""

import copy

import pytest
import torch

from vchitect.models import VchitectTransformer3DModel
from vchitect.parallel.checkpointing import apply_block_wrappers, checkpointed_block_indices


def test_block_selection_is_spread_evenly():
    assert checkpointed_block_indices(24, "none") == []
    assert checkpointed_block_indices(24, "full") == list(range(24))
    sel = checkpointed_block_indices(24, "selective", 0.5)
    assert len(sel) == 12 and sel == list(range(1, 24, 2))
    assert checkpointed_block_indices(24, "selective", 0.25) == [2, 6, 10, 14, 18, 22]
    assert checkpointed_block_indices(4, "selective", 0.0) == []
    assert checkpointed_block_indices(4, "selective", 1.0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="choose none, full or selective"):
        checkpointed_block_indices(4, "half")


def tiny():
    torch.manual_seed(0)
    m = VchitectTransformer3DModel(sample_size=16, in_channels=4, num_layers=4, num_attention_heads=4,
                                   attention_head_dim=8, joint_attention_dim=24, pooled_projection_dim=12,
                                   pos_embed_max_size=32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def grads(model, F=3):
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, -2:] = False
    out = model(hidden_states=torch.randn(2, 4, F, 8, 12, generator=g),
                encoder_hidden_states=torch.randn(2, 5, 24, generator=g),
                pooled_projections=torch.randn(2, 12, generator=g),
                timestep=torch.rand(2, generator=g) * 1000, encoder_attention_mask=mask).sample
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,ratio,offload", [("full", 0.5, False), ("full", 0.5, True),
                                                ("selective", 0.5, False), ("selective", 0.5, True)])
@pytest.mark.parametrize("F", [1, 3])
def test_checkpointing_and_offload_match_plain(mode, ratio, offload, F):
    base = tiny()
    model = copy.deepcopy(base)
    info = apply_block_wrappers(model, ac_mode=mode, ac_ratio=ratio, offload=offload, device_type="cpu")
    assert info["checkpointed"] == checkpointed_block_indices(4, mode, ratio)
    assert (info["offloader"] is not None) == offload
    ref_loss, ref = grads(base, F)
    loss, got = grads(model, F)
    assert torch.equal(loss, ref_loss)
    assert got.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0, msg=n)
    if offload:
        # inputs of the checkpointed blocks went through host copies: x (N×S×D) and ctx (N×L×D)
        per_block = (2 * F * 24 + 2 * F * 5) * 32 * 4
        assert info["offloader"].bytes_offloaded == per_block * len(info["checkpointed"])


def test_no_grad_forward_skips_checkpointing():
    model = tiny()
    apply_block_wrappers(model, ac_mode="full", offload=True, device_type="cpu")
    with torch.no_grad():
        out = model(hidden_states=torch.randn(1, 4, 2, 8, 8), encoder_hidden_states=torch.randn(1, 5, 24),
                    pooled_projections=torch.randn(1, 12), timestep=torch.tensor([500.0])).sample
    assert out.shape == (1, 4, 2, 8, 8)
