"""The sd3 text encoder (CLIP-L + CLIP-G + T5, the released Vchitect-2.0 conditioning) on tiny random models.

``released`` mode is diffusers' ``StableDiffusion3Pipeline.encode_prompt`` bit for bit (prompts, the empty
prompt, the negative prompt with classifier-free guidance); ``masked`` mode marks the padding rows invalid
and makes the valid rows independent of the padding."""

from __future__ import annotations

import pytest
import torch

from tests.helpers_models import SD3_WIDTHS, save_tiny_sd3_encoders
from vchitect.models.encoders import (CLIP_TOKENS, SD3TextEncoder, folder_identity, load_text_encoder,
                                      text_encoder_folders)

PROMPTS = ["a red circle moves from left to right", "the video shows a blue square on green background", ""]
T5_TOKENS = 256  # max_sequence_length of the release (and diffusers' default)
D, P = SD3_WIDTHS["t5"], SD3_WIDTHS["proj_l"] + SD3_WIDTHS["proj_g"]


@pytest.fixture(scope="module")
def sd3_folder(tmp_path_factory):
    return save_tiny_sd3_encoders(str(tmp_path_factory.mktemp("sd3")))


def _diffusers_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    return StableDiffusion3Pipeline(
        transformer=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(f"{folder}/text_encoder").eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(f"{folder}/text_encoder_2").eval(),
        text_encoder_3=T5EncoderModel.from_pretrained(f"{folder}/text_encoder_3").eval(),
        tokenizer=AutoTokenizer.from_pretrained(f"{folder}/tokenizer"),
        tokenizer_2=AutoTokenizer.from_pretrained(f"{folder}/tokenizer_2"),
        tokenizer_3=AutoTokenizer.from_pretrained(f"{folder}/tokenizer_3"))


@pytest.mark.parametrize("t5_tokens", [T5_TOKENS, 16])
def test_released_mode_is_diffusers_sd3_encode_prompt_exactly(sd3_folder, t5_tokens):
    pipe = _diffusers_pipeline(sd3_folder)
    enc = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + t5_tokens, masks="released")
    with torch.no_grad():
        ref, ref_neg, ref_pooled, ref_neg_pooled = pipe.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt=None,
            max_sequence_length=t5_tokens)
    hidden, mask, pooled = enc.encode(PROMPTS)
    assert hidden.shape == (3, CLIP_TOKENS + t5_tokens, D) and pooled.shape == (3, P)
    assert torch.equal(hidden, ref) and torch.equal(pooled, ref_pooled)
    assert mask.dtype == torch.bool and bool(mask.all())  # released: the transformer attends to every row
    # the CLIP features are zero-padded from 32 + 48 to the T5 width
    assert bool((hidden[:, :CLIP_TOKENS, SD3_WIDTHS["clip_l"] + SD3_WIDTHS["clip_g"]:] == 0).all())
    # negative_prompt=None with CFG is the empty prompt, which is what training's null text encodes
    # (compared at equal batch sizes: a matmul's last bit may depend on the batch size, in both stacks)
    nulls, _, nulls_pooled = enc.encode([""] * 3)
    assert torch.equal(ref_neg, nulls) and torch.equal(ref_neg_pooled, nulls_pooled)
    null, _, null_pooled = enc.encode([""])
    assert torch.allclose(hidden[2], null[0], atol=1e-6)  # "" in a batch is "" alone
    with torch.no_grad():
        _, neg_empty, _, neg_empty_pooled = pipe.encode_prompt(
            PROMPTS[:1], None, None, device="cpu", negative_prompt="", max_sequence_length=t5_tokens)
        _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS[:1], None, None, device="cpu",
                                                   negative_prompt="blue square", max_sequence_length=t5_tokens)
    assert torch.equal(neg_empty, null) and torch.equal(neg_empty_pooled, null_pooled)
    h, _, p = enc.encode(["blue square"])
    assert torch.equal(neg, h) and torch.equal(neg_pooled, p)


