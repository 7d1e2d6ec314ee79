"""Tensor parallelism (DTensor) for the Multimodal Diffusion Blocks.

Plan per block (Megatron-style, heads split across the ``tp`` mesh):

* column-wise (input replicated, output split along features = heads): the q/k/v projections of
  every branch — ``to_q/to_k/to_v`` (spatial), ``to_q_temp/to_k_temp/to_v_temp`` (temporal),
  ``to_q_cross`` (cross), ``add_q_proj/add_k_proj/add_v_proj`` (text) — and the first MLP layer
  of both streams (``ff.net.0.proj``, ``ff_context.net.0.proj``);
* row-wise (input split along features, output all-reduced to replicated): ``to_out.0``,
  ``to_out_temporal``, ``to_add_out``, ``to_add_out_temporal`` and the second MLP layers
  (``ff.net.2``, ``ff_context.net.2``);
* ``to_out_context`` is special: its output is added to the spatial attention output *before*
  ``to_out``, i.e. in the head-split feature space. It is row-wise with a reduce-scatter onto the
  feature dimension (output ``Shard(-1)``) so the sum stays head-split — the same bytes as the
  all-reduce of the other row-wise layers, halved (a reduce-scatter is half an all-reduce);
* adaLN modulation (``norm1.linear``, ``norm1_context.linear``), the LayerNorms, embeddings and
  the final layer stay replicated: the modulation is B×6D per video, negligible next to the
  token work, and every TP rank needs all of it. Their gradients are identical on every TP rank
  because the column-wise layers all-reduce the input gradient in backward.
* the attention module's two inputs (normalised video and text tokens) are declared replicated
  DTensors once, at the module boundary, so that the input gradients of its ten column-wise
  projections are summed locally and all-reduced once per stream in backward (the per-layer
  all-reduces of plain ``ColwiseParallel`` would cost 4–7× more for the video stream);
* optional qk RMSNorm weights (``qk_norm: rms_norm``) act per head on head-split tensors, so
  their gradients are partial on each TP rank; they are made replicated DTensors whose inputs are
  sharded on the head dimension, so DTensor all-reduces those gradients.

Sequence-parallel LayerNorm regions (Megatron "SP", residual stream split along tokens between
TP regions) are not used. Each block's normalised input feeds seven video and three text
column-wise projections plus adaLN gating on both streams; the saving of Megatron-SP is the
LayerNorm/residual activations, which Ulysses SP (``sp`` > 1, composable with ``tp``) already
splits along the sequence together with all other activations, at lower communication cost
(all-to-all of q/k/v vs. all-gather + reduce-scatter of the full width per TP region). Use
``sp`` for activation memory and ``tp`` for parameter/compute splitting inside a node.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

COLWISE = ("to_q", "to_k", "to_v", "to_q_temp", "to_k_temp", "to_v_temp", "to_q_cross",
           "add_q_proj", "add_k_proj", "add_v_proj")
ROWWISE = ("to_out.0", "to_out_temporal", "to_add_out", "to_add_out_temporal")
QK_NORMS = ("norm_q", "norm_k", "norm_q_temp", "norm_k_temp", "norm_q_cross", "norm_added_q", "norm_added_k")


def block_plan(block: nn.Module) -> dict:
    """The parallelize_module plan of one MultimodalDiffusionBlock (only modules it has)."""
    names = {n for n, _ in block.named_modules()}
    plan = {
        # One replicated DTensor view of each stream's normalised input for all the column-wise
        # projections that read it: their input gradients add up as a Partial DTensor and are
        # all-reduced once, instead of once per projection (10 → 2 backward all-reduces per block).
        # Called as attn(x, ctx, num_frames, rope, text_mask).
        "attn": PrepareModuleInput(input_layouts=(Replicate(), Replicate(), None, None, None),
                                   desired_input_layouts=(Replicate(), Replicate(), None, None, None),
                                   use_local_output=False),
    }
    for n in COLWISE:
        if f"attn.{n}" in names:
            plan[f"attn.{n}"] = ColwiseParallel()
    for n in ROWWISE:
        if f"attn.{n}" in names:
            plan[f"attn.{n}"] = RowwiseParallel()
    plan["attn.to_out_context"] = RowwiseParallel(output_layouts=Shard(-1))
    for ff in ("ff", "ff_context"):
        if f"{ff}.net.0.proj" in names:
            plan[f"{ff}.net.0.proj"] = ColwiseParallel()
            plan[f"{ff}.net.2"] = RowwiseParallel()
    for n in QK_NORMS:
        if f"attn.{n}" in names:  # N×S×H_local×d: sharded on the head dimension
            plan[f"attn.{n}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard every block of ``model`` over ``tp_mesh`` (in place)."""
    heads = model.config.num_attention_heads
    if heads % tp_mesh.size():
        raise ValueError(f"tp={tp_mesh.size()} does not divide the {heads} attention heads")
    for block in model.transformer_blocks:
        parallelize_module(block, tp_mesh, block_plan(block))


__all__ = ["apply_tensor_parallel", "block_plan"]
