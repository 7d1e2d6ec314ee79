"""Meta-device init, in one process: the local box of a shard on uneven shapes, the recorded
constructor replayed bitwise, what it refuses, the position table, and reading boxes of a
checkpoint. (Every parallel layout against the full-build path: tests/distributed/test_parallel_layouts.py.)"""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from vchitect.models import VchitectTransformer3DModel
from vchitect.models.embeddings import fill_sincos_table
from vchitect.models.weights import (CheckpointSlices, WeightImportError, init_from_sd3, load_vchitect2,
                                     open_initial_weights, weight_files)
from vchitect.parallel import ParallelDims
from vchitect.parallel.meta_init import (MetaInitError, build_on_meta, materialize, replay, shard_box,
                                         use_meta_init)

TINY = dict(sample_size=16, in_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=32)


def chunked(t: torch.Tensor, dim: int, k: int, r: int) -> torch.Tensor:
    """torch.chunk's piece r of k, empty where chunk makes fewer pieces (what FSDP2 / DTensor hold)."""
    pieces = torch.chunk(t, k, dim=dim)
    return pieces[r] if r < len(pieces) else t.narrow(dim, 0, 0)


@pytest.mark.parametrize("rows", [1, 3, 5, 7, 8, 86])
def test_shard_box_is_the_chunk_on_uneven_shapes(rows):
    t = torch.arange(rows * 6).reshape(rows, 6)
    for k in (2, 3, 4):
        for r in range(k):
            box = shard_box(t.shape, (k,), (r,), (Shard(0),))
            assert torch.equal(t[box], chunked(t, 0, k, r)), (rows, k, r, box)


def test_shard_box_two_dims_and_replicate():
    t = torch.arange(7 * 5).reshape(7, 5)
    for a in range(2):  # FSDP Shard(0) on mesh dim 0, TP row-wise Shard(1) on mesh dim 1, HSDP replicas
        for b in range(2):
            box = shard_box(t.shape, (3, 2, 2), (1, a, b), (Replicate(), Shard(0), Shard(1)))
            assert torch.equal(t[box], chunked(chunked(t, 0, 2, a), 1, 2, b))


def test_shard_box_strided_shard_applies_the_later_mesh_dim_first():
    """FSDP2 over a TP column-wise shard: (_StridedShard(0, sf=tp), Shard(0)) = the FSDP chunk of the TP chunk."""
    for rows in (8, 86, 5):
        t = torch.arange(rows * 3).reshape(rows, 3)
        for dp in range(2):
            for tp in range(2):
                box = shard_box(t.shape, (2, 2), (dp, tp), (_StridedShard(0, split_factor=2), Shard(0)))
                assert torch.equal(t[box], chunked(chunked(t, 0, 2, tp), 0, 2, dp)), (rows, dp, tp)
    with pytest.raises(MetaInitError, match="split factor 3"):
        shard_box((8, 3), (2, 2), (0, 0), (_StridedShard(0, split_factor=3), Shard(0)))


@pytest.mark.parametrize("extra", [{}, dict(qk_norm="rms_norm"), dict(mlp_ratio=2.7, patch_size=1, in_channels=3),
                                   dict(condition_channels=5, condition_vae_spatial_factor=3,  # adapter, odd factor
                                        condition_vae_temporal_factor=2, condition_hidden_channels=4),
                                   dict(num_layers=3, repvideo=dict(window=3, gate_init=0.25))])  # RepVideo gates
def test_meta_build_replays_the_constructor_bitwise(extra):
    kw = {**TINY, **extra}
    torch.manual_seed(3)
    ref = VchitectTransformer3DModel(**kw)
    torch.manual_seed(99)  # the replay seeds its own generator; the global state must not matter
    model, record = build_on_meta(lambda: VchitectTransformer3DModel(**kw))
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {op.kind for op in record.ops} == {"uniform", "fill"}
    materialize(model, record, "cpu", seed=3)
    got, want = model.state_dict(), ref.state_dict()
    assert list(got) == list(want)
    assert [k for k in want if not torch.equal(got[k], want[k])] == []


def test_replay_in_small_chunks_keeps_only_the_box(monkeypatch):
    import vchitect.parallel.meta_init as mi

    monkeypatch.setattr(mi, "CHUNK_ELEMENTS", 7)  # many pieces per tensor, rows longer than a piece
    kw = {**TINY, "mlp_ratio": 2.7}
    torch.manual_seed(4)
    ref = VchitectTransformer3DModel(**kw)
    model, record = build_on_meta(lambda: VchitectTransformer3DModel(**kw))
    name = "transformer_blocks.1.ff.net.0.proj.weight"  # 86×32, in the middle of the stream
    want = ref.state_dict()[name]
    box = (slice(22, 44), slice(16, 32))
    local = torch.empty(22, 16)
    replay(record.ops, {name: (local, box)}, seed=4)
    assert torch.equal(local, want[box])


