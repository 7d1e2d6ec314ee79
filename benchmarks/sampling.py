#!/usr/bin/env python
"""Sampling benchmark: FasterCache speed-up and output difference (PSNR against the uncached run).

    python benchmarks/sampling.py --preset demo                      # CPU, demo model, random weights
    python benchmarks/sampling.py --preset demo --ckpt runs/demo     # trained weights (any checkpoint)
    python benchmarks/sampling.py --preset 2b --latent 16x54x96 --dtype bf16   # GPU
    python benchmarks/sampling.py --preset 2b --predict-only         # no GPU: FLOP-predicted speed-ups

Each row samples the same noise and text with the Euler flow sampler (batched CFG) and one
FasterCache setting, after a warm-up run; settings run round-robin ``--repeats`` times and the
fastest run of each counts. On CPU the time is the process's CPU time by default (``--clock``),
which other jobs on shared cores do not inflate. PSNR
compares the final x0 with the uncached x0 (peak = the uncached output's value range).

Without ``--ckpt`` the weights are random, with the zero-initialised temporal and cross-attention
outputs given small random values so that every branch contributes. A random network's
trajectory is not a trained one's: read the PSNR of such rows as a check of the mechanism, and
judge quality on trained weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

PRESETS = {"tiny": "configs/model/tiny.yaml", "demo": "configs/model/demo.yaml",
           "2b": "configs/model/vchitect-2b.yaml", "8b": "configs/model/vchitect-8b.yaml"}
DEFAULT_LATENT = {"tiny": "8x16x16", "demo": "16x16x16", "2b": "16x54x96", "8b": "16x54x96"}
TEXT_LEN = {"tiny": 8, "demo": 16, "2b": 333, "8b": 333}
SETTINGS = {
    "uncached": None,
    "attention reuse only (every 3rd step from 20%)": dict(cfg=False),
    "CFG-Cache only (every 3rd step from 20%)": dict(attention=False),
    "FasterCache default (both every 3rd step from 20%)": dict(),
    "default without extrapolation (w = 0)": dict(weight_end=0.0),
    "default + CFG band boosts 0.2": dict(low_boost=0.2, high_boost=0.2),
    "misaligned (attention every 2nd, CFG every 3rd, from 30%)":
        dict(attention_interval=2, attention_start=0.3, cfg_start=0.3),
    "fast (both every 3rd step from 10%)": dict(attention_start=0.1, cfg_start=0.1),
    "aggressive (attention every 3rd, CFG every 5th, from 20%)": dict(cfg_interval=5),
}


def build(args):
    from vchitect.config import load_config
    from vchitect.models import VchitectTransformer3DModel

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.ckpt:
        from vchitect.export.export import find_checkpoint, load_transformer, read_meta

        step = find_checkpoint(args.ckpt)
        model = load_transformer(step, read_meta(step)["config"], dtype=args.dtype)
    else:
        cfg = load_config(ROOT / PRESETS[args.preset])
        torch.manual_seed(0)
        with torch.device(args.device):
            model = VchitectTransformer3DModel(**dataclasses.asdict(cfg.model))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if any(k in name for k in ("to_out_temporal", "to_out_context", "to_add_out_temporal")):
                    p.copy_((torch.randn(p.shape, generator=g) * 0.02).to(p.device))
    model = model.to(args.device)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    mse = (x.float() - ref.float()).square().mean().item()
    peak = (ref.max() - ref.min()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(peak * peak / mse)).item()


def attention_share(model_cfg, frames: int, height: int, width: int, text_len: int) -> float:
    """Share of forward model FLOPs inside the blocks' attention modules (projections + kernels)."""
    from vchitect.models.flops import model_flops

    fc = model_flops(model_cfg, 2, frames, height, width, text_len)
    attn = sum(v for k, v in fc.forward.items() if k.startswith(("block.qkv", "block.out", "block.attn")))
    return attn / fc.forward_total


def flop_ratio(stats: dict, uncached_evals: int, share: float) -> float:
    """Uncached ÷ cached model FLOPs from the counted evaluations (embedding/final layers neglected)."""
    cost = share * stats["attention_rows"] + (1 - share) * stats["block_rows"]
    return uncached_evals / cost


