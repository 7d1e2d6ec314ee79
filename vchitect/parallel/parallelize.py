"""``parallelize(model, dims, cfg)``: TP → sequence parallel → activation checkpointing → compile → FSDP.

The order matters: tensor parallel first turns block weights into DTensors on the ``tp`` mesh;
Ulysses only installs hooks and attention seams; checkpointing and compile wrap each block's
forward; FSDP2 comes last so that its parameter all-gathers and gradient reduce-scatters wrap
everything inside a block (and shard the TP DTensors a second time, on the data mesh).

Data and randomness. Ranks of one SP/TP group must see the same sample, noise, timestep and
dropout; data-parallel ranks must differ. :func:`data_parallel_slice` picks a rank's share of a
global batch, :func:`seed_for_rank` and :func:`generator_for_rank` derive seeds from the
data-parallel rank only.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .checkpointing import apply_block_wrappers
from .config import ParallelConfig
from .dims import ParallelDims, ParallelLayoutError
from .fsdp import apply_fsdp
from .tensor_parallel import apply_tensor_parallel
from .ulysses import apply_ulysses


def default_device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parallelize(model: nn.Module, dims: ParallelDims, cfg: Optional[ParallelConfig] = None,
                device_type: Optional[str] = None) -> nn.Module:
    """Apply the layout ``dims`` and the options ``cfg`` to ``model`` (a VchitectTransformer3DModel)
    in place and return it. Every check runs before any process group or parameter is touched."""
    cfg = cfg or ParallelConfig()
    device_type = device_type or default_device_type()
    dims.num_heads = model.config.num_attention_heads
    dims._validate()
    compile_blocks = cfg.compile == "on" or (cfg.compile == "auto" and device_type == "cuda")
    bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and device_type == "cuda")
    use_fsdp = dims.fsdp_enabled or bf16 or cfg.cpu_offload
    if dims.tp_enabled or dims.sp_enabled or use_fsdp:
        _ensure_process_group(dims, device_type)
        dims.build_mesh(device_type)
    on_meta = any(p.is_meta for p in model.parameters())  # meta-device init materialises after sharding
    if device_type == "cuda" and not on_meta:
        model.to(torch.device("cuda", torch.cuda.current_device()))

    if dims.tp_enabled:
        apply_tensor_parallel(model, dims.mesh("tp"))
    if dims.sp_enabled:
        apply_ulysses(model, dims.mesh("sp"))
    model._parallel_wrappers = apply_block_wrappers(
        model, ac_mode=cfg.activation_checkpointing, ac_ratio=cfg.ac_ratio, offload=cfg.activation_offload,
        compile_blocks=compile_blocks, device_type=device_type)
    # FSDP2 also carries the bf16 MixedPrecisionPolicy and the CPU offload, so it is applied (on a
    # 1-rank mesh) without data or sequence parallelism when either is wanted.
    if use_fsdp:
        apply_fsdp(model, dims, mixed_precision=cfg.mixed_precision, cpu_offload=cfg.cpu_offload,
                   reshard_after_forward=cfg.reshard_after_forward, device_type=device_type)
    model._parallel_dims = dims
    return model


def _ensure_process_group(dims: ParallelDims, device_type: str) -> None:
    """Check the launched world against the layout; start a 1-rank group for single-device runs."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != dims.world_size:
            raise ParallelLayoutError(
                f"{dims.describe()} was planned for {dims.world_size} ranks but {dist.get_world_size()} were "
                f"launched; build ParallelDims after init_process_group (world_size=None) or launch "
                f"{dims.world_size} ranks")
        return
    if dims.world_size != 1:
        raise ParallelLayoutError(
            f"{dims.describe()} needs {dims.world_size} ranks but torch.distributed is not initialised; "
            f"launch with torchrun / `vchitect train` (which call init_process_group) first")
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


# ------------------------------------------------------------------ data and RNG
def data_parallel_slice(batch_size: int, dims: ParallelDims) -> slice:
    """This rank's rows of a global batch: contiguous, equal per data-parallel group, the same
    for every SP/TP rank of the group."""
    if batch_size % dims.dp:
        raise ValueError(f"global batch {batch_size} is not divisible by the {dims.dp} data-parallel groups "
                         f"(dp_replicate × dp_shard); use a multiple of {dims.dp}")
    per = batch_size // dims.dp
    return slice(dims.dp_rank * per, (dims.dp_rank + 1) * per)


def seed_for_rank(seed: int, dims: ParallelDims, step: int = 0) -> int:
    """A seed equal across an SP/TP group and different across data-parallel groups and steps.

    (seed, data-parallel rank, step) are hashed together (NumPy's SeedSequence), so that no two
    (rank, step) pairs share a stream, as a linear combination would at some step offset."""
    import numpy as np

    state = np.random.SeedSequence([seed, dims.dp_rank, step]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def generator_for_rank(seed: int, dims: ParallelDims, step: int = 0, device="cpu") -> torch.Generator:
    """A generator for noise / timesteps / caption dropout of this rank's samples."""
    g = torch.Generator(device=device)
    g.manual_seed(seed_for_rank(seed, dims, step))
    return g


def manual_seed(seed: int, dims: ParallelDims, step: int = 0) -> None:
    """Seed torch's global RNG (dropout inside the model) per data-parallel group."""
    torch.manual_seed(seed_for_rank(seed, dims, step))
