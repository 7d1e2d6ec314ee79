"""Weight import: official Vchitect-2.0 key names and shapes (written here from the released
architecture, independently of our model code), strict loading, and SD3 initialisation."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from vchitect.models import VchitectTransformer3DModel
from vchitect.models.weights import WeightImportError, init_from_sd3, load_vchitect2

VIDEO_ONLY = ("to_q_temp", "to_k_temp", "to_v_temp", "to_q_cross", "to_out_temporal", "to_out_context",
              "to_add_out_temporal")


def official_shapes(layers, D, C, p, Dt, P, M):
    """Key → shape of a released VchitectXLTransformerModel state dict."""
    s = {"pos_embed.proj.weight": (D, C, p, p), "pos_embed.proj.bias": (D,), "pos_embed.pos_embed": (1, M * M, D)}

    def lin(name, out, inp):
        s[f"{name}.weight"], s[f"{name}.bias"] = (out, inp), (out,)

    lin("time_text_embed.timestep_embedder.linear_1", D, 256)
    lin("time_text_embed.timestep_embedder.linear_2", D, D)
    lin("time_text_embed.text_embedder.linear_1", D, P)
    lin("time_text_embed.text_embedder.linear_2", D, D)
    lin("context_embedder", D, Dt)
    for i in range(layers):
        b, last = f"transformer_blocks.{i}", i == layers - 1
        lin(f"{b}.norm1.linear", 6 * D, D)
        lin(f"{b}.norm1_context.linear", (2 if last else 6) * D, D)
        for name in ("to_q", "to_k", "to_v", "to_q_temp", "to_k_temp", "to_v_temp", "to_q_cross",
                     "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_out_temporal", "to_out_context",
                     "to_add_out_temporal") + (() if last else ("to_add_out",)):
            lin(f"{b}.attn.{name}", D, D)
        for ff in ("ff",) + (() if last else ("ff_context",)):
            lin(f"{b}.{ff}.net.0.proj", 4 * D, D)
            lin(f"{b}.{ff}.net.2", D, 4 * D)
    lin("norm_out.linear", 2 * D, D)
    lin("proj_out", p * p * C, D)
    return s


def test_official_2b_shapes_give_the_published_parameter_count():
    shapes = official_shapes(24, 1536, 16, 2, 4096, 2048, 192)
    n = sum(math.prod(v) for k, v in shapes.items() if k != "pos_embed.pos_embed")
    assert n == 2_424_947_776
    with torch.device("meta"):
        ours = VchitectTransformer3DModel()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes


TINY_RELEASED_CONFIG = {"_class_name": "VchitectXLTransformerModel", "sample_size": 16, "patch_size": 2,
                        "in_channels": 4, "num_layers": 3, "attention_head_dim": 8, "num_attention_heads": 4,
                        "joint_attention_dim": 24, "caption_projection_dim": 32, "pooled_projection_dim": 12,
                        "out_channels": 4, "pos_embed_max_size": 16, "tp_size": 1, "rope_scaling_factor": 1.0}


def write_released(tmp_path, drop=(), extra=None, reshape=None):
    shapes = official_shapes(3, 32, 4, 2, 24, 12, 16)
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v, generator=g) for k, v in shapes.items() if k not in drop}
    state.update(extra or {})
    if reshape:
        state[reshape] = torch.randn(3, 3)
    folder = tmp_path / "transformer"
    folder.mkdir()
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY_RELEASED_CONFIG))
    return folder, state


def test_load_vchitect2_is_strict_and_exact(tmp_path):
    folder, state = write_released(tmp_path)
    model = load_vchitect2(folder)
    own = model.state_dict()
    assert set(own) == set(state)
    for k, v in state.items():
        assert torch.equal(own[k], v), k


def test_load_vchitect2_wrong_shape_names_the_key(tmp_path):
    key = "transformer_blocks.1.attn.to_q_temp.weight"
    folder, _ = write_released(tmp_path, reshape=key)
    with pytest.raises(WeightImportError, match=rf"{key}.*\(3, 3\).*\(32, 32\)"):
        load_vchitect2(folder)


def test_load_vchitect2_missing_and_unexpected_keys_fail(tmp_path):
    folder, _ = write_released(tmp_path, drop=("proj_out.bias",))
    with pytest.raises(WeightImportError, match="missing.*proj_out.bias"):
        load_vchitect2(folder)
    other = tmp_path / "other"
    other.mkdir()
    folder2, _ = write_released(other, extra={"vid_token": torch.zeros(32)})
    with pytest.raises(WeightImportError, match="does not have.*vid_token"):
        load_vchitect2(folder2)


def test_pickle_checkpoints_are_refused(tmp_path):
    torch.save({}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightImportError, match="never loaded"):
        load_vchitect2(tmp_path)


def test_init_from_sd3_loads_image_parts_and_keeps_video_parts_fresh(tmp_path):
    shapes = official_shapes(3, 32, 4, 2, 24, 12, 16)
    sd3 = {k: torch.randn(v) for k, v in shapes.items() if not any(f".{n}." in k for n in VIDEO_ONLY)}
    save_file(sd3, str(tmp_path / "sd3.safetensors"))
    torch.manual_seed(0)
    model = VchitectTransformer3DModel(**{k: v for k, v in TINY_RELEASED_CONFIG.items()
                                          if k not in ("_class_name", "tp_size", "caption_projection_dim")})
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    init_from_sd3(tmp_path / "sd3.safetensors", model)
    own = model.state_dict()
    for k, v in sd3.items():
        assert torch.equal(own[k], v), k
    for k in own:
        if k not in sd3:
            assert any(f".{n}." in k for n in VIDEO_ONLY), k
            assert torch.equal(own[k], fresh[k]), k
    assert torch.count_nonzero(own["transformer_blocks.0.attn.to_out_temporal.weight"]) == 0


def test_init_from_sd3_rejects_dual_attention(tmp_path):
    save_file({"transformer_blocks.0.attn2.to_q.weight": torch.zeros(32, 32)}, str(tmp_path / "sd35.safetensors"))
    model = VchitectTransformer3DModel(**{k: v for k, v in TINY_RELEASED_CONFIG.items()
                                          if k not in ("_class_name", "tp_size", "caption_projection_dim")})
    with pytest.raises(WeightImportError, match="attn2"):
        init_from_sd3(tmp_path / "sd35.safetensors", model)