class _Custom(nn.Module):
    def __init__(self, how: str):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if how == "scale":
            with torch.no_grad():
                self.lin.weight.mul_(0.5)
        elif how == "part":
            nn.init.zeros_(self.lin.weight[:2])
        elif how == "noise":
            self.noise = torch.randn(3)  # draws from the global generator for no parameter
        elif how == "computed":
            self.table = nn.Parameter(torch.arange(4.0))
        elif how == "uninitialised":
            self.raw = nn.Parameter(torch.empty(2))


@pytest.mark.parametrize("how, message", [
    ("scale", "aten.mul_"), ("part", "on a part of it"), ("noise", "no parameter"),
    ("computed", "parameter table is computed"), ("uninitialised", "never initialised")])
def test_meta_build_refuses_what_it_cannot_replay(how, message):
    with pytest.raises(MetaInitError, match=message):
        build_on_meta(lambda: _Custom(how))


def test_meta_build_needs_reset_buffers_for_buffers():
    class WithBuffer(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.zeros(3))

    with pytest.raises(MetaInitError, match="no reset_buffers"):
        build_on_meta(WithBuffer)


def test_fill_sincos_table_equals_diffusers():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    for M, D, base in ((32, 32, 8), (40, 96, 7)):
        want = get_2d_sincos_pos_embed(D, M, base_size=base, interpolation_scale=1.0, output_type="pt")
        assert torch.equal(fill_sincos_table(torch.empty(1, M * M, D), M, base), want.float().unsqueeze(0))


def test_use_meta_init():
    one, fsdp = ParallelDims(world_size=1), ParallelDims(world_size=2)
    assert not use_meta_init("auto", one) and use_meta_init("auto", one, "sd3:/x")
    assert use_meta_init("auto", fsdp) and use_meta_init("on", one) and not use_meta_init("off", fsdp)


def _released(tmp_path, model, shards=2):
    state = {k: torch.randn(v.shape).to(torch.bfloat16) for k, v in model.state_dict().items()}
    keys = sorted(state)
    files = {f"diffusion_pytorch_model-0000{i + 1}-of-0000{shards}.safetensors": keys[i::shards]
             for i in range(shards)}
    for file, part in files.items():
        save_file({k: state[k] for k in part}, str(tmp_path / file))
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, part in files.items() for k in part}}))
    return state


def test_checkpoint_slices_copy_boxes_and_remap(tmp_path):
    model = VchitectTransformer3DModel(**TINY)
    state = _released(tmp_path, model)
    slices = CheckpointSlices(tmp_path, remap_bytes=1)  # re-map after every read
    assert slices.shapes() == {k: tuple(v.shape) for k, v in state.items()}
    key = "transformer_blocks.0.ff.net.0.proj.weight"  # 128×32
    dest = torch.empty(40, 16)
    slices.copy_into(key, (slice(88, 128), slice(16, 32)), dest)
    assert torch.equal(dest, state[key][88:, 16:].float())
    assert slices._handles == {}
    slices.remap_bytes = 1 << 30
    slices.copy_into(key, (slice(0, 0), slice(0, 32)), torch.empty(0, 32))  # an empty shard reads nothing
    slices.copy_into(key, (slice(0, 1), slice(0, 32)), torch.empty(1, 32))
    assert len(slices._handles) == 1
    slices.close()


def test_meta_load_equals_full_load_in_one_process(tmp_path):
    _released(tmp_path, VchitectTransformer3DModel(**TINY))
    torch.manual_seed(0)
    ref = load_vchitect2(tmp_path, VchitectTransformer3DModel(**TINY))
    model, record = build_on_meta(lambda: VchitectTransformer3DModel(**TINY))
    loaded = materialize(model, record, "cpu", seed=0, weights=open_initial_weights("vchitect2", tmp_path, model))
    assert loaded == set(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_open_initial_weights_checks_keys_like_the_full_loaders(tmp_path):
    own = VchitectTransformer3DModel(**TINY).state_dict()
    part = {k: v for k, v in own.items() if "transformer_blocks.1" not in k}
    save_file(part, str(tmp_path / "part.safetensors"))
    meta, _ = build_on_meta(lambda: VchitectTransformer3DModel(**TINY))
    for kind, loader in (("vchitect2", load_vchitect2), ("sd3", init_from_sd3)):
        with pytest.raises(WeightImportError) as full:
            loader(tmp_path / "part.safetensors", VchitectTransformer3DModel(**TINY))
        with pytest.raises(WeightImportError) as streamed:
            open_initial_weights(kind, tmp_path / "part.safetensors", meta)
        assert str(streamed.value) == str(full.value)


def test_weight_files_reads_the_transformer_of_a_pipeline_folder(tmp_path):
    (tmp_path / "transformer").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "model_index.json").write_text("{}")
    assert weight_files(tmp_path) == [tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"]
