"""FSDP2 (``fully_shard``) over the data-parallel and sequence-parallel ranks.

Parameters are sharded over ``dp_shard × sp`` ranks (the flattened ``fsdp`` mesh): sequence-parallel
ranks hold different tokens but the same weights, so they share the parameter memory like data
ranks do. With ``dp_replicate > 1`` the mesh is 2-D and FSDP2 runs as HSDP (shard inside a group,
replicate across groups). Tensor-parallel parameters are DTensors on the ``tp`` mesh already;
FSDP2 shards them a second time on the data mesh (2-D parallelism).

Gradient reduction: within a sequence-parallel group, gradients are partial sums (see
``ulysses.py``) and must be *added*; across data-parallel groups they are averaged. The divide
factor is therefore the data-parallel size ``dp_replicate × dp_shard``, not the mesh size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from .dims import ParallelDims


def mixed_precision_policy(mode: str, device_type: str) -> MixedPrecisionPolicy:
    """auto: bf16 compute with fp32 reduction (and fp32 master weights) on GPU, fp32 on CPU."""
    if mode == "auto":
        mode = "bf16" if device_type == "cuda" else "fp32"
    if mode == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=None, reduce_dtype=None)


def apply_fsdp(model: nn.Module, dims: ParallelDims, *, mixed_precision: str = "auto", cpu_offload: bool = False,
               reshard_after_forward: bool = True, device_type: str = "cpu") -> nn.Module:
    """``fully_shard`` each block, then the root (embeddings, final layer)."""
    mesh = dims.data_parallel_mesh()
    kwargs = dict(mesh=mesh, mp_policy=mixed_precision_policy(mixed_precision, device_type))
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
    blocks = list(model.transformer_blocks)
    for i, block in enumerate(blocks):
        # The last block's parameters are gathered again right away in backward: keep them.
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kwargs)
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor") and hasattr(module, "_get_fsdp_state"):
            if dims.sp > 1:
                # Only then does the default (the mesh size) differ from what we need. Setting it
                # otherwise would also hit torch's double division when the shard group has size 1.
                module.set_gradient_divide_factor(float(dims.dp))
            if device_type != "cuda":
                # gloo has neither AVG nor PREMUL_SUM reductions: sum, then divide.
                module.set_force_sum_reduction_for_comms(True)
    return model
