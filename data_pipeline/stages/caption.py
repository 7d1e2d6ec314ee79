"""Captions: source captions pass through; a VLM (transformers, local path) fills the rest.

:class:`VLMCaptioner` takes the middle sampled frame of each clip and generates with any
image-text-to-text model whose processor takes ``images=`` (BLIP, LLaVA, Qwen2-VL, Idefics…);
when the processor has a chat template the prompt is wrapped in it. The same code runs a tiny
random model on CPU in tests and a 7B model on a GPU actor.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def source_caption(item, start: float, end: float) -> Optional[str]:
    """The timed source segment overlapping [start, end] the most, else the whole-video caption."""
    best, best_overlap = None, 0.0
    for seg in item.segments or []:
        overlap = min(end, float(seg["end"])) - max(start, float(seg["start"]))
        if overlap > best_overlap and seg.get("caption"):
            best, best_overlap = seg["caption"], overlap
    return best or item.caption or None


class _SafeDict(dict):
    def __missing__(self, key):
        return "unknown"


def apply_template(template: Optional[str], caption: str, meta: dict) -> str:
    """``template`` formatted with the caption, every score and camera motion (missing → unknown)."""
    if not template:
        return caption
    fields = _SafeDict(caption=caption, camera_motion=meta.get("camera_motion", "unknown"))
    fields.update({k: v for k, v in meta.get("scores", {}).items()})
    try:
        return template.format_map(fields)
    except (ValueError, TypeError):  # a format spec applied to "unknown"
        return template.replace("{caption}", caption)


class VLMCaptioner:
    """Batched captioning with a local transformers vision-language model."""

    def __init__(self, path: str, *, prompt: str = "", max_new_tokens: int = 48,
                 dtype: str = "float32", device: Optional[str] = None):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.name = path.rstrip("/").rsplit("/", 1)[-1]
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and getattr(tok, "padding_side", None) != "left":
            tok.padding_side = "left"  # decoder-only generation needs left padding in a batch

    def _text(self) -> Optional[str]:
        template = getattr(self.processor, "chat_template", None)
        if template:
            messages = [{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": self.prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return None  # captioning models (BLIP) caption from the image alone

    def __call__(self, images: Sequence[np.ndarray]) -> list[str]:
        """One caption per RGB uint8 image."""
        if not images:
            return []
        torch = self.torch
        text = self._text()
        kwargs = {"images": list(images), "return_tensors": "pt"}
        if text is not None:
            kwargs["text"] = [text] * len(images)
            kwargs["padding"] = True
        inputs = self.processor(**kwargs).to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        if text is not None and "input_ids" in inputs:
            out = out[:, inputs["input_ids"].shape[1]:]
        return [c.strip() for c in self.processor.batch_decode(out, skip_special_tokens=True)]
