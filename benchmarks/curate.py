"""Curation throughput: seconds of source video per CPU-second, next to a decode-only PyAV pass.

    .venv/bin/python benchmarks/curate.py [--n 8] [--textured] [--videos DIR] [--max-size PX]
        [--detector content|content_fast] [--stream-copy auto|never] [--no-write]

Inputs: the synthetic corpus (`vchitect-curate synth`, 256×160 @ 12 fps), or with --textured a
corpus of 1280×720 @ 30 fps clips with a panning textured background and hard cuts (closer to
real footage in decode/encode cost), or your own videos with --videos DIR.

Measured in this process, one input at a time, as CPU time (`time.process_time`, all threads):
  - cpu stages:  probe → one decode feeding shot split (split.detector), clip windows,
                 rules, blur, motion, perceptual hash and the H.264 clip of every kept window:
                 re-encoded, or stream-copied when clip.stream_copy allows it
                 (`stages.clip.process_video`)
  - + models:    the same plus the OCR and NSFW model filters (onnxruntime, CPU)
  - decode:      PyAV decode of every frame of the same files, nothing else
and prints source-seconds per CPU-second for each and the ratio cpu-stages / decode (target ≥ 0.5:
the pipeline costs at most twice one decode of every frame). Figures go to benchmarks/RESULTS.md
under "## Curation" unless --no-write.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from fractions import Fraction

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from data_pipeline import synthetic  # noqa: E402
from data_pipeline.config import load_curate_config  # noqa: E402
from data_pipeline.sources import list_sources  # noqa: E402
from data_pipeline.stages.clip import process_video  # noqa: E402
from data_pipeline.stages.models import ModelFilters  # noqa: E402
from data_pipeline.stages.probe import Rejected, probe  # noqa: E402
from data_pipeline.video import encode_frames  # noqa: E402


def textured_corpus(folder: str, n: int, seed: int = 0) -> None:
    """n videos of 3 shots × 3 s at 1280×720, 30 fps: panning smooth texture + a moving disc."""
    import cv2

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    w, h, fps = 1280, 720, 30
    for v in range(n):
        frames = []
        for _shot in range(3):
            tex = cv2.resize(rng.integers(0, 255, (h // 8 + 40, w // 8 + 40, 3), dtype=np.uint8),
                             (w + 320, h + 320), interpolation=cv2.INTER_CUBIC)
            dx, dy = rng.integers(-3, 4, 2)
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            for i in range(3 * fps):
                x0, y0 = 160 + dx * i // 2, 160 + dy * i // 2
                img = np.ascontiguousarray(tex[y0:y0 + h, x0:x0 + w])
                cv2.circle(img, (100 + 10 * i, h // 2), 80, color, -1, cv2.LINE_AA)
                frames.append(img)
        with open(os.path.join(folder, f"textured_{v:03d}.mp4"), "wb") as f:
            f.write(encode_frames(frames, Fraction(fps), crf=23, preset="veryfast"))


def decode_only(path: str) -> None:
    import av

    with av.open(path) as c:
        s = c.streams.video[0]
        s.thread_type = "AUTO"
        for _ in c.decode(s):
            pass


def measure(paths, fn) -> float:
    t0 = time.process_time()
    for p in paths:
        fn(p)
    return time.process_time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8, help="clean videos in the generated corpus")
    ap.add_argument("--textured", action="store_true", help="1280×720 textured corpus instead")
    ap.add_argument("--videos", default=None, help="benchmark these videos instead")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many rounds")
    ap.add_argument("--max-size", type=int, default=None, help="clip.max_size (output long side)")
    ap.add_argument("--preset", default=None, help="clip.preset (libx264; default: the config's)")
    ap.add_argument("--scaler", default=None, help="clip.scaler (swscale filter; default: the config's)")
    ap.add_argument("--max-duration", type=float, default=3.0, help="clip.max_duration (s); 3 fits the "
                    "generated corpora's 2–3 s shots, real footage is usually cut at 10")
    ap.add_argument("--detector", default=None, help="split.detector (default: the config's)")
    ap.add_argument("--stream-copy", default=None, help="clip.stream_copy: auto|never (default: the config's)")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="curate-bench-")
    if args.videos:
        folder, corpus = args.videos, f"your videos ({args.videos})"
        extra = []
    elif args.textured:
        folder, corpus = tmp, f"textured 1280x720@30, {args.n} videos × 3 shots × 3 s"
        textured_corpus(folder, args.n)
        extra = []
    else:
        synthetic.generate_corpus(tmp, n=args.n, seed=0, defects=False)
        folder, corpus = os.path.join(tmp, "videos"), f"synthetic 256x160@12, {args.n} videos × 2 shots"
        extra = []
    if args.max_size:
        extra.append(f"clip.max_size={args.max_size}")
    if args.preset:
        extra.append(f"clip.preset={args.preset}")
    if args.scaler:
        extra.append(f"clip.scaler={args.scaler}")
    if args.detector:
        extra.append(f"split.detector={args.detector}")
    if args.stream_copy:
        extra.append(f"clip.stream_copy={args.stream_copy}")
    cfg = load_curate_config(None, [f"input.path={folder}", f"output.path={tmp}/out",
                                    f"clip.max_duration={args.max_duration}", "clip.min_duration=1.0", *extra])
    corpus += (f"; clips ≤{cfg.clip.max_size}px and ≤{cfg.clip.max_duration:g}s, libx264 {cfg.clip.preset} "
               f"crf {cfg.clip.crf}, {cfg.clip.scaler} scaler, stream copy {cfg.clip.stream_copy}, "
               f"detector {cfg.split.detector}")
    items = list_sources(folder, cfg.input.extensions)
    paths, seconds = [], 0.0
    for it in items:
        try:
            seconds += probe(it.uri).duration
            paths.append(it.uri)
        except Rejected:
            pass
    by_path = {it.uri: it for it in items}
    models = ModelFilters(cfg)
    clips = []
    kept: dict[str, int] = {}
    copied: dict[str, int] = {}

    def cpu_stages(p):
        clips.append(process_video(p, by_path[p], cfg))
        kept[p] = len(clips[-1].clips)
        copied[p] = sum(c.meta.get("transcode") == "copy" for c in clips[-1].clips)

    def with_models(p):
        models([process_video(p, by_path[p], cfg)])

    results = {}
    for _ in range(args.repeats):  # interleaved rounds, best of each
        for name, fn in (("decode", decode_only), ("cpu stages", cpu_stages), ("+ model filters", with_models)):
            clips.clear()
            cpu = measure(paths, fn)
            results[name] = min(results.get(name, float("inf")), cpu)
    kept = sum(kept.values())
    copied = sum(copied.values())
    rows = [(name, cpu, seconds / cpu) for name, cpu in results.items()]
    ratio = results["decode"] / results["cpu stages"]
    ratio_models = results["decode"] / results["+ model filters"]
    lines = [f"| pass | CPU-s | source-s / CPU-s |", "|---|---:|---:|"]
    lines += [f"| {name} | {cpu:.2f} | {rate:.1f} |" for name, cpu, rate in rows]
    lines.append(f"\nratio cpu stages / decode = **{ratio:.2f}** (target ≥ 0.5); with the OCR and NSFW "
                 f"model filters: {ratio_models:.2f}. {len(paths)} files, {seconds:.1f} s of source, "
                 f"{kept} clips kept, {copied} of them stream-copied.")
    table = "\n".join(lines)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"corpus: {corpus}\nload average (1/5/15 min) after the run: {load}\n{table}")
    if not args.no_write:
        cmd = "python benchmarks/curate.py " + " ".join(sys.argv[1:] if argv is None else argv)
        cpu_name = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                        platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
        section = (f"\n### {datetime.date.today().isoformat()} — {corpus}\n\n"
                   f"Machine: {cpu_name}, {os.cpu_count()} cores, {platform.system()} "
                   f"{platform.release()}; one process, single input at a time; load average {load}.\n"
                   f"Command: `{cmd.strip()}`\n\n{table}\n")
        path = os.path.join(os.path.dirname(__file__), "RESULTS.md")
        text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
        if "## Curation" not in text:
            text = text.rstrip("\n") + "\n\n## Curation\n\nSeconds of source video processed per CPU-second "\
                   "by the CPU stages of `data_pipeline` (probe, shot split, clip, cheap filters, H.264 encode), "\
                   "next to a decode-only PyAV pass over the same files (`benchmarks/curate.py`).\n"
            text += section
        else:
            # append at the end of the Curation section (before the next "## " heading, if any)
            start = text.index("## Curation")
            nxt = text.find("\n## ", start + 3)
            text = text + section if nxt < 0 else text[:nxt] + section + text[nxt:]
        with open(path, "w") as f:
            f.write(text)
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
