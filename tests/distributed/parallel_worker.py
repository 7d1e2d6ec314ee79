"""Worker of the parallel exactness tests: one process of a gloo group that runs many layouts.

Launched by ``tests/distributed/test_parallel_layouts.py`` (``python parallel_worker.py --out F``
with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set). For every case it builds the tiny
model from the same seed, runs a single-process reference on the global batch, parallelizes a
copy with the case's layout, and compares the loss and every gradient after one step and every
parameter after three AdamW steps. It then checks meta-device init with the case's layout: the
local shards of meta init + sharded load (random init, a released-format checkpoint, an SD3
checkpoint) against those of the full-build path. Rank 0 writes one JSON record per case to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

torch.set_num_threads(1)

from vchitect.models import VchitectTransformer3DModel  # noqa: E402
from vchitect.parallel import (ParallelConfig, ParallelDims, data_parallel_slice,  # noqa: E402
                               generator_for_rank, manual_seed, parallelize)
from vchitect.parallel.grad_norm import clip_grad_norm_  # noqa: E402

TINY = dict(sample_size=16, in_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=24, pooled_projection_dim=12, pos_embed_max_size=32)
GLOBAL_BATCH = 4
TEXT_LEN = 6
LR = 1e-2
# Adam's eps: the key biases of softmax attention have a mathematically zero gradient (a per-query
# constant shift of the logits), so their computed gradient is rounding noise of ~1e-11; with the
# default eps=1e-8 Adam rescales that noise to lr-sized updates that no two summation orders
# reproduce. eps=1e-6 keeps the three-step comparison about the parallel code, not about noise.
ADAM_EPS = 1e-6

# The condition adapter on (vae factors 2 in space and time: pixel condition 2× the latent, 1 + 2·(F − 1)
# frames); build_model gives its zero-initialised output layer weights, make_batch adds a condition.
ADAPTER = dict(condition_channels=4, condition_vae_spatial_factor=2, condition_vae_temporal_factor=2,
               condition_hidden_channels=4)

# RepVideo layer aggregation on 4 layers, one window of 4: blocks 2 and 3 mix (means of 2 and 3 outputs, the
# last, context-pre-only block included); on 3 layers (cheaper, for the 4-rank group) block 2, the last, mixes.
# build_model gives the learned gates values away from their zero init.
REPVIDEO = dict(num_layers=4, repvideo=dict(window=4, gate="learned"))
REPVIDEO_3 = dict(num_layers=3, repvideo=dict(window=3, gate="learned"))

# name: (world size, layout, options)
CASES = {
    # 2 ranks
    "dp_shard2": (2, dict(dp_shard=2), {}),
    "dp_replicate2": (2, dict(dp_replicate=2, dp_shard=1), {}),
    "sp2": (2, dict(dp_shard=1, sp=2), {}),
    "tp2": (2, dict(dp_shard=1, tp=2), {}),
    "sp2_nondivisible": (2, dict(dp_shard=1, sp=2), dict(height=10, width=14)),  # 5×7 = 35 tokens
    "sp2_f1": (2, dict(dp_shard=1, sp=2), dict(frames=1)),
    "tp2_f1": (2, dict(dp_shard=1, tp=2), dict(frames=1)),
    "sp2_ac_full_offload": (2, dict(dp_shard=1, sp=2), dict(ac="full", offload=True)),
    "dp_shard2_ac_selective": (2, dict(dp_shard=2), dict(ac="selective", ratio=0.5)),
    "tp2_ac_full_offload": (2, dict(dp_shard=1, tp=2), dict(ac="full", offload=True)),
    "dp_shard2_cpu_offload": (2, dict(dp_shard=2), dict(cpu_offload=True)),
    "tp2_qk_norm": (2, dict(dp_shard=1, tp=2), dict(model=dict(qk_norm="rms_norm"))),
    "sp2_nondivisible_adapter": (2, dict(dp_shard=1, sp=2), dict(height=10, width=14, model=ADAPTER)),
    "tp2_adapter": (2, dict(dp_shard=1, tp=2), dict(model=ADAPTER)),
    "dp_shard2_adapter": (2, dict(dp_shard=2), dict(model=ADAPTER)),
    "sp2_nondivisible_ac_offload_repvideo": (2, dict(dp_shard=1, sp=2), dict(height=10, width=14, ac="full",
                                                                            offload=True, model=REPVIDEO)),
    # 4 ranks
    "sp4": (4, dict(dp_shard=1, sp=4), {}),
    "sp4_nondivisible": (4, dict(dp_shard=1, sp=4), dict(height=10, width=14)),  # 35 → 36
    "tp2_sp2": (4, dict(dp_shard=1, tp=2, sp=2), {}),
    "dp_shard2_sp2": (4, dict(dp_shard=2, sp=2), {}),
    "dp_replicate2_dp_shard2": (4, dict(dp_replicate=2, dp_shard=2), {}),
    "tp2_dp_shard2": (4, dict(dp_shard=2, tp=2), {}),
    "tp2_sp2_f1": (4, dict(dp_shard=1, tp=2, sp=2), dict(frames=1)),
    "dp_replicate2_sp2_ac_offload": (4, dict(dp_replicate=2, dp_shard=1, sp=2), dict(ac="full", offload=True)),
    "tp2_dp_shard2_ac_offload": (4, dict(dp_shard=2, tp=2), dict(ac="selective", ratio=0.5, offload=True)),
    "tp2_sp2_qk_norm_nondivisible": (4, dict(dp_shard=1, tp=2, sp=2),
                                     dict(height=10, width=14, model=dict(qk_norm="rms_norm"))),
    "tp2_sp2_adapter": (4, dict(dp_shard=1, tp=2, sp=2), dict(model=ADAPTER)),
    "tp2_sp2_ac_repvideo": (4, dict(dp_shard=1, tp=2, sp=2), dict(ac="full", model=REPVIDEO_3)),
}


# RNG / data assignment: (world size, layout)
RNG_CASES = {
    "rng_dp_shard2_sp2": (4, dict(dp_shard=2, sp=2)),
    "rng_dp_replicate2_tp2": (4, dict(dp_replicate=2, dp_shard=1, tp=2)),
    "rng_tp2_sp2": (4, dict(dp_shard=1, tp=2, sp=2)),
    "rng_dp_shard2": (2, dict(dp_shard=2)),
}


_DIMS: dict = {}


def layout_dims(world: int, layout: dict) -> ParallelDims:
    """One ParallelDims (so one set of meshes and process groups) per layout for the whole worker:
    every parallelize of a layout reuses its meshes. Building new ones for each of the ~7 models a
    layout parallelizes left gloo groups and their threads piling up, and later cases ran 10× slower."""
    key = json.dumps(layout, sort_keys=True)
    if key not in _DIMS:
        _DIMS[key] = ParallelDims(world_size=world, **layout)
    return _DIMS[key]


def run_rng_case(name: str, layout: dict, world: int) -> dict:
    """Ranks of one SP/TP group must draw the same noise / dropout and get the same rows of the
    global batch; data-parallel groups must differ."""
    dims = layout_dims(world, layout)
    dims.build_mesh("cpu")
    noise = torch.randn(4, generator=generator_for_rank(7, dims, step=3))
    manual_seed(7, dims, step=3)
    drop = torch.rand(4)
    rows = data_parallel_slice(8, dims)
    mine = torch.cat([torch.tensor([float(dims.dp_rank), float(rows.start)]), noise, drop])
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    problems = []
    for a in range(world):
        for b in range(world):
            same_group = every[a][0] == every[b][0]
            same_draws = torch.equal(every[a][1:], every[b][1:])
            if same_group != same_draws:
                problems.append(f"ranks {a},{b}: dp groups {int(every[a][0])},{int(every[b][0])} "
                                f"but draws {'equal' if same_draws else 'different'}")
    groups = sorted({int(e[0]) for e in every})
    if groups != list(range(dims.dp)):
        problems.append(f"dp ranks {groups}, expected 0..{dims.dp - 1}")
    return dict(name=name, world=world, layout=layout, ok=True, rng_ok=not problems, problems=problems)


def build_model(**overrides) -> VchitectTransformer3DModel:
    torch.manual_seed(0)
    model = VchitectTransformer3DModel(**{**TINY, **overrides})
    # The temporal and cross outputs start at zero, which would leave their q/k/v without gradient
    # at step one; give them small weights so every branch is exercised from the first step.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("to_out_temporal", "to_out_context", "to_add_out_temporal",
                                       "condition_adapter.conv_out")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            elif name == "layer_aggregation.gate":  # last: the draws above are those of the model without it
                p.copy_(0.25 + 0.5 * torch.rand(p.shape, generator=g))
    return model


def make_batch(step: int, frames: int, height: int, width: int, adapter: bool = False) -> dict:
    g = torch.Generator().manual_seed(100 + step)
    B = GLOBAL_BATCH
    mask = torch.ones(B, TEXT_LEN, dtype=torch.bool)
    mask[1, -2:] = False
    mask[3, -3:] = False
    batch = dict(
        hidden_states=torch.randn(B, 4, frames, height, width, generator=g),
        encoder_hidden_states=torch.randn(B, TEXT_LEN, 24, generator=g),
        pooled_projections=torch.randn(B, 12, generator=g),
        timestep=torch.rand(B, generator=g) * 1000,
        encoder_attention_mask=mask,
        target=torch.randn(B, 4, frames, height, width, generator=g),
    )
    if adapter:  # pixel-space condition (RGB × mask, mask), as encode_batch makes it
        shape = (B, 1, 1 + 2 * (frames - 1), 2 * height, 2 * width)
        known = (torch.rand(shape, generator=g) > 0.5).float()
        rgb = (torch.rand((B, 3, *shape[2:]), generator=g) * 2 - 1) * known
        batch["condition"] = torch.cat([rgb, known], dim=1)
    return batch


def loss_fn(model, batch: dict, rows: slice) -> torch.Tensor:
    inputs = {k: v[rows] for k, v in batch.items() if k != "target"}
    out = model(**inputs).sample
    return torch.nn.functional.mse_loss(out, batch["target"][rows])


def full(t):
    if t is None:
        return None
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = b.norm().item()
    diff = (a - b).norm().item()
    return diff / denom if denom > 0 else diff


def case_config(opts: dict) -> ParallelConfig:
    return ParallelConfig(activation_checkpointing=opts.get("ac", "none"), ac_ratio=opts.get("ratio", 0.5),
                          activation_offload=opts.get("offload", False), compile="off",
                          cpu_offload=opts.get("cpu_offload", False))


def run_case(name: str, layout: dict, opts: dict, world: int) -> dict:
    frames, height, width = opts.get("frames", 3), opts.get("height", 16), opts.get("width", 16)
    ref = build_model(**opts.get("model", {}))
    model = copy.deepcopy(ref)
    adapter = ref.condition_adapter is not None
    t0 = time.time()

    # single-process reference on the global batch
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, weight_decay=0.01, eps=ADAM_EPS)
    ref_losses, ref_grads = [], None
    for step in range(3):
        batch = make_batch(step, frames, height, width, adapter)
        loss = loss_fn(ref, batch, slice(None))
        loss.backward()
        if step == 0:
            ref_grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in ref.named_parameters()}
            # clip to half the norm, so that clipping really acts in both runs
            ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")).item()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5 * ref_norm)
        ref_losses.append(loss.item())
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    dims = layout_dims(world, layout)
    parallelize(model, dims, case_config(opts), device_type="cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, eps=ADAM_EPS)
    rows = data_parallel_slice(GLOBAL_BATCH, dims)
    losses, grad_errs, none_mismatch = [], {}, []
    for step in range(3):
        batch = make_batch(step, frames, height, width, adapter)
        loss = loss_fn(model, batch, rows)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world)
        if step == 0:
            for n, p in model.named_parameters():
                g = full(p.grad)
                r = ref_grads[n]
                if (g is None) != (r is None):
                    none_mismatch.append(n)
                elif g is not None:
                    grad_errs[n] = rel_err(g, r)
            # both runs clip at step 0, so the three-step comparison covers clipping too
            norm_err = abs(clip_grad_norm_(model.parameters(), 0.5 * ref_norm).item() - ref_norm) / ref_norm
        opt.step()
        opt.zero_grad(set_to_none=True)
    param_errs = {n: rel_err(full(p.detach()), dict(ref.named_parameters())[n].detach())
                  for n, p in model.named_parameters()}
    worst_grad = max(grad_errs, key=grad_errs.get)
    worst_param = max(param_errs, key=param_errs.get)
    return dict(
        name=name, world=world, layout=layout, opts=opts, ok=True,
        loss_ref=ref_losses, loss=losses,
        loss_err=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
        grad_err=grad_errs[worst_grad], worst_grad=worst_grad,
        param_err=param_errs[worst_param], worst_param=worst_param,
        none_mismatch=none_mismatch, checked_grads=len(grad_errs), grad_norm_err=norm_err,
        adapter_grads=sum(n.startswith("condition_adapter.") and ref_grads[n].abs().sum().item() > 0
                          for n in grad_errs),
        repvideo_gate_grads=(int((ref_grads["layer_aggregation.gate"] != 0).sum().item())
                             if "layer_aggregation.gate" in grad_errs else 0),
        seconds=round(time.time() - t0, 2),
    )


# ------------------------------------------------------------------ meta-device init
# Uneven shards: the MLP width 86 splits 22/22/22/20 over 4 ranks and 43 → 22/21 under TP 2 + FSDP 2;
# proj_out has 3 rows (patch 1, 3 channels), so one of 4 FSDP ranks holds an empty shard.
META_MODEL = dict(mlp_ratio=2.7, patch_size=1, in_channels=3)
META_SEED = 5
_CHECKPOINTS: dict = {}


def meta_checkpoints(model_kw: dict, folder: Path) -> dict:
    """A released-format checkpoint (bf16, two files and an index, with the position table) and an
    SD3-style one (fp32, one file, image-model keys only) of this model shape, with values unlike
    any init; written by rank 0 once per shape."""
    key = json.dumps(model_kw, sort_keys=True)
    if key not in _CHECKPOINTS:
        out = folder / f"meta-ckpt-world{dist.get_world_size()}-{len(_CHECKPOINTS)}"  # groups share folder
        if dist.get_rank() == 0:
            from safetensors.torch import save_file

            from vchitect.models.weights import INDEX_NAME, VIDEO_ONLY

            g = torch.Generator().manual_seed(11)
            own = VchitectTransformer3DModel(**model_kw).state_dict()
            state = {k: v + torch.randn(v.shape, generator=g) for k, v in own.items()}
            (out / "released").mkdir(parents=True)
            keys = sorted(state)
            files = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
                     "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
            for file, part in files.items():
                save_file({k: state[k].to(torch.bfloat16).contiguous() for k in part}, str(out / "released" / file))
            (out / "released" / INDEX_NAME).write_text(json.dumps(
                {"weight_map": {k: file for file, part in files.items() for k in part}}))
            sd3 = {k: v.contiguous() for k, v in state.items()
                   if k != "pos_embed.pos_embed" and not any(f".{part}." in k for part in VIDEO_ONLY)}
            save_file(sd3, str(out / "sd3.safetensors"))
        dist.barrier()
        _CHECKPOINTS[key] = {"vchitect2": out / "released", "sd3": out / "sd3.safetensors"}
    return _CHECKPOINTS[key]


def local_tensors(model) -> dict:
    from vchitect.parallel.meta_init import local_part

    named = list(model.named_parameters()) + list(model.named_buffers())
    return {n: (local_part(t)[0], tuple(getattr(t, "placements", ()))) for n, t in named}


def run_meta_case(layout: dict, opts: dict, world: int, folder: Path) -> dict:
    """Meta init + sharded load against the full-build path, per source: every local shard (and
    buffer) must be bitwise equal, with the same placements."""
    from vchitect.models.weights import init_from_sd3, load_vchitect2, open_initial_weights
    from vchitect.parallel.meta_init import build_on_meta, materialize

    model_kw = {**TINY, **opts.get("model", {}), **META_MODEL}
    paths = meta_checkpoints(model_kw, folder)
    result = {}
    for source in ("random", "vchitect2", "sd3"):
        torch.manual_seed(META_SEED)
        ref = VchitectTransformer3DModel(**model_kw)
        if source != "random":
            (load_vchitect2 if source == "vchitect2" else init_from_sd3)(paths[source], ref)
        parallelize(ref, layout_dims(world, layout), case_config(opts), device_type="cpu")
        expected = local_tensors(ref)

        model, record = build_on_meta(lambda: VchitectTransformer3DModel(**model_kw))
        weights = None if source == "random" else open_initial_weights(source, paths[source], model)
        parallelize(model, layout_dims(world, layout), case_config(opts), device_type="cpu")
        loaded = materialize(model, record, "cpu", seed=META_SEED, weights=weights)
        got = local_tensors(model)
        mismatch = sorted(n for n in expected if n not in got or got[n][1] != expected[n][1]
                          or not torch.equal(got[n][0], expected[n][0]))
        result[source] = dict(mismatch=mismatch, checked=len(expected), loaded=len(loaded),
                              sharded=sum(bool(p) for _, p in expected.values()),
                              local_elements=sum(t.numel() for t, _ in got.values()),
                              elements=sum(t.numel() for t in ref.state_dict().values()))
        del ref, model
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", default="")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    everything = {**CASES, **{n: (w, layout, None) for n, (w, layout) in RNG_CASES.items()}}
    wanted = [c for c in args.cases.split(",") if c] or [n for n, (w, _, _) in everything.items() if w == world]
    records = []
    for name in wanted:
        w, layout, opts = everything[name]
        try:
            rec = run_rng_case(name, layout, world) if opts is None else run_case(name, layout, opts, world)
            if opts is not None:
                t0 = time.time()
                rec["meta"] = run_meta_case(layout, opts, world, Path(args.out).parent)
                rec["meta_seconds"] = round(time.time() - t0, 2)
        except Exception as exc:  # record and go on, so one broken layout does not hide the others
            rec = dict(name=name, ok=False, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc()[-3000:])
        records.append(rec)
        if rank == 0:
            print(json.dumps({k: rec.get(k) for k in ("name", "ok", "loss_err", "grad_err", "param_err",
                                                       "seconds", "meta_seconds", "error")}), flush=True)
        dist.barrier()
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
