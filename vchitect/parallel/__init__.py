"""Parallelism for the Vchitect transformer: see docs/parallelism.md.

``ParallelDims`` owns the meshes; ``parallelize(model, dims, cfg)`` applies tensor parallel,
Ulysses sequence parallel, activation checkpointing/offload, compile and FSDP2, in that order.
"""

import vchitect.config  # noqa: F401  (first: it imports .config back, which needs its `setting`)

from .config import ParallelConfig
from .dims import ParallelDims, ParallelLayoutError, parse_layout
from .grad_norm import clip_grad_norm_, total_grad_norm
from .parallelize import (data_parallel_slice, generator_for_rank, manual_seed, parallelize,
                          seed_for_rank)

__all__ = ["ParallelConfig", "ParallelDims", "ParallelLayoutError", "parse_layout", "parallelize",
           "data_parallel_slice", "seed_for_rank", "generator_for_rank", "manual_seed", "clip_grad_norm_", "total_grad_norm"]
