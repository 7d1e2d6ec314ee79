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
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return BertTokenizerFast(vocab_file=vocab, do_lower_case=True)


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
    model.generation_config.min_new_tokens = 4  # random weights would often stop at once
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
