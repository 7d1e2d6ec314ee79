"""``ParallelConfig``: the ``parallel:`` section of a run's config (attached as ``Config.parallel``)."""

from __future__ import annotations

from dataclasses import dataclass

from vchitect.config_base import ConfigError, setting


@dataclass
class ParallelConfig:
    """How the model is spread over ranks, and how activations are kept.

    The four sizes must multiply to the world size; ``-1`` on a data dimension means "the rest".
    See docs/parallelism.md for a guide to choosing them.
    """

    dp_replicate: int = setting(1, min=-1, help="data-parallel replicas (HSDP outer dimension; "
                                "-1 = the rest of the world). >1 replicates FSDP shards across nodes")
    dp_shard: int = setting(-1, min=-1, help="FSDP2 sharding degree over data (-1 = the rest of the world); "
                            "parameters are sharded over dp_shard × sp ranks")
    sp: int = setting(1, min=1, help="Ulysses sequence-parallel degree: video tokens of each frame are split "
                      "over this many ranks (heads must divide by tp × sp)")
    tp: int = setting(1, min=1, help="tensor-parallel degree (DTensor, innermost; keep within a node)")
    activation_checkpointing: str = setting("none", choices=["none", "full", "selective"],
                                            help="recompute block activations in backward: none, every "
                                            "block (full), or a fraction of blocks (selective)")
    ac_ratio: float = setting(0.5, min=0.0, max=1.0, help="selective checkpointing: fraction of blocks "
                              "checkpointed, spread evenly over the depth")
    activation_offload: bool = setting(False, help="keep the inputs of checkpointed blocks in pinned CPU "
                                       "memory (side-stream copies, prefetched in backward)")
    compile: str = setting("auto", choices=["auto", "on", "off"],
                           help="torch.compile each block: auto = on for CUDA, off for CPU")
    mixed_precision: str = setting("auto", choices=["auto", "bf16", "fp32"],
                                   help="FSDP2 compute dtype: auto = bf16 params / fp32 reduction on "
                                   "GPU, fp32 on CPU")
    cpu_offload: bool = setting(False, help="FSDP2 CPU offload of parameters, gradients and optimizer "
                                "state (the optimizer step then runs on CPU)")
    meta_init: str = setting("auto", choices=["auto", "on", "off"],
                             help="build the model on the meta device, shard it, then materialise and fill only "
                             "each rank's shards (bitwise equal to building it whole); auto = on when parameters "
                             "are sharded (FSDP/HSDP/TP) or train.init_from is set")
    reshard_after_forward: bool = setting(True, help="free gathered parameters after each block's forward "
                                          "(ZeRO-3); false keeps them until backward (ZeRO-2, more memory)")

    def validate(self) -> None:
        for name in ("dp_replicate", "dp_shard"):
            if getattr(self, name) == 0:
                raise ConfigError(f"parallel.{name}=0 is not allowed; use a size >= 1 or -1 for the rest")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ConfigError("parallel.dp_replicate and parallel.dp_shard are both -1; only one data "
                              "dimension can take the rest of the world (e.g. dp_replicate=1 dp_shard=-1)")
        if self.activation_offload and self.activation_checkpointing == "none":
            raise ConfigError("parallel.activation_offload=true offloads the inputs of checkpointed blocks, "
                              "but parallel.activation_checkpointing=none; set it to full or selective")

    def dims(self, world_size=None, num_heads=None):
        from .dims import ParallelDims

        return ParallelDims(self.dp_replicate, self.dp_shard, self.sp, self.tp, world_size=world_size,
                            num_heads=num_heads)
