"""The Many-for-Many condition adapter (vchitect/models/condition_adapter.py): identity at init, token
layout, shape errors, the released-checkpoint load with it on, the trainer / sampler pass-through and
the export round trip. Meta-device init: tests/unit/test_meta_init.py; parallel layouts:
tests/distributed/test_parallel_layouts.py (the ``*_adapter`` cases)."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers_models import inputs
from vchitect.diffusion.config import DiffusionConfig
from vchitect.diffusion.objective import rectified_flow_loss
from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample, unconditional_condition
from vchitect.models import VchitectTransformer3DModel
from vchitect.models.condition_adapter import ConditionAdapter, latent_frames
from vchitect.models.weights import VIDEO_ONLY, WeightImportError, init_from_sd3, load_vchitect2

TINY = dict(sample_size=16, in_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=16)
# pixel = latent × 2 in space, 1 + (F − 1)·2 frames; the adapter downsamples by 2 × patch 2 = 4
ADAPTER = dict(condition_channels=4, condition_vae_spatial_factor=2, condition_vae_temporal_factor=2,
               condition_hidden_channels=4)


def tiny_model(seed: int = 0, **overrides) -> VchitectTransformer3DModel:
    torch.manual_seed(seed)
    return VchitectTransformer3DModel(**{**TINY, **overrides}).eval()


def live(model: VchitectTransformer3DModel, scale: float = 0.05) -> VchitectTransformer3DModel:
    """Give every zero-initialised output (the adapter's too) small random weights."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("to_out_temporal", "to_out_context", "condition_adapter.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def condition(B=2, F=5, H=16, W=24, channels=4, seed=2):
    """The encode_batch contract: RGB in [-1, 1] times the mask, then the 0/1 mask (then depth)."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(B, 1, F, H, W, generator=g) > 0.5).float()
    rgb = (torch.rand(B, 3, F, H, W, generator=g) * 2 - 1) * mask
    extra = [torch.rand(B, 1, F, H, W, generator=g)] if channels == 5 else []
    return torch.cat([rgb, mask, *extra], dim=1)


def test_zero_init_adapter_leaves_the_model_bit_identical():
    fresh = tiny_model(**ADAPTER)
    adapter = fresh.condition_adapter
    assert not adapter.conv_out.weight.any() and not adapter.conv_out.bias.any()
    plain, with_adapter = live(tiny_model()), live(fresh)
    with torch.no_grad():  # live() drew the adapter's output too (last, so the others match)
        adapter.conv_out.weight.zero_()
        adapter.conv_out.bias.zero_()
    own = with_adapter.state_dict()
    # built last: every other parameter has the init it has without the adapter
    assert all(torch.equal(v, own[k]) for k, v in plain.state_dict().items())
    assert set(own) - set(plain.state_dict()) and all(k.startswith("condition_adapter.")
                                                      for k in set(own) - set(plain.state_dict()))
    with torch.no_grad():
        want = plain(**inputs()).sample
        assert torch.equal(with_adapter(**inputs(), condition=condition()).sample, want)
        assert torch.equal(with_adapter(**inputs()).sample, want)


def test_a_trained_adapter_makes_the_output_depend_on_the_condition():
    model = live(tiny_model(**ADAPTER))
    with torch.no_grad():
        a = model(**inputs(), condition=condition(seed=2)).sample
        b = model(**inputs(), condition=condition(seed=3)).sample
        none = model(**inputs()).sample
    assert not torch.allclose(a, b) and not torch.allclose(a, none)
    model.train()
    model(**inputs(), condition=condition()).sample.square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("condition_adapter.")}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_tokens_follow_the_latent_frames_and_the_patch_grid():
    torch.manual_seed(0)
    adapter = ConditionAdapter(4, 16, patch_size=2, vae_spatial_factor=2, vae_temporal_factor=2, hidden_channels=4)
    torch.nn.init.normal_(adapter.conv_out.weight)
    c = condition(B=1)
    base = adapter(c, (3, 4, 6))  # 5 pixel frames → 3 latent frames of 4×6 patches
    assert base.shape == (3, 24, 16)
    # pixel frame 0 → latent frame 0 alone; pixel frames 3, 4 → latent frame 2
    for frames, latent in (([0], 0), ([3, 4], 2), ([1], 1)):
        changed = c.clone()
        changed[:, :, frames] = 0.7
        diff = (adapter(changed, (3, 4, 6)) - base).abs().flatten(1).amax(1)
        assert [bool(d > 0) for d in diff] == [i == latent for i in range(3)], (frames, diff)
    # the top-right 4×4 pixels are token (row 0, column 5), row-major like the patch embedding
    changed = c.clone()
    changed[..., :4, 20:] = 0.9
    diff = (adapter(changed, (3, 4, 6)) - base).abs().amax(-1)  # N×S
    assert diff[0, 5] > 0 and diff[0, 3 * 6] == 0  # bottom-left untouched (its receptive field is far)


def test_latent_frames_and_shape_errors():
    assert latent_frames(17, 4) == 5 and latent_frames(1, 4) == 1 and latent_frames(6, 1) == 6
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        latent_frames(16, 4)
    model = tiny_model(**ADAPTER)
    with pytest.raises(ValueError, match="model.condition_channels=4"):
        model(**inputs(), condition=condition(channels=5))
    with pytest.raises(ValueError, match="latents are a 3×4×6 grid"):
        model(**inputs(), condition=condition(H=8, W=12))  # latent-size condition
    with pytest.raises(ValueError, match="has no condition adapter"):
        tiny_model()(**inputs(), condition=condition())
    with pytest.raises(ValueError, match="must all be ≥ 1"):
        ConditionAdapter(4, 16, 2, 0, 1)
    odd = ConditionAdapter(5, 16, patch_size=1, vae_spatial_factor=3, vae_temporal_factor=1, hidden_channels=4)
    assert odd(condition(B=1, F=2, H=6, W=9, channels=5), (2, 2, 3)).shape == (2, 6, 16)


def test_save_and_reload_keep_the_adapter(tmp_path):
    model = live(tiny_model(**ADAPTER))
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["condition_channels"] == 4
    again = VchitectTransformer3DModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(**inputs(), condition=condition()).sample,
                           model(**inputs(), condition=condition()).sample)


def test_released_checkpoint_loads_with_the_adapter_on_and_leaves_it_zero(tmp_path):
    released = live(tiny_model(seed=4))
    save_file({k: v.contiguous() for k, v in released.state_dict().items()}, str(tmp_path / "r.safetensors"))
    model = tiny_model(seed=5, **ADAPTER)
    load_vchitect2(tmp_path / "r.safetensors", model)
    assert not model.condition_adapter.conv_out.weight.any()
    with torch.no_grad():
        assert torch.equal(model(**inputs(), condition=condition()).sample, released(**inputs()).sample)
    # an SD3 init (no video parts, no adapter) is tolerated the same way
    sd3 = {k: v.contiguous() for k, v in released.state_dict().items()
           if k != "pos_embed.pos_embed" and not any(f".{part}." in k for part in VIDEO_ONLY)}
    save_file(sd3, str(tmp_path / "sd3.safetensors"))
    init_from_sd3(tmp_path / "sd3.safetensors", tiny_model(**ADAPTER))
    # a checkpoint with part of the adapter is refused, as is an adapter the model does not have
    with_adapter = {k: v.contiguous() for k, v in live(tiny_model(**ADAPTER)).state_dict().items()}
    partial = {k: v for k, v in with_adapter.items() if not k.startswith("condition_adapter.conv_out")}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(WeightImportError, match="missing from the checkpoint.*condition_adapter.conv_out"):
        load_vchitect2(tmp_path / "partial.safetensors", tiny_model(**ADAPTER))
    save_file(with_adapter, str(tmp_path / "full.safetensors"))
    with pytest.raises(WeightImportError, match="the model does not have.*condition_adapter"):
        load_vchitect2(tmp_path / "full.safetensors", tiny_model())
    loaded = load_vchitect2(tmp_path / "full.safetensors", tiny_model(seed=9, **ADAPTER))
    assert torch.equal(loaded.condition_adapter.conv_out.weight, with_adapter["condition_adapter.conv_out.weight"])


def test_the_objective_passes_the_batch_condition():
    model = live(tiny_model(**ADAPTER))
    x = inputs()
    batch = dict(latents=x["hidden_states"], text=x["encoder_hidden_states"], pooled=x["pooled_projections"],
                 text_mask=torch.ones(2, 5, dtype=torch.bool))
    t, noise = torch.tensor([0.3, 0.8]), torch.randn(2, 4, 3, 8, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = rectified_flow_loss(model, batch, t, noise, DiffusionConfig())
        conditioned = rectified_flow_loss(model, {**batch, "condition": condition()}, t, noise, DiffusionConfig())
        assert plain != conditioned
        assert rectified_flow_loss(model, {**batch, "condition": None}, t, noise, DiffusionConfig()) == plain


def test_the_trainer_drops_a_condition_the_model_cannot_take(caplog):
    from vchitect.train.trainer import Trainer

    fake = types.SimpleNamespace()
    batch = {"latents": torch.zeros(1), "condition": torch.zeros(1)}
    with caplog.at_level("WARNING", logger="vchitect.train"):
        out = Trainer._without_condition(fake, batch)
        Trainer._without_condition(fake, batch)
    assert set(out) == {"latents"} and "condition" in batch
    assert sum("model.condition_channels=0" in r.message for r in caplog.records) == 1


def test_sampling_gives_the_condition_to_every_pass():
    model = live(tiny_model(**ADAPTER))
    x = inputs(B=1)
    g = torch.Generator().manual_seed(4)
    cond = TextCondition(x["encoder_hidden_states"], x["pooled_projections"])
    uncond = TextCondition(torch.randn(1, 5, 24, generator=g), torch.randn(1, 12, generator=g))
    c = condition(B=1)
    kw = dict(sigmas=flow_sigmas(2, 3.0), guidance_scale=4.0)
    batched = sample(model, x["hidden_states"], cond, uncond, condition=c, **kw)
    separate = sample(model, x["hidden_states"], cond, uncond, condition=c, batch_cfg=False, **kw)
    torch.testing.assert_close(batched, separate, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched, sample(model, x["hidden_states"], cond, uncond, **kw))

    # the unconditional pass keeps the condition (guidance is over the text); depth is zeroed there
    seen = []
    model.register_forward_pre_hook(lambda _m, _a, kwargs: seen.append(kwargs.get("condition")), with_kwargs=True)
    sample(model, x["hidden_states"], cond, uncond, condition=c, batch_cfg=False, sigmas=flow_sigmas(1), guidance_scale=2.0)
    assert len(seen) == 2 and torch.equal(seen[0], c) and torch.equal(seen[1], c)
    d = condition(B=1, channels=5)
    u = unconditional_condition(d)
    assert torch.equal(u[:, :4], d[:, :4]) and not u[:, 4].any() and d[:, 4].any()
    assert unconditional_condition(None) is None


def test_export_round_trip_with_the_adapter(tmp_path):
    from tests.helpers_ckpt import build_model, run_config, write_checkpoint
    from vchitect.export import VchitectPipeline, export

    adapter = dict(ADAPTER, condition_vae_spatial_factor=1)  # the export test model is pixel-size-agnostic
    model = build_model(0, **adapter)
    with torch.no_grad():
        torch.nn.init.normal_(model.condition_adapter.conv_out.weight, std=0.05)
    write_checkpoint(tmp_path / "run", 3, model, run_config(adapter))
    out = export(tmp_path / "run", tmp_path / "pipe")
    assert (out / "transformer" / "vchitect_models_condition_adapter.py").is_file()  # shipped for remote code
    pipe = VchitectPipeline.from_pretrained(out)
    g = torch.Generator().manual_seed(0)
    x = dict(hidden_states=torch.randn(1, 4, 3, 8, 8, generator=g),
             encoder_hidden_states=torch.randn(1, 4, 16, generator=g),
             pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([500.0]))
    c = condition(B=1, F=5, H=8, W=8)
    with torch.no_grad():
        want = model(**x, condition=c).sample
        got = pipe.transformer.float()(**x, condition=c).sample
    assert pipe.transformer.config.condition_channels == 4
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want, model(**x).sample.detach())
