"""RepVideo layer aggregation (vchitect/models/repvideo.py): off = today's model, identity at init, the
public code's formula, the fixed gate, errors, save / reload, released-checkpoint loading and the demo
override; `vchitect eval layers` on tiny exports. Parallel layouts: tests/distributed (``*_repvideo``);
meta-device init: tests/unit/test_meta_init.py; the export's own code: tests/e2e/test_export_without_vchitect.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers_models import inputs
from vchitect.models import VchitectTransformer3DModel
from vchitect.models.repvideo import resolve_repvideo

TINY = dict(sample_size=16, in_channels=4, num_layers=5, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=16)


def tiny_model(seed: int = 0, **overrides) -> VchitectTransformer3DModel:
    torch.manual_seed(seed)
    return VchitectTransformer3DModel(**{**TINY, **overrides}).eval()


def live(model: VchitectTransformer3DModel, gates=None) -> VchitectTransformer3DModel:
    """Small random weights for the zero-initialised branches, and the given learned gates."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("to_out_temporal", "to_out_context", "to_add_out_temporal")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        if gates is not None:
            model.layer_aggregation.gate.copy_(torch.as_tensor(gates, dtype=torch.float32))
    return model


def reference(model: VchitectTransformer3DModel, window: int, gates, x: dict) -> torch.Tensor:
    """RepVideo's public code (sat/transformer_gating.py) transcribed onto our two streams: before block i the
    input is g_i·mean(cache) + (1 − g_i)·input, the cache restarting with the output of every block i % W == 0."""
    with torch.no_grad():
        captured = {}

        def loop_inputs(_m, args):  # the first block's (x, ctx) and the block arguments
            captured["args"] = args

        h = model.transformer_blocks[0].register_forward_pre_hook(loop_inputs)
        model.layer_aggregation, saved = None, model.layer_aggregation
        model(**x)
        model.layer_aggregation = saved
        h.remove()
        hx, hctx, temb, Fr, rope, mask = captured["args"]
        cache = [(hx, hctx)]
        for i, block in enumerate(model.transformer_blocks):
            if len(cache) > 1:
                mx = torch.stack([c[0] for c in cache]).mean(0)
                mc = torch.stack([c[1] for c in cache]).mean(0)
                hx = gates[i] * mx + (1 - gates[i]) * hx
                hctx = gates[i] * mc + (1 - gates[i]) * hctx
            hx, hctx = block(hx, hctx, temb, Fr, rope, mask)
            cache = [(hx, hctx)] if i % window == 0 else cache + [(hx, hctx)]
        return hx


def final_tokens(model, x: dict) -> torch.Tensor:
    """The video tokens the last block returns (norm_out's input)."""
    got = {}

    def keep(_m, args):
        got["x"] = args[0]

    h = model.norm_out.register_forward_pre_hook(keep)
    with torch.no_grad():
        model(**x)
    h.remove()
    return got["x"]


def test_off_is_todays_model_bit_for_bit():
    want = live(tiny_model())
    for off in (None, {}, dict(window=0), dict(window=0, gate="fixed", gate_init=0.5)):
        model = live(tiny_model(repvideo=off))
        assert model.layer_aggregation is None
        assert list(model.state_dict()) == list(want.state_dict())
        assert all(torch.equal(v, want.state_dict()[k]) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(**inputs()).sample, want(**inputs()).sample)


def test_learned_gate_is_the_identity_at_init_and_built_last():
    plain = live(tiny_model())
    model = live(tiny_model(repvideo=dict(window=3)))
    own, base = model.state_dict(), plain.state_dict()
    assert list(own) == list(base) + ["layer_aggregation.gate"]  # built last: every other init as without it
    assert all(torch.equal(v, own[k]) for k, v in base.items())
    assert torch.equal(model.layer_aggregation.gate, torch.zeros(5))
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(**x).sample, plain(**x).sample)
    model.train()
    model(**x).sample.square().mean().backward()
    grad = model.layer_aggregation.gate.grad  # windows {0,1,2} {3,4}: blocks 2 and 3 mix, so learn from step one
    assert grad[2] != 0 and grad[3] != 0 and not grad[[0, 1, 4]].any()
    assert model.layer_aggregation.mixing_blocks(5) == [2, 3]


