"""``ParallelDims``: the sizes of every parallel dimension and the DeviceMesh built from them.

The world is laid out as one 4-D mesh ``(dp_replicate, dp_shard, sp, tp)``, tp innermost so that
tensor-parallel peers are neighbouring ranks (one node, NVLink), then Ulysses sequence parallel,
then the two data-parallel dimensions. Named views of that mesh:

==============  ===============================  ==============================================
name            dimensions                       used by
==============  ===============================  ==============================================
``tp``          tp                               DTensor tensor parallel
``sp``          sp                               Ulysses all-to-all
``dp``          dp_replicate × dp_shard          data loading / RNG (which samples a rank sees)
``fsdp``        dp_shard × sp (flattened)        FSDP2 parameter sharding (SP ranks shard too)
``hsdp``        (dp_replicate, fsdp)             FSDP2 with replication (HSDP) when dp_replicate > 1
==============  ===============================  ==============================================

Validation happens in the constructor, before any process group is touched, and every message
says what is wrong and what would work.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

DIM_NAMES = ("dp_replicate", "dp_shard", "sp", "tp")


class ParallelLayoutError(ValueError):
    """A parallel layout that cannot run; the message says what would."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    """Sizes of the parallel dimensions. A data dimension may be -1, meaning "the rest of the world".

    ``world_size`` defaults to the initialised process group's size (1 without one).
    ``num_heads``, when given, is checked for divisibility by ``tp × sp``.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    sp: int = 1
    tp: int = 1
    world_size: Optional[int] = None
    num_heads: Optional[int] = None
    _meshes: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        if self.world_size is None:
            import torch.distributed as dist

            self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self._validate()

    # ---------------------------------------------------------------- validation
    def _validate(self) -> None:
        W = self.world_size
        layout = self.describe()
        for name in ("sp", "tp"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ParallelLayoutError(f"parallel.{name}={v!r}: must be an integer >= 1 (-1 is only allowed "
                                          f"for dp_shard and dp_replicate)")
        for name in ("dp_replicate", "dp_shard"):
            v = getattr(self, name)
            if not isinstance(v, int) or (v < 1 and v != -1):
                raise ParallelLayoutError(f"parallel.{name}={v!r}: must be an integer >= 1, or -1 for "
                                          f"'the rest of the world'")
        if self.dp_replicate == -1 and self.dp_shard == -1:
            raise ParallelLayoutError(
                f"{layout}: only one of dp_replicate and dp_shard may be -1; set dp_replicate=1 "
                f"(plain FSDP) or give one of them explicitly")
        fixed = self.sp * self.tp * max(self.dp_replicate, 1) * max(self.dp_shard, 1)
        if -1 in (self.dp_replicate, self.dp_shard):
            if W % fixed:
                free = "dp_shard" if self.dp_shard == -1 else "dp_replicate"
                raise ParallelLayoutError(
                    f"{layout}: {free}=-1 cannot be resolved: the other dimensions multiply to {fixed}, "
                    f"which does not divide the world size {W}. Use sizes whose product divides {W} "
                    f"(divisors: {_divisors(W)}), or run on a multiple of {fixed} ranks")
            rest = W // fixed
            if self.dp_shard == -1:
                self.dp_shard = rest
            else:
                self.dp_replicate = rest
        product = self.dp_replicate * self.dp_shard * self.sp * self.tp
        if product != W:
            raise ParallelLayoutError(
                f"{self.describe()}: the dimensions multiply to {product} but the world size is {W}. "
                f"Set dp_shard=-1 to give the rest of the world to FSDP "
                f"(sp × tp must divide {W}: divisors {_divisors(W)}), or launch {product} ranks")
        if self.num_heads is not None and self.num_heads % (self.tp * self.sp):
            ok = [(t, s) for t in _divisors(self.num_heads) for s in _divisors(self.num_heads // t)
                  if t * s <= W and W % (t * s) == 0]
            hint = ", ".join(f"tp={t} sp={s}" for t, s in ok[:6])
            raise ParallelLayoutError(
                f"{self.describe()}: the model has {self.num_heads} attention heads, which is not divisible "
                f"by tp × sp = {self.tp * self.sp} (tensor parallel splits heads, then Ulysses splits the "
                f"local heads again). Layouts that fit this model and {W} ranks: {hint}")

    def describe(self) -> str:
        return (f"layout dp_replicate={self.dp_replicate} dp_shard={self.dp_shard} sp={self.sp} tp={self.tp} "
                f"(world size {self.world_size})")

    # ---------------------------------------------------------------- sizes
    @property
    def dp(self) -> int:
        """Number of data-parallel groups (distinct samples per step)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks a parameter is sharded over: the FSDP dimension includes sequence parallel."""
        return self.dp_shard * self.sp

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_replicate * self.fsdp > 1

    @property
    def hsdp_enabled(self) -> bool:
        return self.dp_replicate > 1

    # ---------------------------------------------------------------- meshes
    def build_mesh(self, device_type: str | None = None):
        """Create the world mesh and its named views (needs an initialised process group)."""
        import torch
        from torch.distributed.device_mesh import init_device_mesh

        if self._meshes:
            return self._meshes["world"]
        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        shape = tuple(getattr(self, n) for n in DIM_NAMES)
        world = init_device_mesh(device_type, shape, mesh_dim_names=DIM_NAMES)
        self._meshes["world"] = world
        # Flattened views are kept here (slicing them back out of the root mesh is deprecated).
        self._meshes["dp"] = world["dp_replicate", "dp_shard"]._flatten("dp")
        self._meshes["fsdp"] = world["dp_shard", "sp"]._flatten("fsdp")
        return world

    def mesh(self, name: str):
        """A named mesh: world, tp, sp, dp, fsdp or hsdp (see the module docstring)."""
        world = self.build_mesh() if not self._meshes else self._meshes["world"]
        if name == "world":
            return world
        if name in self._meshes:
            return self._meshes[name]
        if name == "hsdp":
            with warnings.catch_warnings():  # 2-D view over a flattened dim: still the supported way
                warnings.simplefilter("ignore", UserWarning)
                self._meshes["hsdp"] = world["dp_replicate", "fsdp"]
            return self._meshes["hsdp"]
        if name in ("tp", "sp", "dp_replicate", "dp_shard"):
            return world[name]
        raise KeyError(f"no mesh named {name!r}; choose world, tp, sp, dp, fsdp or hsdp")

    def data_parallel_mesh(self):
        """The mesh FSDP2 shards over: 1-D ``fsdp`` or 2-D ``(dp_replicate, fsdp)`` for HSDP."""
        return self.mesh("hsdp") if self.hsdp_enabled else self.mesh("fsdp")

    @property
    def dp_rank(self) -> int:
        """Index of this rank's data-parallel group: ranks with the same index see the same samples."""
        if self.dp == 1:
            return 0
        return self.mesh("dp").get_local_rank()

    @property
    def sp_rank(self) -> int:
        return 0 if self.sp == 1 else self.mesh("sp").get_local_rank()

    @property
    def tp_rank(self) -> int:
        return 0 if self.tp == 1 else self.mesh("tp").get_local_rank()


def parse_layout(text: str) -> dict:
    """``"tp2,sp2"`` / ``"dp_shard2,sp2"`` / ``"none"`` → keyword sizes for :class:`ParallelDims`."""
    sizes: dict = {}
    if text in ("", "none", "single"):
        return sizes
    for part in text.split(","):
        part = part.strip()
        for name in sorted(DIM_NAMES + ("dp",), key=len, reverse=True):
            if part.startswith(name):
                value = part[len(name):].lstrip("=")
                try:
                    n = int(value)
                except ValueError:
                    raise ParallelLayoutError(f"layout part {part!r}: expected e.g. tp2, sp2, dp_shard2, "
                                              f"dp_replicate2") from None
                sizes["dp_shard" if name == "dp" else name] = n
                break
        else:
            raise ParallelLayoutError(f"layout part {part!r}: unknown dimension; use tp, sp, dp_shard, "
                                      f"dp_replicate (e.g. tp2,sp2)")
    return sizes
