"""Tiny randomly initialised models of real transformers classes, saved to a local folder.

Tests (and anyone without weights) use them to drive the real loading and inference code paths:
the captioner loads them exactly as it would load a 7B checkpoint from a local path.
"""

from __future__ import annotations

import os

WORDS = ("a red green blue yellow purple orange circle square triangle moves from left right to "
         "top bottom the video shows shape on background").split()


def _tokenizer(folder: str):
    from transformers import BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(tokens) + "\n")
    import inspect

    if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers >= 5
        tok = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=True)
    else:
        tok = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    if len(tok) != len(tokens):
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, expected {len(tokens)}")
    return tok


def save_tiny_blip(folder: str, seed: int = 0) -> str:
    """A tiny BLIP image-captioning model (BlipForConditionalGeneration) and its processor."""
    import torch
    from transformers import (BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    torch.manual_seed(seed)
    tok = _tokenizer(os.path.join(folder, "_tok"))
    vocab_size = len(tok)
    cfg = BlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=64,
                         encoder_hidden_size=32, bos_token_id=tok.cls_token_id,
                         pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id,
                         eos_token_id=tok.sep_token_id),
        projection_dim=32,
    )
    model = BlipForConditionalGeneration(cfg).eval()
    # Random weights would often emit only special tokens (dropped when decoding): push their
    # output bias down so the tiny model always says words until max_new_tokens.
    with torch.no_grad():
        bias = model.text_decoder.cls.predictions.bias
        for tid in (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
                    tok.mask_token_id):
            bias[tid] = -1e4
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                              tokenizer=tok)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def save_tiny_clip_aesthetic(folder: str, seed: int = 0) -> tuple[str, str]:
    """A tiny CLIP (random) plus a linear aesthetic head; returns (clip_path, head_path)."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        projection_dim=16,
    )
    clip_path = os.path.join(folder, "clip")
    CLIPModel(cfg).save_pretrained(clip_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip_path)
    head_path = os.path.join(folder, "head.safetensors")
    save_file({"weight": torch.zeros(1, 16), "bias": torch.full((1,), 5.0)}, head_path)
    return clip_path, head_path


def write_bad_inputs(folder: str, good_video: str | None = None) -> dict[str, str]:
    """Files every run must reject (and survive): file name → expected rejection reason.

    Names carry spaces, quotes and shell metacharacters on purpose.
    """

    import av
    import numpy as np

    os.makedirs(folder, exist_ok=True)
    expected = {}

    def path(name):
        return os.path.join(folder, name)

    open(path("zero byte.mp4"), "wb").close()
    expected["zero byte.mp4"] = "empty_file"

    with open(path("it's text $(rm -rf).mp4"), "w") as f:
        f.write("not a video; `echo pwned` && $HOME\n" * 20)
    expected["it's text $(rm -rf).mp4"] = "not_a_video"

    if good_video:
        with open(good_video, "rb") as f:
            data = f.read()
        with open(path('truncated "half".mp4'), "wb") as f:
            f.write(data[: len(data) // 2])
        expected['truncated "half".mp4'] = "not_a_video"

    with av.open(path("audio only.mp4"), mode="w") as out:
        st = out.add_stream("aac", rate=16000)
        st.layout = "mono"
        for i in range(10):
            fr = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            fr.sample_rate = 16000
            fr.pts = i * 1024
            for p in st.encode(fr):
                out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    expected["audio only.mp4"] = "no_video_stream"

    # 10000×10000: a single grayscale PNG frame is quick to write; the probe must reject it from
    # the container metadata, before any frame is decoded.
    with av.open(path("huge 10000x10000.mp4"), mode="w", format="mp4") as out:
        st = out.add_stream("png", rate=1)
        st.width = st.height = 10000
        st.pix_fmt = "gray"
        fr = av.VideoFrame(10000, 10000, "gray")
        fr.pts = 0
        for p in st.encode(fr):
            out.mux(p)
        for p in st.encode(None):
            out.mux(p)
    expected["huge 10000x10000.mp4"] = "frame_too_large"

    # Zero duration: a one-frame H.264 mp4 whose movie, track and media headers declare 0.
    from data_pipeline.video import encode_frames

    data = bytearray(encode_frames([np.zeros((64, 64, 3), np.uint8)], 12))
    for tag, offset in ((b"mvhd", 16), (b"mdhd", 16), (b"tkhd", 20)):
        i = data.find(tag)
        if i >= 0 and data[i + 4] == 0:  # version 0 boxes: 32-bit duration at this offset
            data[i + 4 + offset:i + 8 + offset] = b"\0\0\0\0"
    with open(path("zero duration.mp4"), "wb") as f:
        f.write(bytes(data))
    expected["zero duration.mp4"] = "zero_duration"

    os.symlink(path("does-not-exist.mp4"), path("broken link.mp4"))
    expected["broken link.mp4"] = "unreadable"
    return expected


def save_tiny_latent_models(folder: str, seed: int = 0) -> tuple[str, str]:
    """A tiny diffusers AutoencoderKL and a tiny CLIP text encoder + tokenizer; (vae, text) paths."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae_path = os.path.join(folder, "tiny-vae")
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=32,
                  scaling_factor=0.5).save_pretrained(vae_path)
    text_path = os.path.join(folder, "tiny-text")
    tok = _tokenizer(os.path.join(folder, "_tok_text"))
    CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id,
                                 bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)).save_pretrained(text_path)
    tok.save_pretrained(text_path)
    return vae_path, text_path