@pytest.mark.parametrize("window", [2, 3, 5])
def test_learned_gates_follow_the_public_code(window):
    gates = [0.9, 0.7, 0.6, 0.4, 0.3]
    model = live(tiny_model(repvideo=dict(window=window)), gates)
    x = inputs()
    ref_x = reference(model, window, gates, x)
    torch.testing.assert_close(final_tokens(model, x), ref_x, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model(**x).sample, live(tiny_model())(**x).sample)


def test_fixed_gate_adds_no_parameter_and_mixes_with_its_constant():
    model = live(tiny_model(repvideo=dict(window=5, gate="fixed")))
    assert list(model.state_dict()) == list(live(tiny_model()).state_dict())
    assert model.layer_aggregation.fixed_gate == 0.5  # RepVideo's init value
    x = inputs()
    ref_x = reference(model, 5, [0.5] * 5, x)
    torch.testing.assert_close(final_tokens(model, x), ref_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("repvideo,layers,match", [
    (dict(window=6), 5, r"window=6 is larger than the model's 5 layers"),
    (dict(window=1), 5, "a window of one layer averages nothing"),
    (dict(window=2), 2, "on 2 layers mixes no block"),
    (dict(window=2, gate="per_channel"), 5, "gate='per_channel'"),
    (dict(window=2, gate="fixed", gate_init=0.0), 5, "a fixed gate of 0 is the model without RepVideo"),
    (dict(window=2, gate_init=1.5), 5, r"gate_init=1.5.*\[0, 1\]"),
    (dict(window=2, size=3), 5, r"unknown key\(s\) \['size'\]"),
])
def test_bad_settings_are_clear_errors(repvideo, layers, match):
    with pytest.raises(ValueError, match=match):
        resolve_repvideo(repvideo, layers)
    with pytest.raises(ValueError, match=match):
        VchitectTransformer3DModel(**{**TINY, "num_layers": layers}, repvideo=repvideo)


def test_config_checks_the_window_against_the_depth():
    from vchitect.config import ConfigError, load_config

    cfg = load_config("configs/model/demo.yaml", ["model.repvideo.window=4"])
    assert (cfg.model.repvideo.window, cfg.model.repvideo.gate, cfg.model.repvideo.gate_init) == (4, "learned", None)
    with pytest.raises(ConfigError, match=r"model.repvideo.window=5 must be 2 … model.num_layers=4"):
        load_config("configs/model/demo.yaml", ["model.repvideo.window=5"])
    with pytest.raises(ConfigError, match="model.repvideo.gate='both' is not allowed"):
        load_config("configs/model/demo.yaml", ["model.repvideo.window=2", "model.repvideo.gate=both"])


def test_save_and_reload_keep_repvideo(tmp_path):
    model = live(tiny_model(repvideo=dict(window=3, gate_init=0.0)), [0.0, 0.0, 0.5, 0.3, 0.0])
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["repvideo"]
    assert saved == {"window": 3, "gate_init": 0.0}
    again = VchitectTransformer3DModel.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(again.layer_aggregation.gate, model.layer_aggregation.gate)
    with torch.no_grad():
        assert torch.equal(again(**inputs()).sample, model(**inputs()).sample)


def test_a_checkpoint_without_the_gates_loads_and_keeps_them_at_init(tmp_path):
    from vchitect.models.weights import load_vchitect2

    released = live(tiny_model(seed=4))
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(tmp_path / "r.safetensors"))
    model = load_vchitect2(tmp_path / "r.safetensors", tiny_model(seed=5, repvideo=dict(window=3)))
    assert not model.layer_aggregation.gate.any()
    with torch.no_grad():
        assert torch.equal(model(**inputs()).sample, released(**inputs()).sample)


def test_the_demo_override_reaches_training_and_the_model(tmp_path):
    from vchitect.config import load_config
    from vchitect.demo.run import CONFIGS, DemoSettings, train_overrides

    ov = train_overrides(DemoSettings(out=tmp_path, overrides=["model.repvideo.window=4"]))
    assert ov[-1] == "model.repvideo.window=4"  # after the demo's own overrides, on the train command line
    cfg = load_config(CONFIGS / "train/demo-shards.yaml", ov)
    model = VchitectTransformer3DModel(**__import__("dataclasses").asdict(cfg.model))
    assert model.layer_aggregation is not None and model.layer_aggregation.mixing_blocks(4) == [2, 3]


