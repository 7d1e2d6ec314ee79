#!/usr/bin/env python
"""Training-step benchmark: step time, tokens/s, achieved FLOP/s, MFU and peak memory.

    python benchmarks/step.py --preset tiny --nproc 4 --layout tp2,sp2
    python benchmarks/step.py --preset 2b --nproc 1 --shape 40x480x832 --ac none --ac selective --ac full

One row per (layout, activation-checkpointing) combination; each runs in its own group of
``--nproc`` local processes (gloo on CPU, NCCL on GPU). A step is forward + backward + AdamW on
random latents and text of the given shape (the data loader is not part of it).

Shapes: ``--shape FxHxW`` is in *pixels*; latents are ``F × H/8 × W/8`` (Vchitect-2.0 encodes every
frame with SD3's 8× image VAE; no temporal compression). ``--latent FxHxW`` gives the latent shape
directly. Video tokens per sample = F · (H/8/p) · (W/8/p) with patch size p = 2.

FLOPs are model FLOPs from ``vchitect.models.flops.train_step_flops`` (activation-checkpointing
recomputation not counted). MFU = model FLOP/s per device ÷ the device's dense bf16 peak
(printed; override with ``--peak-tflops``). On CPU the achieved FLOP/s is reported instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {"tiny": "configs/model/tiny.yaml", "demo": "configs/model/demo.yaml",
           "2b": "configs/model/vchitect-2b.yaml", "8b": "configs/model/vchitect-8b.yaml"}
DEFAULT_LATENT = {"tiny": "4x16x16", "demo": "8x32x32"}
DEFAULT_TEXT = {"tiny": 8, "demo": 16}
VAE_SCALE = 8
# Dense bf16 peak TFLOP/s (no sparsity) by device name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "L40S": 362.0, "4090": 165.0}


def model_config(preset: str) -> dict:
    import dataclasses

    import yaml

    from vchitect.config import ModelConfig, from_dict

    path = ROOT / PRESETS[preset] if preset in PRESETS else Path(preset)
    data = yaml.safe_load(path.read_text()) or {}
    return dataclasses.asdict(from_dict(ModelConfig, data.get("model", data), prefix="model."))


def latent_shape(args) -> tuple[int, int, int]:
    if args.latent:
        f, h, w = (int(v) for v in args.latent.lower().split("x"))
        return f, h, w
    if args.shape:
        f, h, w = (int(v) for v in args.shape.lower().split("x"))
        if h % VAE_SCALE or w % VAE_SCALE:
            raise SystemExit(f"--shape {args.shape}: height and width must be multiples of {VAE_SCALE}")
        return f, h // VAE_SCALE, w // VAE_SCALE
    return tuple(int(v) for v in DEFAULT_LATENT.get(args.preset, "40x54x96").split("x"))


def peak_flops(device_name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# ------------------------------------------------------------------ one rank
def worker(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    from vchitect.models import VchitectTransformer3DModel
    from vchitect.models.flops import train_step_flops
    from vchitect.parallel import ParallelConfig, ParallelDims, generator_for_rank, parallelize, parse_layout

    args.layout, args.ac = args.layout[-1], args.ac[-1]
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mcfg = model_config(args.preset)
    F, H, W = latent_shape(args)
    L = args.text_len or DEFAULT_TEXT.get(args.preset, 333)

    dims = ParallelDims(world_size=world, num_heads=mcfg["num_attention_heads"], **parse_layout(args.layout))
    cfg = ParallelConfig(activation_checkpointing=args.ac, ac_ratio=args.ac_ratio, activation_offload=args.offload,
                         compile=args.compile, cpu_offload=args.cpu_offload)
    torch.manual_seed(0)
    with torch.device(device):
        model = VchitectTransformer3DModel(**mcfg)
    parallelize(model, dims, cfg, device_type=device.type)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    C = mcfg["in_channels"]
    b = args.batch
    g = generator_for_rank(0, dims, device=device)
    batch = dict(hidden_states=torch.randn(b, C, F, H, W, generator=g, device=device),
                 encoder_hidden_states=torch.randn(b, L, mcfg["joint_attention_dim"], generator=g, device=device),
                 pooled_projections=torch.randn(b, mcfg["pooled_projection_dim"], generator=g, device=device),
                 timestep=torch.rand(b, generator=g, device=device) * 1000)
    target = torch.randn(b, C, F, H, W, generator=g, device=device)

    def step():
        out = model(**batch).sample
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps

    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
        device_name = torch.cuda.get_device_name()
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (peak RSS)
        device_name = "cpu"
    stats = torch.tensor([peak, dt], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    peak, dt = stats.tolist()
    p = mcfg["patch_size"]
    tokens = dims.dp * b * F * (H // p) * (W // p)
    flops = train_step_flops(mcfg, dims.dp * b, F, H, W, L)
    per_device = flops / dt / world
    pk = peak_flops(device_name, args.peak_tflops) if cuda else None
    if rank == 0:
        print("RESULT " + json.dumps(dict(
            preset=args.preset, layout=args.layout, nproc=world, ac=args.ac if args.ac != "selective"
            else f"selective({args.ac_ratio:g})", offload=args.offload, latent=f"{F}x{H}x{W}", text_len=L,
            batch=dims.dp * b, tokens=tokens, step_s=dt, tokens_per_s=tokens / dt,
            flops_per_step=flops, flops_per_device=per_device, mfu=(per_device / pk) if pk else None,
            peak_gib=peak, device=device_name, memory="max allocated" if cuda else "peak RSS")), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------ launcher
def si_flops(v: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if v >= scale:
            return f"{v / scale:.3g} {unit}FLOP/s"
    return f"{v:.3g} FLOP/s"


def table(rows: list[dict]) -> str:
    cols = [("preset", "{}"), ("layout", "{}"), ("nproc", "{}"), ("ac", "{}"), ("latent", "{}"),
            ("batch", "{}"), ("tokens", "{}"), ("step_s", "{:.4f}"), ("tokens_per_s", "{:,.0f}"),
            ("flops_per_device", si_flops), ("mfu", "{:.1%}"), ("peak_gib", "{:.2f}"), ("device", "{}")]
    head = ["preset", "layout", "ranks", "AC", "latent FxHxW", "batch", "video tokens", "step s",
            "tokens/s", "FLOP/s per device", "MFU", "peak GiB", "device"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = []
        for key, fmt in cols:
            v = r.get(key)
            cells.append("n/a" if v is None else fmt(v) if callable(fmt) else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="tiny, demo, 2b, 8b or a model YAML path")
    ap.add_argument("--nproc", type=int, default=1, help="local ranks (GPUs on a GPU machine)")
    ap.add_argument("--layout", action="append", default=None,
                    help="e.g. tp2,sp2 or dp_shard2 or none (repeat for several rows); "
                         "dp_shard takes the rest of the ranks")
    ap.add_argument("--ac", action="append", default=None, choices=["none", "full", "selective"])
    ap.add_argument("--ac-ratio", type=float, default=0.5)
    ap.add_argument("--offload", action="store_true", help="activation offload of checkpointed block inputs")
    ap.add_argument("--cpu-offload", action="store_true", help="FSDP2 CPU offload of params/optimizer")
    ap.add_argument("--compile", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--shape", help="pixels FxHxW (latent = F × H/8 × W/8)")
    ap.add_argument("--latent", help="latent FxHxW (overrides --shape)")
    ap.add_argument("--text-len", type=int, default=0, help="text tokens (default: tiny 8, 2B 333)")
    ap.add_argument("--batch", type=int, default=1, help="samples per data-parallel group")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per rank")
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    ap.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is present")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from vchitect.parallel.spawn import run_local

    rows = []
    for layout in args.layout or ["none"]:
        for ac in args.ac or ["none"]:
            argv = [__file__, "--worker", "--preset", args.preset, "--layout", layout, "--ac", ac,
                    "--ac-ratio", str(args.ac_ratio), "--compile", args.compile, "--batch", str(args.batch),
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--text-len", str(args.text_len)]
            for flag in ("shape", "latent", "peak_tflops"):
                if getattr(args, flag):
                    argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            argv += ["--offload"] * args.offload + ["--cpu-offload"] * args.cpu_offload + ["--cpu"] * args.cpu
            try:
                results = run_local(argv, args.nproc, timeout=3600, threads=args.threads)
            except Exception as exc:  # one failing row (e.g. out of memory) does not stop the table
                print(f"layout={layout} ac={ac}: failed: {str(exc)[-2000:]}", file=sys.stderr)
                continue
            for line in results[0].stdout.splitlines():
                if line.startswith("RESULT "):
                    rows.append(json.loads(line[len("RESULT "):]))
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if not rows:
        sys.exit(1)


if __name__ == "__main__":
    main()
