"""A synthetic raw-video corpus with known captions and planted defects.

Each video is a few hard-cut shots; each shot shows one coloured shape moving in one direction
across a plain background, captioned e.g. "a red circle moves right". The vocabulary
below is importable (the demo trains a model to follow colour and direction prompts).

Planted defects, with the filter that must catch them:

==========================  ==================================  ================
file / shot                 defect                              caught by
==========================  ==================================  ================
``defects.mp4`` shot 1      the shape does not move             motion
``defects.mp4`` shot 2      heavy Gaussian blur                 blur
``defects.mp4`` shot 3      large text overlaid                 ocr
``video_0000_copy.mp4``     byte-for-byte copy of video_0000    dedup
``corrupt_truncated.mp4``   first half of a valid mp4           probe
``corrupt_empty.mp4``       zero bytes                          probe
``corrupt_text.mp4``        a text file                         probe
==========================  ==================================  ================

``manifest.jsonl`` lists every file with its timed source captions (``segments``); ``truth.json``
lists every shot with its caption and expected outcome.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from fractions import Fraction

import cv2
import numpy as np

from .video import encode_frames

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 225),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# direction phrase → unit motion (dx, dy) in image coordinates (y grows downwards)
DIRECTIONS: dict[str, tuple[int, int]] = {
    "left to right": (1, 0),
    "right to left": (-1, 0),
    "top to bottom": (0, 1),
    "bottom to top": (0, -1),
}
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (245, 245, 245), (40, 40, 40), (200, 225, 245), (235, 225, 200), (205, 235, 205), (120, 120, 120),
)


# direction → the word of the caption. One distinct word per direction, not "from left to right"
# against "from right to left": a frozen sentence encoder barely separates captions that differ only
# in word order (MiniLM: cosine 0.998), and the demo model then took about twice as many steps to
# learn direction (docs/demo.md).
DIRECTION_WORDS: dict[str, str] = {
    "left to right": "right",
    "right to left": "left",
    "top to bottom": "down",
    "bottom to top": "up",
}


def with_article(word: str) -> str:
    """``word`` after its indefinite article: "an orange", "a red"."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def caption_for(color: str, shape: str, direction: str) -> str:
    return f"{with_article(color)} {shape} moves {DIRECTION_WORDS[direction]}"


@dataclass
class Shot:
    color: str
    shape: str
    direction: str
    background: tuple[int, int, int]
    seconds: float
    defect: str | None = None  # None, "static", "blur", "text"
    offset: float = 0.5        # position across the motion axis, as a fraction of the frame

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape, self.direction)


def draw_shape(img: np.ndarray, shape: str, center: tuple[float, float], radius: float,
               color: tuple[int, int, int]) -> None:
    cx, cy, r = int(round(center[0])), int(round(center[1])), int(round(radius))
    if shape == "circle":
        cv2.circle(img, (cx, cy), r, color, thickness=-1, lineType=cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (cx - r, cy - r), (cx + r, cy + r), color, thickness=-1, lineType=cv2.LINE_AA)
    elif shape == "triangle":
        pts = np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)
        cv2.fillPoly(img, [pts], color, lineType=cv2.LINE_AA)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def render_shot(shot: Shot, width: int, height: int, fps: float) -> list[np.ndarray]:
    n = max(2, int(round(shot.seconds * fps)))
    radius = 0.16 * min(width, height)
    dx, dy = DIRECTIONS[shot.direction]
    frames = []
    for i in range(n):
        p = 0.0 if shot.defect == "static" else i / (n - 1)
        along = 0.15 + 0.7 * p  # from 15% to 85% of the axis
        if dx:
            x = width * (along if dx > 0 else 1 - along)
            y = height * shot.offset
        else:
            y = height * (along if dy > 0 else 1 - along)
            x = width * shot.offset
        img = np.empty((height, width, 3), np.uint8)
        img[:] = shot.background
        draw_shape(img, shot.shape, (x, y), radius, COLORS[shot.color])
        if shot.defect == "blur":
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=0.05 * min(width, height))
        elif shot.defect == "text":
            _overlay_text(img, "SALE 50% OFF")
        frames.append(img)
    return frames


