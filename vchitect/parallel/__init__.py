"""Parallelism for the Vchitect transformer: see docs/parallelism.md.

``ParallelDims`` owns the meshes; ``parallelize(model, dims, cfg)`` applies tensor parallel,
Ulysses sequence parallel, activation checkpointing/offload, compile and FSDP2, in that order;
``build_on_meta`` / ``materialize`` build a model without memory and fill only the local shards.
The names below are imported on first use (:mod:`vchitect.lazy`): the run config imports
:mod:`vchitect.parallel.config` without torch.
"""

from vchitect.lazy import lazy_exports

lazy_exports(__name__, {
    "ParallelConfig": "config", "ParallelDims": "dims", "ParallelLayoutError": "dims", "parse_layout": "dims",
    "parallelize": "parallelize", "data_parallel_slice": "parallelize", "seed_for_rank": "parallelize",
    "generator_for_rank": "parallelize", "manual_seed": "parallelize",
    "clip_grad_norm_": "grad_norm", "total_grad_norm": "grad_norm",
    "build_on_meta": "meta_init", "materialize": "meta_init", "use_meta_init": "meta_init",
})
