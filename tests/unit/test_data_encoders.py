"""Encoders load from local folders (tiny random real classes) and the encode step fills a batch."""

from __future__ import annotations

import pytest
import torch

from vchitect.data import encode_batch
from vchitect.data.encode import pixels_to_unit
from vchitect.models.encoders import load_text_encoder, load_vae

WORDS = "a the cat dog runs on grass red car city at night slowly over bridge".split()


def save_tokenizer(path, max_len=16):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   eos_token="</s>", model_max_length=max_len)
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from diffusers import AutoencoderKL, AutoencoderKLWan
    from transformers import (BertConfig, BertModel, CLIPTextConfig, CLIPTextModelWithProjection, T5Config,
                              T5EncoderModel)

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=32, d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32)
                   ).save_pretrained(root / "t5")
    save_tokenizer(root / "t5")
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=12, eos_token_id=2)).save_pretrained(root / "clip")
    save_tokenizer(root / "clip")
    BertModel(BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)).save_pretrained(root / "bert")
    save_tokenizer(root / "bert")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=32, scaling_factor=0.5, shift_factor=0.1).save_pretrained(root / "pipe" / "vae")
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[True],
                     latents_mean=[0.5] * 4, latents_std=[2.0] * 4).save_pretrained(root / "wan")
    return root


def test_text_encoders_share_one_interface(folders):
    prompts = ["a red car at night", "the cat runs"]
    t5 = load_text_encoder(folders / "t5", "t5", max_length=8)
    hidden, mask, pooled = t5.encode(prompts)
    assert hidden.shape == (2, 8, 16) and mask.dtype == torch.bool and pooled.shape == (2, 16)
    assert mask.sum(1).tolist() == [5, 3]
    assert torch.allclose(pooled[1], hidden[1, :3].mean(0), atol=1e-5)  # masked mean
    clip = load_text_encoder(folders / "clip", "clip", max_length=8)
    _, _, cpooled = clip.encode(prompts)
    assert cpooled.shape == (2, 12)
    sd3 = load_text_encoder(folders / "t5", "t5", max_length=8, pooled_path=folders / "clip")
    h2, _, p2 = sd3.encode(prompts)
    assert torch.equal(h2, hidden) and p2.shape == (2, 12)
    sent = load_text_encoder(folders / "bert", "sentence", max_length=8)  # MiniLM-style AutoModel
    _, _, spooled = sent.encode(prompts)
    assert torch.allclose(spooled.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_text_encoder(folders / "missing", "t5")


def test_vae_wrappers_image_and_video(folders):
    x = pixels_to_unit(torch.randint(0, 256, (2, 3, 5, 16, 16), dtype=torch.uint8))
    assert x.min() >= -1 and x.max() <= 1
    vae2d = load_vae(folders / "pipe")  # a pipeline folder: uses its vae/ subfolder
    z = vae2d.encode(x)
    assert z.shape == (2, 4, 5, 8, 8)  # per frame
    frame = x[:, :, 2]
    ref = (vae2d.vae.encode(frame).latent_dist.mode() - 0.1) * 0.5
    assert torch.allclose(z[:, :, 2], ref, atol=1e-5)
    wan = load_vae(folders / "wan")
    zw = wan.encode(x)
    assert zw.shape == (2, 4, 3, 8, 8)  # causal temporal downsampling
    raw = wan.vae.encode(x).latent_dist.mode()
    assert torch.allclose(zw, (raw - 0.5) / 2.0, atol=1e-5)


def test_encode_batch_turns_a_decode_batch_into_latents(folders):
    from vchitect.config import from_dict
    from vchitect.data import DataConfig, load_encoders

    cfg = from_dict(DataConfig, {"sources": [{"uri": "x"}], "mode": "decode", "text": {"max_length": 8},
                                 "encoders": {"vae_path": str(folders / "pipe"), "dtype": "float32",
                                              "text_encoder_path": str(folders / "t5")}})
    vae, te = load_encoders(cfg)
    with pytest.raises(ValueError, match="needs data.encoders.vae_path"):
        load_encoders(from_dict(DataConfig, {"sources": [{"uri": "x"}], "mode": "decode"}))
    assert load_encoders(from_dict(DataConfig, {"sources": [{"uri": "x"}], "mode": "auto"})) == (None, None)
    batch = {"pixels": torch.randint(0, 256, (2, 3, 1, 16, 16), dtype=torch.uint8),
             "captions": ["a dog", "the city at night"], "keys": ["k0", "k1"], "bucket": (16, 16, 1)}
    out = encode_batch(batch, vae, te)
    assert "pixels" not in out and out["latents"].shape == (2, 4, 1, 8, 8)
    assert out["text"].shape == (2, 8, 16) and out["text_mask"].shape == (2, 8)
    assert out["pooled"].shape == (2, 16) and out["keys"] == ["k0", "k1"]
    with pytest.raises(ValueError, match="no VAE"):
        encode_batch(batch, None, te)
    pre = {"latents": torch.zeros(1, 4, 1, 2, 2), "text": torch.zeros(1, 8, 16),
           "text_mask": torch.ones(1, 8, dtype=torch.bool), "pooled": torch.zeros(1, 16), "captions": ["x"]}
    assert encode_batch(pre)["latents"] is pre["latents"]  # precomputed: nothing to encode


def test_text_cache_encodes_each_caption_once_and_keeps_the_newest(folders):
    prompts = ["a red car at night", "the cat runs", "a red car at night"]
    plain = load_text_encoder(folders / "t5", "t5", max_length=8)
    cached = load_text_encoder(folders / "t5", "t5", max_length=8, cache_size=2)
    calls = []
    inner = cached._encode
    cached._encode = lambda ps: calls.append(list(ps)) or inner(ps)
    for _ in range(2):
        for got, want in zip(cached.encode(prompts), plain.encode(prompts)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert calls == [["a red car at night", "the cat runs"]]  # duplicates and repeats: no second encode
    cached.encode(["the dog"])  # capacity 2: the least recently used caption goes
    assert list(cached._cache) == ["a red car at night", "the dog"]