def _overlay_text(img: np.ndarray, text: str) -> None:
    h, w = img.shape[:2]
    font = cv2.FONT_HERSHEY_DUPLEX
    scale = 1.0
    (tw, th), _ = cv2.getTextSize(text, font, scale, 2)
    scale = 0.9 * w / tw
    (tw, th), base = cv2.getTextSize(text, font, scale, 2)
    org = ((w - tw) // 2, int(h * 0.88))
    cv2.rectangle(img, (org[0] - 6, org[1] - th - 8), (org[0] + tw + 6, org[1] + base + 4), (255, 255, 255), -1)
    cv2.putText(img, text, org, font, scale, (0, 0, 0), 2, cv2.LINE_AA)


def random_shot(rng: random.Random, background: tuple[int, int, int], seconds: float,
                defect: str | None = None) -> Shot:
    return Shot(color=rng.choice(sorted(COLORS)), shape=rng.choice(SHAPES),
                direction=rng.choice(sorted(DIRECTIONS)), background=background, seconds=seconds,
                defect=defect, offset=rng.uniform(0.35, 0.65))


def _text_shot(rng: random.Random, background) -> Shot:
    """The text defect: text across the lower part, the shape moving horizontally above it."""
    shot = random_shot(rng, background, 2.0, "text")
    shot.direction = rng.choice(["left to right", "right to left"])
    shot.offset = 0.3
    return shot


def write_video(path: str, shots: list[Shot], width: int, height: int, fps: float) -> list[dict]:
    """Encode ``shots`` back to back into ``path``; returns the timed segments."""
    frames: list[np.ndarray] = []
    segments = []
    for shot in shots:
        start = len(frames) / fps
        frames.extend(render_shot(shot, width, height, fps))
        segments.append({"start": round(start, 4), "end": round(len(frames) / fps, 4),
                         "caption": shot.caption})
    data = encode_frames(frames, Fraction(fps).limit_denominator(1001), crf=18, preset="veryfast")
    with open(path, "wb") as f:
        f.write(data)
    return segments


def _distinct_backgrounds(rng: random.Random, k: int) -> list[tuple[int, int, int]]:
    order = list(BACKGROUNDS)
    rng.shuffle(order)
    return [order[i % len(order)] for i in range(k)]


def generate_corpus(out: str, n: int = 4, *, seed: int = 0, width: int = 256, height: int = 160,
                    fps: float = 12.0, shots_per_video: int = 2, defects: bool = True) -> dict:
    """Write ``n`` clean multi-shot videos (plus the planted defects) under ``out``.

    Returns the truth: ``{"videos": [...], "expected_clips": k, "shots": [...]}``, also written
    to ``out/truth.json``; ``out/manifest.jsonl`` carries the source captions.
    """
    rng = random.Random(seed)
    vdir = os.path.join(out, "videos")
    os.makedirs(vdir, exist_ok=True)
    manifest, shots_truth, files = [], [], []

    def add(name: str, shots: list[Shot]) -> None:
        path = os.path.join(vdir, name)
        segments = write_video(path, shots, width, height, fps)
        manifest.append({"uri": f"videos/{name}", "segments": segments})
        files.append({"file": name, "defect": None})
        for i, (shot, seg) in enumerate(zip(shots, segments)):
            shots_truth.append({"file": name, "shot": i, "start": seg["start"], "end": seg["end"],
                                "caption": shot.caption, "color": shot.color, "shape": shot.shape,
                                "direction": shot.direction,
                                "expected": {None: "kept", "static": "motion", "blur": "blur",
                                             "text": "ocr"}[shot.defect]})

    for v in range(n):
        bgs = _distinct_backgrounds(rng, shots_per_video)
        add(f"video_{v:04d}.mp4", [random_shot(rng, bg, rng.uniform(1.6, 2.6)) for bg in bgs])
    if defects:
        bgs = _distinct_backgrounds(rng, 4)
        add("defects.mp4", [random_shot(rng, bgs[0], 2.0), random_shot(rng, bgs[1], 2.0, "static"),
                            random_shot(rng, bgs[2], 2.0, "blur"), _text_shot(rng, bgs[3])])
        src = os.path.join(vdir, "video_0000.mp4")
        with open(src, "rb") as f:
            data = f.read()
        for name, payload, reason in [("video_0000_copy.mp4", data, "dedup"),
                                      ("corrupt_truncated.mp4", data[: len(data) // 2], "probe"),
                                      ("corrupt_empty.mp4", b"", "probe"),
                                      ("corrupt_text.mp4", b"this is not a video\n" * 10, "probe")]:
            with open(os.path.join(vdir, name), "wb") as f:
                f.write(payload)
            seg = manifest[0]["segments"] if name == "video_0000_copy.mp4" else []
            manifest.append({"uri": f"videos/{name}", "segments": seg})
            files.append({"file": name, "defect": reason})
    with open(os.path.join(out, "manifest.jsonl"), "w") as f:
        for row in manifest:
            f.write(json.dumps(row) + "\n")
    truth = {"videos": files, "shots": shots_truth,
             "expected_clips": sum(s["expected"] == "kept" for s in shots_truth),
             "width": width, "height": height, "fps": fps}
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump(truth, f, indent=1)
    return truth
