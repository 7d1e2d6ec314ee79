#!/usr/bin/env python
"""GPU benchmarks at real shapes (``make bench-gpu``): one JSON line per configuration.

    python benchmarks/gpu.py                          # every configuration, on the GPU
    python benchmarks/gpu.py --config sample-2b-released --out results.jsonl
    python benchmarks/gpu.py --dry-run                # the same code on CPU at a shrunk shape, in seconds

Configurations (``CONFIGS``; the scale work adds more):

``sample-2b-released``: the released Vchitect-2.0 inference shape — the randomised 2B transformer
(configs/model/vchitect-2b.yaml) in bf16, 40 frames at 432×768 (latent 16×40×54×96: SD3's image VAE
encodes every frame, 8× spatially, no temporal compression; 51,840 video tokens), 333 text tokens
(CLIP 77 + T5 256), classifier-free guidance as one batch of 2 with the released guidance schedule
over the first steps of the released 100-step timesteps. ``warmup`` steps, then ``steps`` timed ones.

Each line: ``time_per_step_s`` (mean of the timed steps, each ended by a CUDA synchronise),
``step_s`` (every timed step), ``peak_mem_gib`` (``torch.cuda.max_memory_allocated`` over the timed
steps, weights included; peak RSS on CPU) and what was run. Random weights: speed and memory only —
the outputs mean nothing. ``--dry-run`` swaps the model for configs/model/tiny.yaml and the latent
for a few small frames, keeps everything else (dtype, schedule, batching) and runs on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIGS = {
    "sample-2b-released": dict(
        kind="sample", model="configs/model/vchitect-2b.yaml", latent=(16, 40, 54, 96), text_len=333,
        dtype="bf16", num_inference_steps=100, warmup=1, steps=3, guidance_scale=7.5,
        guidance_schedule="released", timestep_spacing="released", shift=3.0, batch_cfg=True,
        dry_run=dict(model="configs/model/tiny.yaml", latent=(4, 3, 8, 8), text_len=8)),
}
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def build_model(path: str, dtype, device):
    """The transformer of a model YAML with random weights (seed 0), every branch contributing."""
    import torch

    from vchitect.config import load_config
    from vchitect.models import VchitectTransformer3DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = VchitectTransformer3DModel(**dataclasses.asdict(load_config(ROOT / path).model))
        with torch.no_grad():  # the zero-initialised outputs get small weights, as benchmarks/sampling.py does
            for name, p in model.named_parameters():
                if any(k in name for k in ("to_out_temporal", "to_out_context", "to_add_out_temporal")):
                    p.normal_(0.0, 0.02)
    return torch.nn.Module.to(model, dtype).eval()  # not ModelMixin.to: it warns of fp32-kept modules (none here)


def released_sigmas(num_steps: int, shift: float):
    """The noise levels of the released pipeline: the scheduler's own set_timesteps(N)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(num_steps)
    return sched.sigmas


def run_sample(name: str, cfg: dict, device) -> dict:
    import torch

    from vchitect.diffusion.sampling import TextCondition, flow_sigmas, guidance_scales, sample

    cuda = device.type == "cuda"
    dtype = getattr(torch, DTYPES[cfg["dtype"]])
    t0 = time.perf_counter()
    model = build_model(cfg["model"], dtype, device)
    build_s = time.perf_counter() - t0
    C, F, H, W = cfg["latent"]
    if C != model.config.in_channels:
        raise ValueError(f"configuration {name}: latent has {C} channels, the model {model.config.in_channels}")
    L, mc = cfg["text_len"], model.config
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, C, F, H, W, generator=g).to(device)
    cond = TextCondition(torch.randn(1, L, mc.joint_attention_dim, generator=g).to(device),
                         torch.randn(1, mc.pooled_projection_dim, generator=g).to(device))
    uncond = TextCondition(torch.randn(1, L, mc.joint_attention_dim, generator=g).to(device),
                           torch.randn(1, mc.pooled_projection_dim, generator=g).to(device))
    n = cfg["num_inference_steps"]
    full = released_sigmas(n, cfg["shift"]) if cfg["timestep_spacing"] == "released" else flow_sigmas(n, cfg["shift"])
    warmup, steps = cfg["warmup"], cfg["steps"]
    # the first warmup + steps steps of the N-step run, each with the guidance scale it has there
    scales = guidance_scales(cfg["guidance_schedule"], cfg["guidance_scale"], full)[:warmup + steps]
    sigmas = full[:warmup + steps + 1]
    stamps = []

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def step_done(i, t, x):
        sync()
        stamps.append(time.perf_counter())
        if i == warmup - 1 and cuda:
            torch.cuda.reset_peak_memory_stats(device)

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    sync()
    stamps.append(time.perf_counter())
    x = sample(model, noise, cond, uncond, sigmas=sigmas, guidance_scale=scales, batch_cfg=cfg["batch_cfg"],
               callback=step_done)
    step_s = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1:])]
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        device_name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB
        device_name = "cpu"
    p = mc.patch_size
    return dict(config=name, kind="sample", device=device_name, dtype=cfg["dtype"], model=cfg["model"],
                params=sum(q.numel() for q in model.parameters()), latent="x".join(map(str, cfg["latent"])),
                video_tokens=F * (H // p) * (W // p), text_len=L, batch=1, cfg_batched=cfg["batch_cfg"],
                guidance_schedule=cfg["guidance_schedule"], guidance_scales=[round(v, 4) for v in scales],
                timestep_spacing=cfg["timestep_spacing"], num_inference_steps=n, warmup=warmup, steps=steps,
                time_per_step_s=sum(step_s) / len(step_s), step_s=step_s, peak_mem_gib=peak,
                memory="max allocated" if cuda else "peak RSS", build_s=build_s, finite=bool(x.isfinite().all()),
                torch=torch.__version__, date=datetime.date.today().isoformat())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", action="append", choices=sorted(CONFIGS), help="run only these (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, shrunk shapes (tiny model): checks the code path")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default per configuration)")
    ap.add_argument("--out", default=None, help="append the JSON lines here too (make bench-gpu: "
                    "$OUT/bench-gpu.jsonl, else benchmarks/results/bench-gpu.jsonl)")
    args = ap.parse_args()
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("bench-gpu: no CUDA device here; run it on a GPU machine, or --dry-run to check the code on CPU",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    rows = []
    for name in args.config or list(CONFIGS):
        cfg = dict(CONFIGS[name])
        if args.dry_run:
            cfg.update(cfg["dry_run"])
        if args.steps is not None:
            cfg["steps"] = args.steps
        row = run_sample(name, cfg, device)
        row["dry_run"] = args.dry_run
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