def test_released_mode_matches_diffusers_in_bfloat16(sd3_folder):
    pipe = _diffusers_pipeline(sd3_folder).to(torch.bfloat16)
    enc = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + 32, masks="released", dtype="bfloat16")
    with torch.no_grad():
        ref, _, ref_pooled, _ = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                   do_classifier_free_guidance=False, max_sequence_length=32)
    hidden, _, pooled = enc.encode(PROMPTS)
    assert hidden.dtype == torch.bfloat16 and torch.equal(hidden, ref) and torch.equal(pooled, ref_pooled)
    assert not any(p.requires_grad for p in enc.parameters())


def test_masked_mode_marks_padding_invalid_and_ignores_it(sd3_folder):
    enc = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + 24, masks="masked")
    hidden, mask, pooled = enc.encode(PROMPTS)
    assert mask.shape == (3, CLIP_TOKENS + 24) and mask.dtype == torch.bool
    n_clip = [len(enc.tokenizer_l(p).input_ids) for p in PROMPTS]  # <start> words <end>
    n_t5 = [len(enc.tokenizer(p).input_ids) for p in PROMPTS]  # words </s>
    assert n_clip[2] == 2 and n_t5[2] == 1  # the empty prompt keeps valid tokens
    for i in range(3):
        assert mask[i, :CLIP_TOKENS].tolist() == [True] * n_clip[i] + [False] * (CLIP_TOKENS - n_clip[i])
        assert mask[i, CLIP_TOKENS:].tolist() == [True] * n_t5[i] + [False] * (24 - n_t5[i])
    assert enc.describe()["masks"] == "masked" and enc.describe()["kind"] == "sd3"

    # More padding (a longer T5 part) and different padding content leave the valid rows unchanged
    longer = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + 40, masks="masked")
    h2, m2, p2 = longer.encode(PROMPTS)
    assert torch.equal(pooled, p2)
    for i in range(3):
        for part, (a, b) in ((slice(0, CLIP_TOKENS), (hidden, h2)),):
            valid = mask[i, part]
            assert torch.allclose(a[i, part][valid], b[i, part][valid], atol=1e-6)
        t5a = hidden[i, CLIP_TOKENS:][mask[i, CLIP_TOKENS:]]
        t5b = h2[i, CLIP_TOKENS:][m2[i, CLIP_TOKENS:]]
        assert torch.allclose(t5a, t5b, atol=1e-5)

    ids, _ = enc._tokens(enc.tokenizer, PROMPTS[:1], 24)
    other = ids.clone()
    other[0, n_t5[0]:] = 7  # real words where the padding was, still masked
    am = (torch.arange(24) < n_t5[0]).long()[None]
    a = enc.model(input_ids=ids, attention_mask=am).last_hidden_state[0, :n_t5[0]]
    b = enc.model(input_ids=other, attention_mask=am).last_hidden_state[0, :n_t5[0]]
    assert torch.allclose(a, b, atol=1e-5)

    # released mode differs exactly where masking matters: T5's valid rows (bidirectional attention
    # saw the padding) but not CLIP's (causal: the rows before <end> never see it)
    rel, rmask, rpooled = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + 24, masks="released"
                                            ).encode(PROMPTS)
    assert bool(rmask.all()) and torch.allclose(rpooled, pooled, atol=1e-6)
    clip_valid = mask[0, :CLIP_TOKENS]
    assert torch.allclose(rel[0, :CLIP_TOKENS][clip_valid], hidden[0, :CLIP_TOKENS][clip_valid], atol=1e-6)
    t5_valid = mask[0, CLIP_TOKENS:]
    assert not torch.allclose(rel[0, CLIP_TOKENS:][t5_valid], hidden[0, CLIP_TOKENS:][t5_valid], atol=1e-4)


