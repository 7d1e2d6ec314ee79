"""ParallelDims validation (before any process group exists), layout parsing, ParallelConfig."""

import pytest
import torch

from vchitect.config import ConfigError, from_dict
from vchitect.models import VchitectTransformer3DModel
from vchitect.parallel import ParallelConfig, ParallelDims, ParallelLayoutError, parallelize, parse_layout
from vchitect.parallel.dims import _divisors


def test_rest_of_world_is_resolved():
    d = ParallelDims(dp_shard=-1, sp=2, tp=2, world_size=16)
    assert (d.dp_replicate, d.dp_shard, d.sp, d.tp) == (1, 4, 2, 2)
    assert d.dp == 4 and d.fsdp == 8 and d.fsdp_enabled and not d.hsdp_enabled
    d = ParallelDims(dp_replicate=-1, dp_shard=2, tp=2, world_size=16)
    assert (d.dp_replicate, d.dp_shard) == (4, 2) and d.hsdp_enabled and d.dp == 8


def test_single_process_is_trivial():
    d = ParallelDims(world_size=1)
    assert (d.dp_replicate, d.dp_shard, d.sp, d.tp) == (1, 1, 1, 1)
    assert not (d.fsdp_enabled or d.tp_enabled or d.sp_enabled)


def test_product_must_equal_world_size():
    with pytest.raises(ParallelLayoutError, match=r"multiply to 8 but the world size is 4.*dp_shard=-1"):
        ParallelDims(dp_shard=2, sp=2, tp=2, world_size=4)


def test_rest_cannot_be_resolved():
    with pytest.raises(ParallelLayoutError, match=r"dp_shard=-1 cannot be resolved.*multiply to 3.*world size 4"):
        ParallelDims(dp_shard=-1, tp=3, world_size=4)


def test_only_one_rest_dimension():
    with pytest.raises(ParallelLayoutError, match="only one of dp_replicate and dp_shard may be -1"):
        ParallelDims(dp_replicate=-1, dp_shard=-1, world_size=4)


@pytest.mark.parametrize("bad", [dict(sp=0), dict(tp=-1), dict(dp_shard=0)])
def test_sizes_must_be_positive(bad):
    with pytest.raises(ParallelLayoutError, match="must be an integer >= 1"):
        ParallelDims(world_size=4, **bad)


def test_heads_must_divide_by_tp_times_sp():
    with pytest.raises(ParallelLayoutError, match=r"24 attention heads.*tp × sp = 16.*Layouts that fit"):
        ParallelDims(dp_shard=1, sp=4, tp=4, world_size=16, num_heads=24)
    ParallelDims(dp_shard=2, sp=4, tp=2, world_size=16, num_heads=24)


def test_parallelize_rejects_impossible_layout_before_any_work():
    """No process group exists here: reaching mesh construction would fail with another error."""
    torch.manual_seed(0)
    model = VchitectTransformer3DModel(sample_size=16, in_channels=4, num_layers=2, num_attention_heads=4,
                                       attention_head_dim=8, joint_attention_dim=24, pooled_projection_dim=12,
                                       pos_embed_max_size=32)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    dims = ParallelDims(dp_shard=1, sp=4, tp=2, world_size=8)
    with pytest.raises(ParallelLayoutError, match=r"4 attention heads, which is not divisible by tp × sp = 8"):
        parallelize(model, dims, ParallelConfig(), device_type="cpu")
    assert not torch.distributed.is_initialized()
    assert all(torch.equal(p, before[n]) and type(p) is torch.nn.Parameter for n, p in model.named_parameters())


def test_parse_layout():
    assert parse_layout("tp2,sp2") == {"tp": 2, "sp": 2}
    assert parse_layout("dp_shard2,dp_replicate2") == {"dp_shard": 2, "dp_replicate": 2}
    assert parse_layout("none") == {}
    with pytest.raises(ParallelLayoutError, match="unknown dimension"):
        parse_layout("pp2")


def test_divisors():
    assert _divisors(12) == [1, 2, 3, 4, 6, 12]


def test_parallel_config_validation():
    cfg = from_dict(ParallelConfig, {"tp": 2, "sp": 2, "activation_checkpointing": "selective", "ac_ratio": 0.25})
    assert cfg.dims(world_size=8).dp_shard == 2
    with pytest.raises(ConfigError, match="activation_offload"):
        from_dict(ParallelConfig, {"activation_offload": True})
    with pytest.raises(ConfigError, match="both -1"):
        from_dict(ParallelConfig, {"dp_replicate": -1})
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        from_dict(ParallelConfig, {"activation_checkpointing": "some"})


def _tiny():
    torch.manual_seed(0)
    return VchitectTransformer3DModel(sample_size=16, in_channels=4, num_layers=2, num_attention_heads=4,
                                      attention_head_dim=8, joint_attention_dim=24, pooled_projection_dim=12,
                                      pos_embed_max_size=32)


def test_parallelize_needs_the_launched_ranks():
    with pytest.raises(ParallelLayoutError, match="needs 2 ranks but torch.distributed is not initialised"):
        parallelize(_tiny(), ParallelDims(dp_shard=2, world_size=2), ParallelConfig(), device_type="cpu")


def test_single_process_fsdp_offload_and_checkpointing_match_plain():
    """One rank: FSDP2 (for CPU offload) on a 1-rank group started by parallelize, full AC + offload."""
    ref, model = _tiny(), _tiny()
    try:
        parallelize(model, ParallelDims(world_size=1), ParallelConfig(cpu_offload=True, activation_checkpointing="full",
                                                                       activation_offload=True), device_type="cpu")
        assert torch.distributed.is_initialized() and torch.distributed.get_world_size() == 1
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(2, 4, 2, 8, 8, generator=g), torch.randn(2, 5, 24, generator=g),
                  torch.randn(2, 12, generator=g), torch.rand(2, generator=g) * 1000)
        for m in (ref, model):
            m(*inputs).sample.square().mean().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is None:
                assert p.grad is None, n
            else:
                torch.testing.assert_close(p.grad.full_tensor(), q.grad, rtol=1e-5, atol=1e-7, msg=n)
    finally:
        torch.distributed.destroy_process_group()


def test_seeds_differ_across_data_ranks_and_steps():
    from types import SimpleNamespace

    from vchitect.parallel import seed_for_rank

    seeds = {seed_for_rank(0, SimpleNamespace(dp_rank=r), s) for r in range(16) for s in range(500)}
    assert len(seeds) == 16 * 500 and all(0 <= x < 2**63 for x in seeds)
    assert seed_for_rank(5, SimpleNamespace(dp_rank=3), 7) == seed_for_rank(5, SimpleNamespace(dp_rank=3), 7)
