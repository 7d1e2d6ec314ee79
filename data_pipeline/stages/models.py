"""Model stages applied to a whole :class:`InputResult`: OCR / NSFW / aesthetic filters, captions.

Each class loads its models once (one per Ray actor) and is called on a list of results.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from .caption import VLMCaptioner, apply_template, source_caption
from .clip import InputResult, sample_frames_rgb
from .filters import AestheticScorer, NSFWScorer, TextAreaScorer, check
from .probe import Rejected

log = logging.getLogger("vchitect.curate")


class ModelFilters:
    """OCR text area, NSFW and (when configured) aesthetic score for every clip."""

    def __init__(self, cfg):
        f = cfg.filters
        self.f = f
        self.ocr = TextAreaScorer(det_limit=cfg.split.analysis_size) if f.ocr else None
        self.nsfw = NSFWScorer() if f.nsfw else None
        self.aesthetic = (AestheticScorer(f.aesthetic_clip_path, f.aesthetic_head_path)
                          if f.aesthetic_clip_path else None)

    def __call__(self, results: list[InputResult]) -> list[InputResult]:
        for res in results:
            kept = []
            for clip in res.clips:
                frames = sample_frames_rgb(clip)
                scores = clip.meta["scores"]
                try:
                    if self.ocr is not None:
                        scores["text_area"] = round(float(np.mean([self.ocr(x) for x in frames])), 6)
                        check("ocr", scores["text_area"], None, self.f.max_text_area)
                    if self.nsfw is not None:
                        scores["nsfw"] = round(max(self.nsfw(x) for x in frames), 6)
                        check("nsfw", scores["nsfw"], None, self.f.max_nsfw)
                    if self.aesthetic is not None:
                        scores["aesthetic"] = round(self.aesthetic(frames), 6)
                        check("aesthetic", scores["aesthetic"], self.f.min_aesthetic)
                except Rejected as err:
                    res.reject("filter", err, clip=clip.clip, start=clip.start, end=clip.end)
                    continue
                except Exception as exc:  # a model failing on one clip rejects that clip only
                    log.exception("curate: model filter failed on %s clip %d", res.uri, clip.clip)
                    res.reject("filter", Rejected("filter_error", f"{type(exc).__name__}: {exc}"),
                               clip=clip.clip, start=clip.start, end=clip.end)
                    continue
                kept.append(clip)
            res.clips = kept
        return results


def attach_source_captions(res: InputResult, item, mode: str) -> None:
    """Give each clip its source caption (unless ``mode`` is "vlm")."""
    if mode == "vlm":
        return
    for clip in res.clips:
        src = source_caption(item, clip.start, clip.end)
        if src:
            clip.caption, clip.caption_source = src, "source"


class Captioner:
    """Source caption when present (and allowed), else the VLM; then the optional template."""

    def __init__(self, cfg, device: Optional[str] = None):
        c = cfg.caption
        self.c = c
        self.vlm = None
        if c.vlm_path and c.mode in ("vlm", "source_or_vlm"):
            self.vlm = VLMCaptioner(c.vlm_path, prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                                    dtype=c.dtype, device=device)

    def __call__(self, results: list[InputResult], items: Optional[dict] = None) -> list[InputResult]:
        """Caption every clip; ``items`` (source_id → SourceItem) supplies source captions unless
        :func:`attach_source_captions` already did."""
        todo = []  # (res, clip) needing the VLM
        for res in results:
            if items is not None:
                attach_source_captions(res, items[res.source_id], self.c.mode)
            todo.extend((res, clip) for clip in res.clips if not clip.caption)
        if todo and self.vlm is not None:
            images = []
            for _res, clip in todo:
                frames = sample_frames_rgb(clip)
                images.append(frames[len(frames) // 2])
            captions = self.vlm(images)
            for (_res, clip), cap in zip(todo, captions):
                if cap:
                    clip.caption, clip.caption_source = cap, f"vlm:{self.vlm.name}"
        for res in results:
            kept = []
            for clip in res.clips:
                if not clip.caption:
                    why = ("no source caption and no VLM configured (caption.vlm_path)"
                           if self.vlm is None else "the VLM returned an empty caption")
                    res.reject("caption", Rejected("no_caption", why), clip=clip.clip,
                               start=clip.start, end=clip.end)
                    continue
                clip.meta["caption_source"] = clip.caption_source
                clip.meta["raw_caption"] = clip.caption
                clip.caption = apply_template(self.c.template, clip.caption, clip.meta)
                kept.append(clip)
            res.clips = kept
        return results
