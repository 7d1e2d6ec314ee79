#!/usr/bin/env python
"""The guidance scale per step of each schedule (docs/sampling.md, "Guidance schedules").

    python benchmarks/guidance_schedules.py                         # 100 steps, s = 7.5, shift 3: a table
    python benchmarks/guidance_schedules.py --png docs/guidance_schedules.png

``released`` runs over the released timestep spacing (the scheduler's own set_timesteps), ``smooth`` and
``constant`` over the same steps; no model is involved (CPU, instant).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def schedules(steps: int, scale: float, shift: float) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vchitect.diffusion.sampling import GUIDANCE_SCHEDULES, guidance_scales

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    out = {"timestep": (sched.sigmas[:-1] * 1000).tolist()}
    out.update({name: guidance_scales(name, scale, sched.sigmas) for name in GUIDANCE_SCHEDULES})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--scale", type=float, default=7.5)
    ap.add_argument("--shift", type=float, default=3.0, help="scheduler shift (the released checkpoint's: 3)")
    ap.add_argument("--png", help="also plot g per step into this file (needs matplotlib)")
    args = ap.parse_args()
    s = schedules(args.steps, args.scale, args.shift)
    print("step  timestep   released   smooth")
    for i, t in enumerate(s["timestep"]):
        print(f"{i:4d}  {t:8.3f}  {s['released'][i]:9.4f}  {s['smooth'][i]:7.4f}")
    rel = s["released"]
    print(json.dumps(dict(steps=args.steps, scale=args.scale, shift=args.shift, released_mean=sum(rel) / len(rel),
                          released_below_1_5=sum(g < 1.5 for g in rel),
                          released_above_s=sum(g > args.scale for g in rel), released_min=min(rel),
                          smooth_mean=sum(s["smooth"]) / len(rel))))
    if args.png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.8), dpi=90)
        steps = range(args.steps)
        ax.plot(steps, rel, ".-", lw=0.6, ms=3, label="released: u = (N − t)/N, t = scheduler timestep")
        ax.plot(steps, s["smooth"], "-", lw=1.5, label="smooth: u = i/N")
        ax.plot(steps, s["constant"], "--", lw=1, label="constant: g = s")
        ax.set_xlabel(f"step i (N = {args.steps}, shift {args.shift:g})")
        ax.set_ylabel(f"g  (s = {args.scale:g})")
        ax.set_title("g = 1 + s·(1 − cos(π·u⁵))/2")
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
