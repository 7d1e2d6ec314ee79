#!/usr/bin/env python
"""Bytes each rank sends per training step (forward + backward) for Ulysses SP and tensor parallel.

    python benchmarks/parallel_comm.py                  # tiny on gloo + 2B at 40×432×768
    python benchmarks/parallel_comm.py --preset 2b --sp 2 4 8 --tp 2 4 8

For every layout the script prints the analytic figure (the formulas in ``analytic_bytes``, also
in docs/parallelism.md) next to a *measured* one, obtained by running a real forward + backward
of the parallelized model and counting every collective it issues (a dispatch mode sees the
c10d and functional-collective ops, including those of autograd's backward) with the standard
per-rank send volumes of ring / pairwise algorithms:

    all-reduce of n bytes 2n(P−1)/P · reduce-scatter of n input bytes n(P−1)/P ·
    all-gather of n input bytes n(P−1) · all-to-all of n input bytes n(P−1)/P

Backends: the tiny preset runs on ``gloo`` with P real processes. The 2B preset at 40 frames of
432×768 pixels (latent 40×54×96 after the 8× VAE; 27×48 = 1,296 tokens per frame, 51,840 per
sample) does not fit a CPU step, so it runs the *same code* on the ``fake`` process-group backend
with meta tensors in one process (rank 0 of P): collectives are recorded with their true shapes
but not executed. Only SP / TP traffic is counted — FSDP parameter traffic is left out (FSDP is
not applied here; see docs/parallelism.md for its formula).

Element size: fp32 here (CPU); with bf16 compute on GPU every activation figure halves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHAPES = {"tiny": ("4x16x16", 8), "2b": ("40x54x96", 333)}  # latent F×H×W, text tokens


# ------------------------------------------------------------------ analytic
def analytic_bytes(m: dict, kind: str, P: int, B: int, F: int, H: int, W: int, L: int, elem: int = 4,
                   backend: str = "gloo") -> dict:
    """Per-rank bytes sent in one forward + backward, by collective."""
    p, D = m["patch_size"], m["num_attention_heads"] * m["attention_head_dim"]
    S = (H // p) * (W // p)
    N = B * F
    layers = m["num_layers"]
    c_out = (m.get("out_channels") or m["in_channels"]) * p * p
    f = (P - 1) / P
    out: dict = {}

    def add(key, elems):
        out[key] = out.get(key, 0.0) + elems * elem

    if kind == "sp":
        S_loc = -(-S // P)
        for i in range(layers):
            Lq = 0 if i == layers - 1 else L
            add("all_to_all", 2 * (3 + 1) * N * S_loc * D * f)  # q/k/v + output, forward and backward
            add("all_gather", (P - 1) * N * Lq * D / P)  # text-query output heads (forward)
            if backend == "nccl":
                add("reduce_scatter", N * Lq * D * f)  # its backward
            else:
                add("all_reduce", 2 * N * Lq * D * f)  # gloo: all-reduce + slice
        add("all_gather", (P - 1) * N * S_loc * c_out)  # output tokens gathered for the loss
        return out
    # tensor parallel
    temporal = F > 1
    for i in range(layers):
        last = i == layers - 1
        Q = S if last else S + L
        # forward all-reduces of row-wise outputs: to_out, ff.net.2 (+ to_out_temporal)
        video_rows = 2 + temporal
        text_rows = 0 if last else 2 + temporal  # to_add_out, ff_context.net.2 (+ to_add_out_temporal)
        add("all_reduce", 2 * f * (N * S * D * video_rows + N * L * D * text_rows))
        add("reduce_scatter", f * N * Q * D)  # to_out_context (forward)
        add("all_gather", f * N * Q * D)  # its backward
        # backward all-reduces of column-wise input gradients: one for the attention input of each
        # stream (all its q/k/v projections together) and one per MLP input
        video_cols = 2  # attn x, ff
        text_cols = 1 if last else 2  # attn ctx (+ ff_context)
        add("all_reduce", 2 * f * (N * S * D * video_cols + N * L * D * text_cols))
    return out


# ------------------------------------------------------------------ measurement (one rank)
def _group_size(name: str, args) -> int:
    import torch.distributed as dist

    for a in args:
        if isinstance(a, str):
            try:
                return dist.distributed_c10d._resolve_process_group(a).size()
            except Exception:
                continue
        if type(a).__name__ == "ScriptObject" or "ProcessGroup" in type(a).__name__:
            try:
                return dist.ProcessGroup.unbox(a).size()
            except Exception:
                try:
                    return a.size()
                except Exception:
                    continue
    return dist.get_world_size()


def count_collectives():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    def nbytes(t):
        return t.numel() * t.element_size()

    class CommCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.bytes: dict = {}
            self.calls: dict = {}

        def _add(self, kind, b):
            self.bytes[kind] = self.bytes.get(kind, 0.0) + b
            self.calls[kind] = self.calls.get(kind, 0) + 1

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
            if "c10d" in name and "wait" not in name and "barrier" not in name:
                P = _group_size(name, list(args) + list((kwargs or {}).values()))
                f = (P - 1) / P
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
                if "alltoall" in name or "all_to_all" in name:
                    inp = tensors[1] if "alltoall_base" in name else tensors[0]
                    self._add("all_to_all", nbytes(inp) * f)
                elif "allreduce" in name or "all_reduce" in name:
                    t = lists[0][0] if lists else tensors[0]
                    self._add("all_reduce", 2 * nbytes(t) * f)
                elif "allgather" in name or "all_gather" in name:
                    inp = tensors[1] if "_allgather_base" in name else tensors[0]
                    self._add("all_gather", nbytes(inp) * (P - 1))
                elif "reduce_scatter" in name:
                    inp = tensors[1] if "_reduce_scatter_base" in name else tensors[0]
                    self._add("reduce_scatter", nbytes(inp) * f)
                elif "broadcast" in name or "scatter" in name:
                    self._add("other", nbytes(tensors[0]) if tensors else 0)
            return func(*args, **(kwargs or {}))

    return CommCounter()


def worker(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from step import model_config
    from vchitect.models import VchitectTransformer3DModel
    from vchitect.parallel.tensor_parallel import apply_tensor_parallel
    from vchitect.parallel.ulysses import apply_ulysses

    torch.set_num_threads(1)
    if args.backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore

        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.size)
        device = torch.device("meta")
    else:
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    m = model_config(args.preset)
    F, H, W = (int(v) for v in args.latent.split("x"))
    for kind in args.kind.split(","):  # one fresh model and mesh per kind, same process group
        torch.manual_seed(0)
        with torch.device(device):
            model = VchitectTransformer3DModel(**m)
        mesh = init_device_mesh("cpu", (args.size,), mesh_dim_names=(kind,))
        if kind == "sp":
            apply_ulysses(model, mesh)
        else:
            apply_tensor_parallel(model, mesh)
        B = args.batch
        with torch.device(device):
            inputs = dict(hidden_states=torch.randn(B, m["in_channels"], F, H, W),
                          encoder_hidden_states=torch.randn(B, args.text_len, m["joint_attention_dim"]),
                          pooled_projections=torch.randn(B, m["pooled_projection_dim"]),
                          timestep=torch.rand(B) * 1000)
        counter = count_collectives()
        with counter:
            out = model(**inputs).sample
            out.float().pow(2).mean().backward()
        if dist.get_rank() == 0:
            print(f"RESULT {kind} " + json.dumps(dict(bytes=counter.bytes, calls=counter.calls)), flush=True)
    dist.destroy_process_group()


# ------------------------------------------------------------------ launcher
def fmt_bytes(b: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:.2f} {unit}"
    return f"{b:.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", default=["tiny", "2b"])
    ap.add_argument("--sp", nargs="+", type=int, default=None, help="SP sizes (default tiny: 2 4, 2b: 2 4 8)")
    ap.add_argument("--tp", nargs="+", type=int, default=None, help="TP sizes (default tiny: 2 4, 2b: 2 4 8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--json", help="write the rows here too")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", help=argparse.SUPPRESS)
    ap.add_argument("--size", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="gloo", help=argparse.SUPPRESS)
    ap.add_argument("--latent", help=argparse.SUPPRESS)
    ap.add_argument("--text-len", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.preset = args.preset[0]
        return worker(args)

    from step import model_config
    from vchitect.parallel.spawn import run_local

    rows = []
    for preset in args.preset:
        latent, L = SHAPES.get(preset, SHAPES["2b"])
        F, H, W = (int(v) for v in latent.split("x"))
        m = model_config(preset)
        backend = "gloo" if preset == "tiny" else "fake"
        default_sizes = [2, 4] if preset == "tiny" else [2, 4, 8]
        sizes = {"sp": args.sp or default_sizes, "tp": args.tp or default_sizes}
        for P in sorted(set(sizes["sp"]) | set(sizes["tp"])):
            kinds = [k for k in ("sp", "tp") if P in sizes[k]]
            argv = [__file__, "--worker", "--preset", preset, "--kind", ",".join(kinds), "--size", str(P),
                    "--backend", backend, "--latent", latent, "--text-len", str(L), "--batch", str(args.batch)]
            res = run_local(argv, P if backend == "gloo" else 1, timeout=1800)
            for kind in kinds:
                line = next(x for x in res[0].stdout.splitlines() if x.startswith(f"RESULT {kind} "))
                measured = json.loads(line[len(f"RESULT {kind} "):])
                ana = analytic_bytes(m, kind, P, args.batch, F, H, W, L)
                rows.append(dict(preset=preset, kind=kind, size=P, latent=latent, text_len=L, backend=backend,
                                 analytic=ana, measured=measured["bytes"], calls=measured["calls"],
                                 analytic_total=sum(ana.values()), measured_total=sum(measured["bytes"].values())))
                r = rows[-1]
                print(f"{preset:5s} {kind}{P}: analytic {fmt_bytes(r['analytic_total'])}, "
                      f"measured {fmt_bytes(r['measured_total'])}", file=sys.stderr, flush=True)
    print("| preset | latent F×H×W, text | layout | backend | analytic / rank / step | measured / rank / step "
          "| measured by collective (calls) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        detail = ", ".join(f"{k} {fmt_bytes(v)} ({r['calls'][k]})" for k, v in sorted(r["measured"].items()))
        print(f"| {r['preset']} | {r['latent']}, {r['text_len']} | {r['kind']}{r['size']} | {r['backend']} | "
              f"{fmt_bytes(r['analytic_total'])} | {fmt_bytes(r['measured_total'])} | {detail} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
