#!/usr/bin/env python
"""Longest video-token sequence the 2B preset trains on one GPU, found by search.

    python benchmarks/max_seq.py                       # GPU: 2B, 480p-class frames, grow F
    python benchmarks/max_seq.py --smoke               # CPU: tiny preset, exercises the search

Every trial is one full training step (forward, backward, optimizer) in a fresh process with full
activation checkpointing, activation offload of the checkpointed block inputs to pinned host
memory, and FSDP2 CPU offload of parameters, gradients and optimizer state (``--no-offload`` and
``--ac`` change that). The spatial size is fixed (``--latent-hw``, default 60×104 = a 480×832
frame after the 8× VAE, 1,560 tokens per frame); the number of frames grows by doubling until a
step runs out of memory, then a binary search finds the largest F that fits. The sequence
length reported is F × tokens per frame (one sample, batch 1).

``--smoke`` runs the same search on the tiny preset on CPU; as nothing runs out of memory there,
``--limit-tokens`` makes trials above a token count fail like an OOM so that the bisection is
exercised too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OOM_MARKERS = ("out of memory", "OutOfMemoryError", "CUBLAS_STATUS_ALLOC_FAILED", "std::bad_alloc")


def trial(args, frames: int) -> tuple[bool, dict | None]:
    """Run one step with ``frames`` frames; (fits, result row)."""
    from vchitect.parallel.spawn import run_local

    h, w = (int(v) for v in args.latent_hw.split("x"))
    tokens = frames * (h // 2) * (w // 2)
    if args.limit_tokens and tokens > args.limit_tokens:
        return False, None
    argv = [str(ROOT / "benchmarks" / "step.py"), "--worker", "--preset", args.preset, "--layout", "none",
            "--ac", args.ac, "--latent", f"{frames}x{h}x{w}", "--steps", "1", "--warmup", str(args.warmup),
            "--text-len", str(args.text_len), "--compile", args.compile]
    if not args.no_offload:
        argv += ["--offload", "--cpu-offload"]
    if args.smoke:
        argv += ["--cpu"]
    try:
        res = run_local(argv, 1, timeout=args.timeout)
    except RuntimeError as exc:
        if any(m in str(exc) for m in OOM_MARKERS):
            return False, None
        raise
    line = next(x for x in res[0].stdout.splitlines() if x.startswith("RESULT "))
    return True, json.loads(line[len("RESULT "):])


def search(args) -> dict:
    lo, hi, best = 0, None, None
    f = args.start_frames
    while hi is None:  # grow
        ok, row = trial(args, f)
        print(f"  F={f}: {'fits' if ok else 'out of memory'}", file=sys.stderr, flush=True)
        if ok:
            lo, best = f, row
            if f >= args.max_frames:
                break
            f = min(f * 2, args.max_frames)
        else:
            hi = f
    while hi is not None and hi - lo > 1:  # bisect
        mid = (lo + hi) // 2
        ok, row = trial(args, mid)
        print(f"  F={mid}: {'fits' if ok else 'out of memory'}", file=sys.stderr, flush=True)
        if ok:
            lo, best = mid, row
        else:
            hi = mid
    return dict(frames=lo, row=best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="2b")
    ap.add_argument("--latent-hw", default="60x104", help="latent H×W of each frame")
    ap.add_argument("--text-len", type=int, default=333)
    ap.add_argument("--ac", default="full", choices=["none", "selective", "full"])
    ap.add_argument("--no-offload", action="store_true", help="no activation / parameter+optimizer offload")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--start-frames", type=int, default=40)
    ap.add_argument("--max-frames", type=int, default=4096)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--limit-tokens", type=int, default=0, help="treat longer trials as out of memory")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke run on the tiny preset")
    ap.add_argument("--json", help="write the result here too")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.latent_hw, args.text_len = "tiny", "8x8", 8
        args.start_frames, args.max_frames = 2, args.max_frames if args.max_frames != 4096 else 16
        args.limit_tokens = args.limit_tokens or 5 * 16  # 5 frames of 16 tokens fit, 6 do not
        args.compile = "off"
    h, w = (int(v) for v in args.latent_hw.split("x"))
    per_frame = (h // 2) * (w // 2)
    print(f"searching frames for preset {args.preset}: {per_frame} tokens per frame, AC {args.ac}, "
          f"offload {'off' if args.no_offload else 'activations + params/optimizer'}", file=sys.stderr)
    res = search(args)
    row = res["row"] or {}
    out = dict(preset=args.preset, latent_hw=args.latent_hw, tokens_per_frame=per_frame, frames=res["frames"],
               tokens=res["frames"] * per_frame, ac=args.ac, offload=not args.no_offload,
               peak_gib=row.get("peak_gib"), step_s=row.get("step_s"), device=row.get("device"))
    print("| preset | frame latent | frames | video tokens | AC | offload | step s | peak GiB | device |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda v, f="{:.2f}": "n/a" if v is None else f.format(v)  # noqa: E731
    print(f"| {out['preset']} | {out['latent_hw']} | {out['frames']} | {out['tokens']:,} | {out['ac']} | "
          f"{out['offload']} | {fmt(out['step_s'])} | {fmt(out['peak_gib'])} | {out['device']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
