#!/usr/bin/env python
"""Peak resident memory per rank of model set-up: meta-device init vs building the whole model.

    python benchmarks/meta_init.py                       # every run below (~25 min on 2 CPU cores)
    python benchmarks/meta_init.py --runs overhead,2b-meta

Runs (gloo ranks on this machine, weights in bf16, FSDP over all ranks, initialised from a
randomised checkpoint in the released Vchitect-2.0 format — safetensors in ≤ 1 GiB files plus an
index — written once per shape into ``--tmp`` and deleted at the end):

* ``overhead``: the tiny model, meta init, 4 ranks — the fixed cost of a rank (Python, torch,
  diffusers, gloo, the mesh);
* ``2b-meta``: the 2B preset (configs/model/vchitect-2b.yaml), meta init, 4 ranks;
* ``2b-full-L2`` / ``2b-full-L4``: today's path (seed, constructor, ``load_vchitect2``,
  ``parallelize``) at the 2B width with 2 and 4 layers on 2 ranks: the whole 2B would need ≈ 8 GB
  per rank (model + loaded state dict) — 16 GB for two ranks, more than this machine can spare —
  so it is extrapolated per layer;
* ``8b-meta-L2`` / ``8b-meta-L4``: the 8B width (configs/model/vchitect-8b.yaml) with 2 and 4
  layers, meta init, 8 ranks: the per-layer slope, extrapolated to 28 layers;
* ``8b-full-L1`` / ``8b-full-L2``: today's path at the 8B width with 1 and 2 layers on 2 ranks.

Per rank the worker reports VmHWM (peak resident set, from /proc/self/status, over the whole
process), its share of the weights (local parameter shards + buffers, in bytes) and the bytes it
read from disk (/proc/self/io read_bytes; the checkpoint is dropped from the page cache before each
run, so the sum over ranks shows whether a node reads a tensor more than once).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GiB = 1 << 30
TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=32)
# name: (model, layers, path, ranks)
RUNS = {
    "overhead": ("tiny", 2, "meta", 4),
    "2b-meta": ("2b", 24, "meta", 4),
    "2b-full-L2": ("2b", 2, "full", 2),
    "2b-full-L4": ("2b", 4, "full", 2),
    "8b-meta-L2": ("8b", 2, "meta", 8),
    "8b-meta-L4": ("8b", 4, "meta", 8),
    "8b-full-L1": ("8b", 1, "full", 2),
    "8b-full-L2": ("8b", 2, "full", 2),
}


def model_kwargs(preset: str, layers: int) -> dict:
    if preset == "tiny":
        return {**TINY, "num_layers": layers}
    from vchitect.config import load_config

    cfg = load_config(ROOT / "configs" / "model" / f"vchitect-{preset}.yaml")
    from dataclasses import asdict

    return {**asdict(cfg.model), "num_layers": layers}


def proc_status() -> dict:
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    io = dict(line.split(":", 1) for line in open("/proc/self/io"))
    return {"hwm": int(status["VmHWM"].split()[0]) * 1024, "rss": int(status["VmRSS"].split()[0]) * 1024,
            "read_bytes": int(io["read_bytes"])}


# ------------------------------------------------------------------ one rank
def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from vchitect.models import VchitectTransformer3DModel
    from vchitect.models.weights import load_vchitect2, open_initial_weights
    from vchitect.parallel import ParallelConfig, ParallelDims, build_on_meta, materialize, parallelize
    from vchitect.parallel.meta_init import local_part

    kw = json.loads(args.model)
    dims, pcfg = ParallelDims(dp_shard=-1), ParallelConfig(compile="off")
    t0 = time.time()
    torch.manual_seed(0)
    if args.path == "meta":
        model, record = build_on_meta(lambda: VchitectTransformer3DModel(**kw))
        model.to(torch.bfloat16)  # on meta: free; the replayed init is drawn in fp32 and cast
        weights = open_initial_weights("vchitect2", args.ckpt, model)
        parallelize(model, dims, pcfg, device_type="cpu")
        materialize(model, record, "cpu", seed=0, weights=weights)
    else:  # today's path, in bf16 throughout (its best case: no fp32 copy of the model)
        torch.set_default_dtype(torch.bfloat16)
        model = VchitectTransformer3DModel(**kw)
        load_vchitect2(args.ckpt, model)
        parallelize(model, dims, pcfg, device_type="cpu")
    seconds = time.time() - t0
    parts = [local_part(t)[0] for t in list(model.parameters()) + list(model.buffers())]
    local = sum(t.numel() * t.element_size() for t in parts)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values()) if args.path == "full" else None
    rec = {"rank": dist.get_rank(), "world": dist.get_world_size(), "local_bytes": local, "seconds": seconds,
           "params": sum(p.numel() for p in model.parameters()), **proc_status()}
    Path(f"{args.out}.rank{dist.get_rank()}").write_text(json.dumps(rec))
    del total
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------ the driver
def write_checkpoint(kw: dict, folder: Path, shard_bytes: int = GiB) -> int:
    """A randomised bf16 checkpoint of this shape, tensor by tensor (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file

    from vchitect.models.weights import INDEX_NAME
    from vchitect.parallel import build_on_meta
    from vchitect.models import VchitectTransformer3DModel

    model, _ = build_on_meta(lambda: VchitectTransformer3DModel(**kw))
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(1)
    groups, part, size = [], [], 0
    for key, t in model.state_dict().items():
        if part and size + t.numel() * 2 > shard_bytes:
            groups.append(part)
            part, size = [], 0
        part.append((key, tuple(t.shape)))
        size += t.numel() * 2
    groups.append(part)
    weight_map, total = {}, 0
    for i, part in enumerate(groups):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16) for k, shape in part}
        save_file(tensors, str(folder / name))
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update({k: name for k, _ in part})
        del tensors
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    return total


