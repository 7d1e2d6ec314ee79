"""The analytic FLOP formula (used for every MFU figure) against torch's FlopCounterMode."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from vchitect.config import load_config
from vchitect.models import VchitectTransformer3DModel
from vchitect.models.flops import count_parameters, model_flops, train_step_flops


@pytest.mark.parametrize("B,F,H,W,L", [(2, 3, 8, 12, 5), (1, 1, 16, 16, 7), (2, 4, 6, 10, 3)])
def test_train_step_flops_match_flop_counter(B, F, H, W, L):
    cfg = load_config("configs/model/tiny.yaml").model
    torch.manual_seed(0)
    model = VchitectTransformer3DModel(**vars(cfg))
    x = torch.randn(B, cfg.in_channels, F, H, W)
    text = torch.randn(B, L, cfg.joint_attention_dim)
    pooled = torch.randn(B, cfg.pooled_projection_dim)
    t = torch.rand(B) * 1000
    # FlopCounterMode sees attention as bmm only on the math SDPA path.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, text, pooled, t).sample.square().mean().backward()
    measured = counter.get_total_flops()
    analytic = train_step_flops(cfg, B, F, H, W, L)
    assert abs(analytic - measured) / measured < 0.05, (analytic, measured)


def test_flops_scale_with_frames_and_tokens():
    cfg = load_config("configs/model/vchitect-2b.yaml").model
    one = model_flops(cfg, 1, 1, 54, 96, 333)
    many = model_flops(cfg, 1, 40, 54, 96, 333)
    assert "block.attn_temporal" not in one.forward and "block.attn_temporal" in many.forward
    assert 39 < many.forward_total / one.forward_total < 60
    assert many.train_step == pytest.approx(3 * many.forward_total - many.leaf_input)


def test_vchitect_2b_parameter_count():
    cfg = load_config("configs/model/vchitect-2b.yaml").model
    assert count_parameters(cfg) == 2_424_947_776
