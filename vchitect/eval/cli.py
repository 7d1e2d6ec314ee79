"""``vchitect eval VIDEOS_DIR``: VBench-style metrics of a folder of videos, plus the prompt-following
probe for the videos whose prompt is known (``prompts.json`` mapping file stem → prompt, or a ``.txt``
file beside the video).

When a stem exists as both ``.gif`` and ``.mp4`` the GIF is read: H.264's 4:2:0 chroma subsampling
blurs the colour of the demo's 16×16 frames, the GIF keeps every pixel.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VIDEO_EXTS = (".gif", ".mp4")


def read_video(path: str | Path) -> np.ndarray:
    """F×H×W×3 uint8 RGB frames of a .gif or .mp4."""
    path = Path(path)
    if path.suffix.lower() == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def find_videos(folder: str | Path) -> dict[str, Path]:
    """stem → path, preferring .gif over .mp4 for the same stem."""
    out: dict[str, Path] = {}
    for ext in reversed(VIDEO_EXTS):  # .mp4 first, then .gif overrides
        for p in sorted(Path(folder).glob(f"*{ext}")):
            out[p.stem] = p
    return dict(sorted(out.items()))


def prompts_for(folder: str | Path, stems) -> dict[str, str]:
    folder = Path(folder)
    known: dict[str, str] = {}
    if (folder / "prompts.json").is_file():
        known.update(json.loads((folder / "prompts.json").read_text()))
    for stem in stems:
        txt = folder / f"{stem}.txt"
        if stem not in known and txt.is_file():
            known[stem] = txt.read_text().strip()
    return {s: known[s] for s in stems if s in known}


def evaluate_folder(folder: str | Path, subject: str | None = None, background: str | None = None,
                    held_out=None) -> dict:
    from .metrics import video_metrics
    from .probe import probe_video, score

    videos = find_videos(folder)
    if not videos:
        raise SystemExit(f"{folder}: no .gif or .mp4 videos")
    frames = {s: read_video(p) for s, p in videos.items()}
    result = {"folder": str(folder), "metrics": video_metrics(list(frames.values()), subject, background)}
    prompts = prompts_for(folder, frames)
    if prompts:
        if held_out is None:
            try:
                from vchitect.demo.corpus import HELD_OUT as held_out
            except ImportError:  # pragma: no cover - the demo module is part of the package
                held_out = ()
        stems = list(prompts)
        probes = [probe_video(frames[s]) for s in stems]
        result["probe"] = score([prompts[s] for s in stems], probes, held_out)
    return result


def features_note(metrics: dict) -> str | None:
    """What to tell the reader when subject and background consistency are one number (both on pixels)."""
    if metrics["subject_features"] == metrics["background_features"] == "pixels":
        return ("note: subject and background consistency coincide here: both use pixel features (thumbnails). "
                "VBench uses DINO for the subject and CLIP for the background: pass --subject-features dino:PATH "
                "--background-features clip:PATH (local model folders).")
    return None


def run_eval(folder: str, subject: str | None = None, background: str | None = None,
             json_out: str | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    res = evaluate_folder(folder, subject, background)
    m = res["metrics"]
    t = Table(title=f"vchitect eval {folder} ({m['videos']} videos)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_row("temporal flickering", f"{m['temporal_flickering']:.4f}")
    t.add_row(f"subject consistency ({m['subject_features']})", f"{m['subject_consistency']:.4f}")
    t.add_row(f"background consistency ({m['background_features']})", f"{m['background_consistency']:.4f}")
    for group, label in (("train", "probe, training combinations"), ("held_out", "probe, held-out combinations")):
        g = res.get("probe", {}).get(group)
        if g and g["n"]:
            t.add_row(f"{label} (n={g['n']})", f"colour {100 * g['color']:.0f}% · direction "
                      f"{100 * g['direction']:.0f}% · both {100 * g['both']:.0f}%")
    console = Console()
    console.print(t)
    note = features_note(m)
    if note:
        console.print(note, markup=False)
    if json_out:
        Path(json_out).write_text(json.dumps(res, indent=1))
    return 0


__all__ = ["evaluate_folder", "features_note", "find_videos", "read_video", "run_eval"]