def drop_page_cache(folder: Path) -> None:
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(name: str, tmp: Path) -> dict:
    from vchitect.parallel.spawn import run_local

    preset, layers, path, ranks = RUNS[name]
    kw = model_kwargs(preset, layers)
    ckpt = tmp / f"{preset}-L{layers}"
    ckpt_bytes = write_checkpoint(kw, ckpt) if not ckpt.exists() else sum(f.stat().st_size for f in ckpt.iterdir())
    drop_page_cache(ckpt)
    out = tmp / f"{name}.json"
    argv = [str(Path(__file__).resolve()), "--worker", "--path", path, "--ckpt", str(ckpt), "--out", str(out),
            "--model", json.dumps(kw)]
    t0 = time.time()
    run_local(argv, ranks, timeout=3600)
    ranks_out = [json.loads(Path(f"{out}.rank{r}").read_text()) for r in range(ranks)]
    rec = {"name": name, "preset": preset, "layers": layers, "path": path, "ranks": ranks,
           "checkpoint_bytes": ckpt_bytes, "wall_seconds": round(time.time() - t0, 1), "per_rank": ranks_out}
    print(json.dumps({k: v for k, v in rec.items() if k != "per_rank"}), flush=True)
    for r in ranks_out:
        print(f"  rank {r['rank']}: peak {r['hwm'] / GiB:.3f} GiB, weights held {r['local_bytes'] / GiB:.3f} GiB, "
              f"read from disk {r['read_bytes'] / GiB:.3f} GiB, set-up {r['seconds']:.1f} s", flush=True)
    return rec


def summarise(results: dict) -> str:
    """The RESULTS.md table and the extrapolations (the arithmetic is printed)."""
    lines = []

    def worst(rec):
        return max(rec["per_rank"], key=lambda r: r["hwm"])

    over = worst(results["overhead"])["hwm"] if "overhead" in results else None
    if over is not None:
        lines.append(f"fixed overhead (tiny model, meta init, 4 ranks): peak {over / GiB:.3f} GiB per rank")

    def line(rec, note=""):
        w = worst(rec)
        reads = sum(r["read_bytes"] for r in rec["per_rank"])
        ratio = (w["hwm"] - over) / w["local_bytes"] if over is not None else float("nan")
        lines.append(f"{rec['name']}: {rec['layers']} layers on {rec['ranks']} ranks ({rec['path']}): peak "
                     f"{w['hwm'] / GiB:.3f} GiB/rank, weights held {w['local_bytes'] / GiB:.3f} GiB/rank, "
                     f"(peak − overhead) / held = {ratio:.2f}; node total {sum(r['hwm'] for r in rec['per_rank']) / GiB:.2f} GiB; "
                     f"disk reads {reads / GiB:.3f} GiB of a {rec['checkpoint_bytes'] / GiB:.3f} GiB checkpoint {note}")

    for rec in results.values():
        if rec["name"] != "overhead":
            line(rec)

    def extrapolate(a, b, target_layers, label):
        if a not in results or b not in results:
            return
        ra, rb = results[a], results[b]
        wa, wb = worst(ra), worst(rb)
        dl = rb["layers"] - ra["layers"]
        slope_hwm = (wb["hwm"] - wa["hwm"]) / dl
        slope_held = (wb["local_bytes"] - wa["local_bytes"]) / dl
        n = target_layers - rb["layers"]
        # a layer's weights stay resident, so the peak grows at least by what a layer adds to the held bytes
        slope = max(slope_hwm, slope_held)
        hwm = wb["hwm"] + n * slope
        held = wb["local_bytes"] + n * slope_held
        lines.append(f"{label}: per layer +{slope_hwm / GiB:.4f} GiB peak, +{slope_held / GiB:.4f} GiB held "
                     f"({a} → {b}); {target_layers} layers: peak {wb['hwm'] / GiB:.3f} + {n} × "
                     f"{slope / GiB:.4f} = {hwm / GiB:.3f} GiB/rank, held {held / GiB:.3f} GiB/rank")
        return hwm, held

    extrapolate("2b-full-L2", "2b-full-L4", 24, "2B today (2 ranks)")
    extrapolate("8b-full-L1", "8b-full-L2", 28, "8B today (per rank, any rank count)")
    r = extrapolate("8b-meta-L2", "8b-meta-L4", 28, "8B meta init (8 ranks)")
    if r and over is not None:
        hwm, held = r
        lines.append(f"8B meta init target: 1.5 × {held / GiB:.3f} + {over / GiB:.3f} = "
                     f"{(1.5 * held + over) / GiB:.3f} GiB/rank vs {hwm / GiB:.3f} GiB/rank")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", choices=["meta", "full"])
    ap.add_argument("--ckpt")
    ap.add_argument("--out")
    ap.add_argument("--model")
    ap.add_argument("--runs", default=",".join(RUNS), help="comma-separated: " + ", ".join(RUNS))
    ap.add_argument("--tmp", default="/tmp/vchitect-meta-init-bench", help="checkpoints go here (deleted at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for name in args.runs.split(","):
            results[name] = run(name, tmp)
            (tmp.parent / "meta_init_results.json").write_text(json.dumps(results, indent=1))
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(summarise(results))


if __name__ == "__main__":
    main()