def test_separate_folders_and_identity(sd3_folder, tmp_path):
    import shutil

    for sub, tok, name in (("text_encoder", "tokenizer", "clip-l"), ("text_encoder_2", "tokenizer_2", "clip-g"),
                           ("text_encoder_3", "tokenizer_3", "t5")):
        shutil.copytree(f"{sd3_folder}/{sub}", tmp_path / name)
        for f in (tmp_path.parent / sd3_folder / tok).iterdir():
            shutil.copy(f, tmp_path / name / f.name)
    paths = dict(clip_l_path=tmp_path / "clip-l", clip_g_path=tmp_path / "clip-g", t5_path=tmp_path / "t5")
    a = load_text_encoder(None, "sd3", max_length=CLIP_TOKENS + 16, **paths)
    b = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + 16)
    assert all(torch.equal(x, y) for x, y in zip(a.encode(PROMPTS), b.encode(PROMPTS)))
    folders = text_encoder_folders(sd3_folder, "sd3")
    assert [f.name for f in folders] == ["text_encoder", "text_encoder_2", "text_encoder_3"] == \
        [f.name for f in b.folders]
    assert [d["revision"] for d in a.describe()["encoders"]] == [folder_identity(f)["revision"] for f in folders]
    # a separate path overrides the pipeline folder's subfolder
    mixed = text_encoder_folders(sd3_folder, "sd3", t5_path=tmp_path / "t5")
    assert mixed[2] == tmp_path / "t5" and mixed[0].name == "text_encoder"
    with pytest.raises(FileNotFoundError, match="no text_encoder_2/ .* data.encoders.clip_g_path"):
        text_encoder_folders(tmp_path / "clip-l", "sd3", clip_l_path=tmp_path / "clip-l")


def test_sd3_config_checks(sd3_folder):
    from vchitect.config import ConfigError, from_dict
    from vchitect.data import DataConfig

    def cfg(text=None, **enc):
        return from_dict(DataConfig, {"source": "synthetic", "text": text or {"max_length": 333},
                                      "encoders": {"text_encoder_kind": "sd3", **enc}})

    assert cfg(text_encoder_path=sd3_folder).text.masks == "masked"
    with pytest.raises(ConfigError, match=r"data.text.max_length=77.*333"):
        cfg(text={"max_length": 77})
    with pytest.raises(ConfigError, match="data.text.masks=released"):
        from_dict(DataConfig, {"source": "synthetic", "text": {"masks": "released"}})
    with pytest.raises(ConfigError, match="data.encoders.pooled_encoder_path"):
        cfg(text_encoder_path=sd3_folder, pooled_encoder_path=sd3_folder)
    with pytest.raises(ConfigError, match="data.encoders.clip_l_path"):
        from_dict(DataConfig, {"source": "synthetic", "encoders": {"clip_l_path": sd3_folder}})
    with pytest.raises(ConfigError, match="data.encoders.t5_path"):
        cfg(clip_l_path=sd3_folder, clip_g_path=sd3_folder)
    with pytest.raises(ConfigError, match="data.encoders.shard"):
        from_dict(DataConfig, {"source": "synthetic", "encoders": {"text_encoder_kind": "clip", "shard": True}})


def test_sd3_widths_are_checked_before_training(sd3_folder):
    from vchitect.config import Config, ConfigError, from_dict
    from vchitect.train.preflight import check_encoder_folders

    def run(dim, pooled):
        return from_dict(Config, {"model": {"joint_attention_dim": dim, "pooled_projection_dim": pooled},
                                  "data": {"source": "synthetic", "text": {"max_length": 333, "dim": dim,
                                                                           "pooled_dim": pooled},
                                           "encoders": {"text_encoder_kind": "sd3",
                                                        "text_encoder_path": sd3_folder}}})

    check_encoder_folders(run(D, P))
    with pytest.raises(ConfigError, match=rf"data.text.dim=4096 .* T5 width {D}"):
        check_encoder_folders(run(4096, P))
    with pytest.raises(ConfigError, match=rf"data.text.pooled_dim=2048 .* {P}"):
        check_encoder_folders(run(D, 2048))


def test_cache_and_collective_encoders_run_a_forward_every_call(sd3_folder):
    enc = load_text_encoder(sd3_folder, "sd3", max_length=CLIP_TOKENS + 8, cache_size=4)
    assert isinstance(enc, SD3TextEncoder)
    calls = []
    inner = enc._encode
    enc._encode = lambda ps: calls.append(list(ps)) or inner(ps)
    first = enc.encode(PROMPTS[:2])
    enc.encode(PROMPTS[:2])
    assert calls == [PROMPTS[:2]]
    enc.collective = True  # sharded: the forward is a collective, every rank runs one per call
    again = enc.encode(PROMPTS[:2])
    assert calls == [PROMPTS[:2], [""]] and all(torch.equal(x, y) for x, y in zip(first, again))