# ------------------------------------------------------------------ vchitect eval layers
def test_spatial_attention_probs_are_the_branchs_attention():
    from vchitect.eval.layers import spatial_attention_probs
    from vchitect.models.attention import dot_product_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 7, 2, 4, generator=g) for _ in range(3))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, -2:] = False
    per_head = [spatial_attention_probs(q[:, :, h:h + 1], k[:, :, h:h + 1], mask) for h in range(2)]
    want = dot_product_attention(q, k, v, mask)  # N×Q×H×d
    for h in range(2):
        torch.testing.assert_close(per_head[h] @ v[:, :, h], want[:, :, h], rtol=1e-5, atol=1e-6)
    both = spatial_attention_probs(q, k, mask, rows=4)
    assert both.shape == (3, 4, 7) and not both[1, :, -2:].any()
    torch.testing.assert_close(both, (per_head[0] + per_head[1])[:, :4] / 2)


def test_recorder_measures_frames_and_layers_and_leaves_the_model_alone():
    from vchitect.eval.layers import LayerRecorder

    model = tiny_model(num_layers=3)  # fresh: temporal and cross outputs zero, no frame table → frames independent
    x = inputs(B=1, F=3)
    x["hidden_states"] = x["hidden_states"][:, :, :1].expand(-1, -1, 3, -1, -1).contiguous()  # identical frames
    with torch.no_grad():
        want = model(**x).sample
        with LayerRecorder(model) as rec:
            got = model(**x).sample
            model(**x)
    assert torch.equal(got, want) and all(b.attn.attention_fn is None for b in model.transformer_blocks)
    r = rec.record.means()
    assert r["calls"] == 2 and len(r["attention_similarity"]) == 2 and len(r["frame_similarity"]) == 3
    assert all(abs(s - 1) < 1e-5 for s in r["frame_similarity"])  # identical frames stay identical
    assert all(0 < s < 1 - 1e-4 for s in r["attention_similarity"])  # different blocks, different maps


def test_eval_layers_overlays_two_exports(tmp_path):
    from tests.helpers_ckpt import build_model, make_encoders, run_config, write_checkpoint
    from vchitect.cli import main
    from vchitect.export import export

    enc = make_encoders(tmp_path / "enc")
    encoders = {"text_encoder_path": str(enc["text_encoder"])}
    folders = []
    for name, extra in (("plain", dict(num_layers=3)), ("repvideo", dict(num_layers=3, repvideo=dict(window=3)))):
        model = build_model(0, **extra)
        if name == "repvideo":
            with torch.no_grad():
                model.layer_aggregation.gate.fill_(0.8)
        write_checkpoint(tmp_path / name, 1, model, run_config(extra, encoders=encoders), with_ema=False)
        folders.append(str(export(tmp_path / name, tmp_path / f"{name}_export", log=lambda *a, **k: None)))
    assert (tmp_path / "repvideo_export" / "transformer" / "vchitect_models_repvideo.py").is_file()
    out = tmp_path / "layers"
    rc = main(["eval", "layers", *folders, "--prompt", "a red car", "--out", str(out), "--frames", "3",
               "--height", "8", "--width", "8", "--steps", "1", "--labels", "without", "with"])
    assert rc == 0 and (out / "layers.png").stat().st_size > 1000
    res = json.loads((out / "layers.json").read_text())
    without, with_ = res["models"]
    assert (without["label"], with_["label"], without["repvideo"], with_["repvideo"]["window"]) == \
        ("without", "with", None, 3)
    for m in res["models"]:
        assert m["calls"] == 1 and len(m["attention_similarity"]) == 2 and len(m["frame_similarity"]) == 3
        assert all(-1 <= v <= 1 for v in m["attention_similarity"] + m["frame_similarity"])
    # the same weights and noise but the mix into block 2: blocks 0 and 1 alike, block 2 not
    assert without["frame_similarity"][:2] == pytest.approx(with_["frame_similarity"][:2], abs=1e-6)
    assert without["frame_similarity"][2] != pytest.approx(with_["frame_similarity"][2], abs=1e-6)
    assert without["attention_similarity"][0] == pytest.approx(with_["attention_similarity"][0], abs=1e-6)
    assert without["attention_similarity"][1] != pytest.approx(with_["attention_similarity"][1], abs=1e-6)
    assert main(["eval", "layers", str(tmp_path), "--prompt", "x", "--out", str(out)]) == 2  # not an export
