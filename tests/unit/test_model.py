"""The Vchitect-2.0 transformer: shapes, zero-init branches, text masking, save/load, gradients."""

import dataclasses

import pytest
import torch

from tests.helpers_models import inputs
from vchitect.config import ModelConfig
from vchitect.models import VchitectTransformer3DModel

TINY = dict(sample_size=16, in_channels=4, num_layers=3, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=16)


def tiny_model(seed: int = 0, **overrides) -> VchitectTransformer3DModel:
    torch.manual_seed(seed)
    return VchitectTransformer3DModel(**{**TINY, **overrides})


def randomise_(model: torch.nn.Module, scale: float = 0.05) -> None:
    """Perturb every parameter so zero-initialised branches are live."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


@pytest.mark.parametrize("F,H,W", [(1, 8, 8), (3, 8, 12), (5, 16, 6), (2, 4, 4)])
def test_output_shape(F, H, W):
    model = tiny_model()
    out = model(**inputs(B=2, F=F, H=H, W=W)).sample
    assert out.shape == (2, 4, F, H, W)
    assert torch.isfinite(out).all()


def test_config_fields_are_model_arguments():
    # One config tree: every ModelConfig field is a model init argument (and vice versa).
    model = VchitectTransformer3DModel(**dataclasses.asdict(ModelConfig(num_layers=1, num_attention_heads=2,
                                                                        attention_head_dim=8)))
    assert set(dataclasses.asdict(ModelConfig())) <= set(model.config)


def test_grid_larger_than_table_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="larger than the 16×16 position table"):
        model(**inputs(H=34, W=8))
    with pytest.raises(ValueError, match="divisible by patch_size=2"):
        model(**inputs(H=7, W=8))


def test_position_table_is_centre_cropped():
    model = tiny_model()
    pe = model.pos_embed
    full = pe.pos_embed.reshape(16, 16, -1)
    crop = pe.cropped_table(4, 6).reshape(4, 6, -1)
    assert torch.equal(crop, full[6:10, 5:11])


def test_fresh_model_equals_model_without_temporal_and_cross_branches():
    model = tiny_model().eval()
    x = inputs(F=4)
    with torch.no_grad():
        full = model(**x).sample
        # Remove the branches: the attention then is spatial only.
        for block in model.transformer_blocks:
            attn = block.attn
            attn.forward = _spatial_only(attn)
        ablated = model(**x).sample
    assert torch.equal(full, ablated)


def _spatial_only(attn):
    """A reference attention with only the spatial joint branch (same kernel and layout)."""
    from vchitect.models.attention import dot_product_attention

    def forward(x, ctx, num_frames, rope, text_mask=None):
        S = x.shape[1]
        heads = lambda t: t.unflatten(-1, (attn.heads, attn.head_dim))  # noqa: E731
        q = heads(attn.to_q(x))
        if not attn.context_pre_only:
            q = torch.cat([q, heads(attn.add_q_proj(ctx))], 1)
        k = torch.cat([heads(attn.to_k(x)), heads(attn.add_k_proj(ctx))], 1)
        v = torch.cat([heads(attn.to_v(x)), heads(attn.add_v_proj(ctx))], 1)
        o = dot_product_attention(q, k, v).flatten(2) * attn.spatial_scale
        video = attn.to_out[0](o[:, :S])
        text = None if attn.context_pre_only else attn.to_add_out(o[:, S:])
        return video, text
    return forward


def test_temporal_and_cross_branches_change_output_once_trained():
    model = tiny_model().eval()
    randomise_(model)
    x = inputs(F=4)
    with torch.no_grad():
        full = model(**x).sample
        for block in model.transformer_blocks:
            block.attn.forward = _spatial_only(block.attn)
        ablated = model(**x).sample
    assert (full - ablated).abs().max() > 1e-3


def test_single_frame_has_no_temporal_contribution():
    model = tiny_model().eval()
    randomise_(model)
    x = inputs(F=1)
    with torch.no_grad():
        before = model(**x).sample
        for block in model.transformer_blocks:
            torch.nn.init.normal_(block.attn.to_out_temporal.weight)
            torch.nn.init.normal_(block.attn.to_add_out_temporal.weight)
        after = model(**x).sample
    assert torch.equal(before, after)


def test_batch_elements_are_independent():
    model = tiny_model().eval()
    randomise_(model)
    x = inputs(B=3, F=3)
    with torch.no_grad():
        batched = model(**x).sample
        for i in range(3):
            single = model(**{k: v[i:i + 1] for k, v in x.items()}).sample
            torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("F", [1, 3])
def test_masked_text_padding_does_not_change_output(F):
    model = tiny_model().eval()
    randomise_(model)
    x = inputs(B=2, F=F, L=5)
    padded = dict(x)
    junk = torch.randn(2, 4, 24) * 10
    padded["encoder_hidden_states"] = torch.cat([x["encoder_hidden_states"], junk], dim=1)
    padded["encoder_attention_mask"] = torch.cat([torch.ones(2, 5), torch.zeros(2, 4)], 1).bool()
    with torch.no_grad():
        ref = model(**x).sample
        out = model(**padded).sample
        unmasked = model(**{k: v for k, v in padded.items() if k != "encoder_attention_mask"}).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (unmasked - ref).abs().max() > 1e-3  # the mask is what keeps the junk out


def test_qk_norm_option_builds_and_runs():
    model = tiny_model(qk_norm="rms_norm")
    names = {n for n, _ in model.named_parameters()}
    assert "transformer_blocks.0.attn.norm_q.weight" in names
    assert model(**inputs()).sample.shape == (2, 4, 3, 8, 12)


@pytest.mark.parametrize("backend", ["flash_attn", "te"])
def test_missing_attention_backend_names_the_extra(backend, monkeypatch):
    # Pretend the optional kernel is absent (it is on CPU machines; this keeps the test honest on GPUs).
    monkeypatch.setattr("vchitect.models.attention.importlib.util.find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"vchitect\[gpu\]"):
        tiny_model(attention_backend=backend)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model().eval()
    randomise_(model)
    model.save_pretrained(tmp_path / "m")
    loaded = VchitectTransformer3DModel.from_pretrained(tmp_path / "m").eval()
    x = inputs()
    with torch.no_grad():
        assert torch.equal(model(**x).sample, loaded(**x).sample)


def test_every_parameter_gets_a_gradient_after_one_step():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):  # after the first step the zero-initialised outputs are non-zero
        opt.zero_grad(set_to_none=True)
        x = inputs(F=3)
        target = torch.randn_like(x["hidden_states"])
        loss = torch.nn.functional.mse_loss(model(**x).sample, target)
        loss.backward()
        opt.step()
    unused = set(model.unused_parameter_names())
    for name, p in model.named_parameters():
        if name in unused:
            assert p.grad is None, f"{name} is documented unused but received a gradient"
            continue
        assert p.grad is not None, f"{name} received no gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_fully_masked_text_row_is_a_clear_error():
    x = inputs(B=2)
    x["encoder_attention_mask"] = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]]).bool()
    with pytest.raises(ValueError, match=r"rows \[1\] mask out every text token"):
        tiny_model()(**x)


@pytest.mark.parametrize("frame_pos_embed", ["none", "sincos"])
def test_frame_position_embedding_tells_identical_frames_apart(frame_pos_embed):
    """Without an absolute frame position, frames with identical content get identical outputs (the
    temporal RoPE is relative and every value is the same); the sin-cos frame table breaks that tie,
    which is what lets a small model place an object by frame index (docs/demo.md)."""
    model = tiny_model(frame_pos_embed=frame_pos_embed).eval()
    randomise_(model)
    x = inputs(F=4)
    x["hidden_states"] = x["hidden_states"][:, :, :1].expand(-1, -1, 4, -1, -1).contiguous()
    with torch.no_grad():
        out = model(**x).sample
    spread = (out - out[:, :, :1]).abs().max().item()
    if frame_pos_embed == "none":
        assert spread < 1e-5
    else:
        assert spread > 1e-3


def test_frame_position_table_is_sin_cos_of_the_scaled_frame_index():
    from vchitect.models.embeddings import frame_sincos_table

    t = frame_sincos_table(5, 8, scaling_factor=2.0)
    assert t.shape == (5, 8)
    assert torch.equal(t[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    torch.testing.assert_close(t[4, 0], torch.sin(torch.tensor(2.0)))     # position 4 / 2, frequency 1
    torch.testing.assert_close(t[4, 5], torch.cos(torch.tensor(2.0 * 10000 ** -0.25)))
    with pytest.raises(ValueError, match="frame_pos_embed"):
        tiny_model(frame_pos_embed="learned")


def test_sample_prediction_turns_the_networks_x0_into_the_velocity():
    """prediction='sample': the last layer predicts x0 and forward returns (x_t − x0) / max(t, t_min), so
    the same weights as a velocity model give exactly that transform of its output."""
    x = inputs(F=3)
    x["timestep"] = torch.tensor([700.0, 10.0])  # t = 0.7, and t = 0.01 < t_min = 0.05
    v_model, x_model = tiny_model(), tiny_model(prediction="sample")
    randomise_(v_model), randomise_(x_model)
    with torch.no_grad():
        raw = v_model(**x).sample  # identical weights: the x0 the sample model predicts
        v = x_model(**x).sample
    t = torch.tensor([0.7, 0.05]).view(2, 1, 1, 1, 1)
    torch.testing.assert_close(v, (x["hidden_states"] - raw) / t, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="out_channels"):
        tiny_model(prediction="sample", out_channels=8)
