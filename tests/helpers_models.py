"""Tiny randomly initialised models of real transformers classes, saved to a local folder.

Tests (and anyone without weights) use them to drive the real loading and inference code paths:
the captioner loads them exactly as it would load a 7B checkpoint from a local path.
"""

from __future__ import annotations

import os

import numpy as np

WORDS = ("a red green blue yellow purple orange circle square triangle moves from left right to "
         "top bottom the video shows shape on background").split()


def inputs(B=2, F=3, H=8, W=12, L=5, seed=1) -> dict:
    """Random forward() inputs of the tiny transformers of tests/unit/test_model.py and
    test_condition_adapter.py (4 latent channels, text width 24, pooled width 12)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(B, 4, F, H, W, generator=g),
                encoder_hidden_states=torch.randn(B, L, 24, generator=g),
                pooled_projections=torch.randn(B, 12, generator=g),
                timestep=torch.rand(B, generator=g) * 1000)


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


def save_tiny_depth_anything(folder: str, seed: int = 0, size: int = 28) -> str:
    """A tiny Depth-Anything (DepthAnythingForDepthEstimation on a 4-layer, 16-wide Dinov2 backbone)
    and its DPT image processor (frames resized to ``size``², a multiple of the 14-px patch).

    transformers' own init leaves the ReLU head at ~1e-8 everywhere; the weights are redrawn at unit
    gain and the last bias set to 1, so the map varies with the picture (a test can tell frames apart).
    """
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config

    try:
        from transformers import DPTImageProcessorPil as Processor  # no torchvision needed
    except ImportError:
        from transformers import DPTImageProcessor as Processor

    torch.manual_seed(seed)
    backbone = Dinov2Config(image_size=size, patch_size=14, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=32, out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    cfg = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16, neck_hidden_sizes=[8, 8, 16, 16],
                              fusion_hidden_size=8, head_hidden_size=8)
    model = DepthAnythingForDepthEstimation(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
        model.head.conv3.bias.fill_(1.0)
    model.save_pretrained(folder)
    Processor(size={"height": size, "width": size}, keep_aspect_ratio=False, ensure_multiple_of=14,
              do_pad=False).save_pretrained(folder)
    return folder


def depth_reference(model_path: str, mp4: bytes) -> np.ndarray:
    """What depth.mp4 of a clip must hold, computed here without the curation stage: every frame of
    ``mp4`` through the processor and the model in one batch, resized to the clip by the processor's
    post-processing, then 255 · (v − min) / (max − min) over the whole clip (a disparity model:
    near = bright), rounded. uint8 F×H×W."""
    import io

    import av
    import torch
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    with av.open(io.BytesIO(mp4)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]
    processor = AutoImageProcessor.from_pretrained(model_path)
    model = AutoModelForDepthEstimation.from_pretrained(model_path).eval()
    with torch.no_grad():
        out = model(**processor(images=frames, return_tensors="pt"))
    size = frames[0].shape[:2]
    maps = torch.stack([r["predicted_depth"].reshape(size) for r in
                        processor.post_process_depth_estimation(out, target_sizes=[size] * len(frames))]).numpy()
    lo, hi = maps.min(), maps.max()
    return np.clip(np.rint((maps - lo) / (hi - lo) * 255), 0, 255).astype(np.uint8)


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


# ------------------------------------------------------------------ SD3 text stack (CLIP-L + CLIP-G + T5)
SD3_WIDTHS = {"clip_l": 32, "clip_g": 48, "t5": 96, "proj_l": 32, "proj_g": 48}  # CLIP concat 80 < T5 96


def _sd3_clip_vocab() -> tuple[dict, list]:
    """A byte-level BPE vocabulary in CLIP's format: single characters (also with the end-of-word
    marker ``</w>``), one merge chain per demo word, start / end tokens last (the end token has the largest
    id, as in the real CLIP vocabulary, where the legacy pooling takes the argmax id)."""
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyz0123456789,.!"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        parts = [*w[:-1], w[-1] + "</w>"]
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(parts[0] + parts[1], len(vocab))
            parts = [parts[0] + parts[1], *parts[2:]]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


def _sd3_t5_pieces() -> list[tuple[str, float]]:
    """A Unigram vocabulary in T5's layout: <pad> 0, </s> 1, <unk> 2, then whole words and characters."""
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789,.!"))
    return ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
            + [(f"▁{w}", -1.0 - 0.01 * i) for i, w in enumerate(WORDS)] + [(c, -5.0) for c in chars])


def _write_spiece_model(path: str, pieces: list[tuple[str, float]]) -> None:
    """A sentencepiece ``spiece.model`` (the ModelProto protobuf, written without the sentencepiece package)
    holding ``pieces`` — what a real SD3 tokenizer_3/ ships beside its tokenizer.json."""
    from transformers.utils import sentencepiece_model_pb2_new as spm

    m = spm.ModelProto()
    for piece, score in pieces:
        p = m.pieces.add()
        p.piece, p.score = piece, score
        p.type = {"<pad>": 3, "</s>": 3, "<unk>": 2}.get(piece, 1)  # CONTROL, UNKNOWN, NORMAL
    m.trainer_spec.model_type = 1  # UNIGRAM
    m.trainer_spec.unk_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id, m.trainer_spec.bos_id = 2, 1, 0, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    with open(path, "wb") as f:
        f.write(m.SerializeToString())


def save_tiny_sd3_encoders(folder: str, seed: int = 0) -> str:
    """An SD3-style pipeline folder with tiny random text encoders: text_encoder/ (CLIP-L, width 32),
    text_encoder_2/ (CLIP-G, 48), text_encoder_3/ (T5 encoder, 96) and tokenizer/, tokenizer_2/ (CLIP BPE;
    CLIP-L pads with the end token, CLIP-G with "!", as the real ones do), tokenizer_3/ (T5 Unigram:
    tokenizer.json + spiece.model). Deterministic for a seed; no download. Returns ``folder``."""
    import torch
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5Tokenizer)

    vocab, merges = _sd3_clip_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    for sub, width, proj, pad, s in (("", SD3_WIDTHS["clip_l"], SD3_WIDTHS["proj_l"], "<|endoftext|>", 0),
                                     ("_2", SD3_WIDTHS["clip_g"], SD3_WIDTHS["proj_g"], "!", 1)):
        torch.manual_seed(seed * 10 + s)
        cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
                             num_attention_heads=2, max_position_embeddings=77, projection_dim=proj,
                             hidden_act="quick_gelu" if not sub else "gelu", bos_token_id=bos, eos_token_id=eos,
                             pad_token_id=vocab[pad])
        CLIPTextModelWithProjection(cfg).eval().save_pretrained(os.path.join(folder, f"text_encoder{sub}"))
        CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad, model_max_length=77).save_pretrained(
            os.path.join(folder, f"tokenizer{sub}"))
    torch.manual_seed(seed * 10 + 2)
    pieces = _sd3_t5_pieces()
    T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=SD3_WIDTHS["t5"], d_kv=16, num_heads=3, num_layers=2,
                            d_ff=128, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                            relative_attention_max_distance=32, pad_token_id=0, eos_token_id=1,
                            tie_word_embeddings=False)).eval().save_pretrained(os.path.join(folder, "text_encoder_3"))
    tok3 = os.path.join(folder, "tokenizer_3")
    T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512).save_pretrained(tok3)
    _write_spiece_model(os.path.join(tok3, "spiece.model"), pieces)
    return folder