def predict(args, share: float) -> int:
    """Counted evaluations of every setting (on a 1-block stand-in: counts do not depend on the network)
    and the speed-up they imply for the preset's FLOP shares at this shape — for machines without the
    hardware to time the preset."""
    from vchitect.diffusion.fastercache import FasterCacheConfig
    from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample
    from vchitect.models import VchitectTransformer3DModel

    model = VchitectTransformer3DModel(sample_size=4, in_channels=1, num_layers=1, num_attention_heads=1,
                                       attention_head_dim=4, joint_attention_dim=2, pooled_projection_dim=2)
    x = torch.zeros(1, 1, 2, 2, 2)
    cond, uncond = (TextCondition(torch.ones(1, 1, 2) * v, torch.ones(1, 2) * v) for v in (1.0, -1.0))
    uncached = 2 * args.steps
    print(f"attention share of forward FLOPs: {share:.3f}; {args.steps} steps; predicted from counted evaluations")
    rows = []
    for name, setting in SETTINGS.items():
        if setting is None:
            continue
        fc = FasterCacheConfig(**setting)
        sample(model, x, cond, uncond, sigmas=flow_sigmas(args.steps), guidance_scale=2.0, fastercache=fc)
        r = flop_ratio(fc.stats, uncached, share)
        rows.append({"setting": name, "predicted_speedup": round(r, 2), "block_evals": fc.stats["block_rows"],
                     "attention_evals": fc.stats["attention_rows"]})
        print(f"{name:<66} ×{r:.2f}  blocks {fc.stats['block_rows']}/{uncached}  "
              f"attention {fc.stats['attention_rows']}/{uncached}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "attention_share": share, "rows": rows}, indent=2))
    return 0


def main() -> int:
    from vchitect.diffusion.fastercache import FasterCacheConfig
    from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--ckpt", default=None, help="use trained weights from this checkpoint")
    ap.add_argument("--latent", default=None, help="FxHxW latent shape (default per preset)")
    ap.add_argument("--prompt", default="a red ball moves to the right",
                    help="with --ckpt and a recorded text encoder: the prompt (negative = empty prompt)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance-scale", type=float, default=6.0)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--clock", default=None, choices=["wall", "cpu"],
                    help="wall: elapsed time (default on GPU); cpu: this process's CPU time (default on CPU — "
                    "robust when other jobs share the cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--only", nargs="*", default=None, help="names of SETTINGS rows to run")
    ap.add_argument("--json", default=None, help="write the rows here as JSON")
    ap.add_argument("--predict-only", action="store_true", help="no timing: speed-ups predicted from counted "
                    "evaluations and the preset's analytic FLOPs (for presets too large for this machine)")
    args = ap.parse_args()
    if args.predict_only:
        from vchitect.config import load_config

        cfg = load_config(ROOT / PRESETS[args.preset]).model
        F, H, W = (int(v) for v in (args.latent or DEFAULT_LATENT[args.preset]).split("x"))
        return predict(args, attention_share(cfg, F, H, W, TEXT_LEN[args.preset]))
    torch.set_num_threads(args.threads)
    clock = args.clock or ("wall" if args.device.startswith("cuda") else "cpu")
    now = time.perf_counter if clock == "wall" else time.process_time

    model = build(args)
    F, H, W = (int(v) for v in (args.latent or DEFAULT_LATENT[args.preset]).split("x"))
    c = model.config
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, c.in_channels, F, H, W, generator=g).to(args.device)
    L = TEXT_LEN[args.preset]
    cond = TextCondition(torch.randn(1, L, c.joint_attention_dim, generator=g).to(args.device),
                         torch.randn(1, c.pooled_projection_dim, generator=g).to(args.device))
    uncond = TextCondition(torch.zeros(1, L, c.joint_attention_dim, device=args.device),
                           torch.zeros(1, c.pooled_projection_dim, device=args.device),
                           torch.arange(L, device=args.device)[None] < 1)
    text_source = "random text embeddings"
    if args.ckpt:  # the run's own text encoder, when it recorded one: the prompt and the empty prompt
        from vchitect.export.export import find_checkpoint, read_meta
        from vchitect.models.encoders import load_text_encoder

        run_cfg = read_meta(find_checkpoint(args.ckpt))["config"]
        enc = (run_cfg.get("data") or {}).get("encoders") or {}
        if enc.get("text_encoder_path") and Path(enc["text_encoder_path"]).is_dir():
            te = load_text_encoder(enc["text_encoder_path"], enc.get("text_encoder_kind", "t5"),
                                   int(run_cfg["data"]["text"]["max_length"]), device=args.device)
            cond, uncond = (TextCondition(h.float(), p.float(), m) for h, m, p in
                            (te.encode([args.prompt]), te.encode([""])))
            text_source = f"prompt {args.prompt!r}"
    sigmas = flow_sigmas(args.steps, args.shift)

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def run(setting):
        fc = FasterCacheConfig(**setting) if setting is not None else None
        sync()
        t0 = now()
        out = sample(model, noise, cond, uncond, sigmas=sigmas, guidance_scale=args.guidance_scale, fastercache=fc)
        sync()
        return out, now() - t0, (fc.stats if fc is not None else {})

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"{'model of checkpoint ' + args.ckpt if args.ckpt else args.preset + ' model (random weights)'}, latent "
          f"{c.in_channels}×{F}×{H}×{W}, {args.steps} steps, CFG {args.guidance_scale}, {args.dtype}, {device_name}, "
          f"{clock} time, {text_source}")
    run(None)  # warm-up
    names = [n for n, st in SETTINGS.items() if st is None or not args.only or n in args.only]
    times = {n: [] for n in names}
    outs, stats = {}, {}
    for _ in range(args.repeats):  # round-robin, so that load changes on a shared machine hit every row
        for name in names:
            outs[name], dt, stats[name] = run(SETTINGS[name])
            times[name].append(dt)
    layers = len(model.transformer_blocks)
    share = attention_share(c, F, H, W, L)
    ref, base = outs["uncached"], min(times["uncached"])
    stats["uncached"] = {"block_rows": 2 * args.steps * layers, "attention_rows": 2 * args.steps * layers}
    rows = []
    for name in names:
        t = min(times[name])  # the least disturbed run
        row = {"setting": name, "seconds": round(t, 3), "speedup": round(base / t, 2),
               "psnr_db": None if name == "uncached" else round(psnr(outs[name], ref), 2),
               "block_evals": stats[name].get("block_rows"), "attention_evals": stats[name].get("attention_rows"),
               "flop_ratio": round(flop_ratio(stats[name], 2 * args.steps * layers, share), 2)}
        rows.append(row)
        print(f"{name:<66} {t:8.2f}s  ×{row['speedup']:<5} (FLOPs ×{row['flop_ratio']:<5}) PSNR "
              f"{row['psnr_db'] if row['psnr_db'] else '  -  '}  blocks {row['block_evals']}  "
              f"attention {row['attention_evals']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": device_name, "clock": clock,
                                               "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
