"""Meta-device initialisation: build on ``meta``, shard, then materialise only this rank's shards.

    model, record = build_on_meta(lambda: VchitectTransformer3DModel(**kwargs))  # no memory
    parallelize(model, dims, cfg)                                                # TP/FSDP on meta
    materialize(model, record, device, seed=seed, weights=open_initial_weights(kind, path, model))

The result is **bitwise equal** to the full-build path (``torch.manual_seed(seed)``, the
constructor, the initial weights, ``parallelize``), shard by shard:

* *checkpoint tensors*: each rank copies the box of every tensor that its local shard covers
  straight from the safetensors memory map (:class:`vchitect.models.weights.CheckpointSlices`);
* *everything else* (random init, the constructor's zero / one fills, the parameters an SD3
  checkpoint leaves to the constructor): :func:`build_on_meta` records, while the constructor runs
  on the meta device, every operation that initialises a parameter, in order (``uniform_``,
  ``normal_``, ``zero_``, ``fill_``, and ``zeros`` / ``ones`` / ``full`` factories). Materialising
  replays that list on CPU with a generator seeded like the full build: a ``uniform_`` draws one
  number per element in row-major order, so the tensor is generated in row chunks and only the
  chunks of the local box are kept (the others are drawn into a scratch buffer and dropped). No
  rank ever holds more than one chunk beyond its shard. Anything the recorder cannot replay
  exactly (another in-place op on a parameter, random numbers drawn for something that is no
  parameter, a parameter computed from other tensors) fails at build time, naming it;
* *buffers* are recomputed by their module's ``reset_buffers()`` (a module that owns buffers and
  has none fails at build time), then overwritten from the checkpoint where it has them.

The local box of a DTensor parameter follows from its placements, applied as nested
``torch.chunk`` s (the uneven last chunk, empty chunks included), in the order the sharding was
applied: plain ``Shard`` s in mesh order; a ``_StridedShard`` (FSDP2 sharding a tensor-parallel
shard along the same dimension again) after the mesh dimensions its ``split_factor`` stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
REPLAYED = {aten.uniform_.default: "uniform", aten.normal_.default: "normal", aten.zero_.default: "fill",
            aten.fill_.Scalar: "fill"}
CONSTANT_FACTORIES = {aten.zeros.default: 0.0, aten.ones.default: 1.0, aten.full.default: None}
EMPTY_FACTORIES = {aten.empty.memory_format, aten.empty_strided.default, aten.empty_like.default}
CHUNK_ELEMENTS = 1 << 22  # numbers drawn per piece of a replayed random init (16 MiB in fp32)


class MetaInitError(RuntimeError):
    """The constructor does something meta-device init cannot reproduce exactly; the message says what."""


@dataclass
class InitOp:
    """One initialising operation on a whole parameter, as the constructor ran it."""

    name: str  # parameter name (before any wrapper)
    kind: str  # uniform | normal | fill
    args: tuple  # (low, high) | (mean, std) | (value,)
    dtype: torch.dtype  # the parameter's dtype then (random numbers are drawn in it)
    shape: tuple[int, ...]


@dataclass
class InitRecord:
    """What :func:`build_on_meta` saw: the init ops in order, and where each parameter / buffer lives."""

    ops: list[InitOp]
    owners: dict[str, tuple[nn.Module, str, bool]]  # name → (module, attribute, is_buffer)
    buffer_modules: list[nn.Module]  # modules whose reset_buffers() recomputes their buffers


# ------------------------------------------------------------------ recording the constructor
class _Recorder(TorchDispatchMode):
    """Every op that creates a storage or writes into a tensor, keyed by storage (meta tensors
    have storages, without data)."""

    def __init__(self):
        super().__init__()
        self.created: dict[int, tuple] = {}  # storage id → (op, tensor)
        self.writes: list[tuple] = []  # (op, tensor, bound arguments), in order
        self.seeded: list[tuple] = []  # random ops, in order (op, tensor or None)
        self._keep: list = []  # keeps recorded storages alive, so their ids stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        target = args[0] if args and isinstance(args[0], torch.Tensor) and func._schema.is_mutable else None
        if target is not None:
            self.writes.append((func, target, _bind(func, args, kwargs)))
            self._keep.append(target)
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seeded.append((func, target))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and _sid(t) not in self.created:
                self.created[_sid(t)] = (func, _bind(func, args, kwargs))
                self._keep.append(t)
        return out


def _sid(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


def _bind(func, args, kwargs) -> dict:
    """The op's arguments by name, defaults filled in."""
    bound = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            bound[a.name] = args[i]
        elif a.name in kwargs:
            bound[a.name] = kwargs[a.name]
        elif a.has_default_value():
            bound[a.name] = a.default_value
    return bound


def build_on_meta(factory: Callable[[], nn.Module]) -> tuple[nn.Module, InitRecord]:
    """Run ``factory`` (the model's constructor) on the meta device and record how it initialises
    every parameter. No parameter memory is allocated; the model's shapes, names and config are real."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = factory()
    owners: dict[str, tuple[nn.Module, str, bool]] = {}
    buffer_modules: list[nn.Module] = []
    by_storage: dict[int, tuple[str, torch.Tensor]] = {}
    for mod_name, module in model.named_modules():
        for attr, p in module.named_parameters(recurse=False):
            name = f"{mod_name}.{attr}" if mod_name else attr
            if _sid(p) not in by_storage:  # tied parameters: the first name owns it
                owners[name] = (module, attr, False)
                by_storage[_sid(p)] = (name, p)
        for attr, b in module.named_buffers(recurse=False):
            if b is None:
                continue
            if not hasattr(module, "reset_buffers"):
                raise MetaInitError(f"{type(module).__name__} ({mod_name or 'the model'}) owns buffer {attr!r} but has "
                                    f"no reset_buffers() to recompute it after materialising; add one, or set "
                                    f"parallel.meta_init=off")
            owners[f"{mod_name}.{attr}" if mod_name else attr] = (module, attr, True)
            if not any(m is module for m in buffer_modules):
                buffer_modules.append(module)
    ops = _init_ops(recorder, by_storage)
    return model, InitRecord(ops, owners, buffer_modules)


def _init_ops(recorder: _Recorder, by_storage: dict[int, tuple[str, torch.Tensor]]) -> list[InitOp]:
    for func, target in recorder.seeded:
        if target is None or _sid(target) not in by_storage or func not in REPLAYED:
            raise MetaInitError(f"the constructor draws random numbers with {func} for a tensor that is no "
                                f"parameter (or not in a way that can be replayed); meta-device init cannot "
                                f"reproduce that stream. Set parallel.meta_init=off")
    ops: list[InitOp] = []
    initialised: set[str] = set()
    created = {sid: recorder.created.get(sid) for sid in by_storage}
    for sid, (name, p) in by_storage.items():  # a parameter made by zeros / ones / full starts filled
        func, bound = created[sid] or (None, {})
        if func in CONSTANT_FACTORIES:
            value = CONSTANT_FACTORIES[func]
            ops.append(InitOp(name, "fill", (bound["fill_value"] if value is None else value,), p.dtype,
                              tuple(p.shape)))
            initialised.add(name)
        elif func not in EMPTY_FACTORIES:
            raise MetaInitError(f"parameter {name} is computed by {func} in the constructor, which meta-device "
                                f"init does not replay; initialise it with an nn.init function, or set "
                                f"parallel.meta_init=off")
    for func, target, bound in recorder.writes:
        hit = by_storage.get(_sid(target))
        if hit is None:
            continue  # a temporary (e.g. while a buffer is computed)
        name, p = hit
        whole = (tuple(target.shape) == tuple(p.shape) and target.storage_offset() == p.storage_offset()
                 and target.stride() == p.stride())
        if func not in REPLAYED or not whole:
            what = func if whole else f"{func} on a part of it"
            raise MetaInitError(f"the constructor initialises {name} with {what}, which meta-device init does not "
                                f"replay; use uniform_ / normal_ / zeros_ / ones_ / constant_ on the whole tensor, "
                                f"or set parallel.meta_init=off")
        if bound.get("generator") is not None:
            raise MetaInitError(f"the constructor initialises {name} with its own torch.Generator; meta-device init "
                                f"replays only the global one. Set parallel.meta_init=off")
        kind = REPLAYED[func]
        args = {"uniform": ("from", "to"), "normal": ("mean", "std")}.get(kind)
        values = tuple(float(bound[a]) for a in args) if args else (float(bound.get("value", 0.0)),)
        ops.append(InitOp(name, kind, values, target.dtype, tuple(p.shape)))
        initialised.add(name)
    left = sorted(set(n for n, _ in by_storage.values()) - initialised)
    if left:
        raise MetaInitError(f"{len(left)} parameters are never initialised by the constructor (first: {left[:3]}); "
                            f"their values would be whatever memory held. Initialise them in the constructor")
    return ops


# ------------------------------------------------------------------ which part of a tensor a rank holds
def shard_box(shape: tuple[int, ...], mesh_shape: tuple[int, ...], coordinate: tuple[int, ...],
              placements) -> tuple[slice, ...]:
    """The global index box (one slice per dimension) of the local shard of a DTensor with these
    placements, at mesh ``coordinate``. Each ``Shard(d)`` cuts the current range of ``d`` like
    ``torch.chunk`` (pieces of ceil(n / k); the last may be shorter, trailing ones empty)."""
    ranges = [[0, n] for n in shape]  # start, length
    for mesh_dim in _application_order(placements, mesh_shape, len(shape)):
        d = placements[mesh_dim].dim % len(shape)
        k, r = mesh_shape[mesh_dim], coordinate[mesh_dim]
        start, length = ranges[d]
        size = -(-length // k)
        lo, hi = min(r * size, length), min(r * size + size, length)
        ranges[d] = [start + lo, hi - lo]
    return tuple(slice(s, s + n) for s, n in ranges)


def _application_order(placements, mesh_shape, ndim: int) -> list[int]:
    per_dim: dict[int, list[int]] = {}  # tensor dim → mesh dims sharding it, in mesh order
    for mesh_dim, p in enumerate(placements):
        if p.is_shard() or hasattr(p, "split_factor"):  # _StridedShard is no Shard in newer torch
            per_dim.setdefault(p.dim % ndim, []).append(mesh_dim)
    order: list[int] = []
    for mesh_dims in per_dim.values():
        order += _order_one_dim(mesh_dims, placements, mesh_shape)
    return order


def _order_one_dim(mesh_dims: list[int], placements, mesh_shape) -> list[int]:
    if not mesh_dims:
        return []
    first, rest = mesh_dims[0], mesh_dims[1:]
    factor = getattr(placements[first], "split_factor", None)  # _StridedShard
    if factor is None:
        return [first] + _order_one_dim(rest, placements, mesh_shape)
    product, k = 1, 0
    while product < factor and k < len(rest):
        product *= mesh_shape[rest[k]]
        k += 1
    if product != factor:
        raise MetaInitError(f"placements {tuple(placements)} on a mesh of shape {tuple(mesh_shape)}: a strided "
                            f"shard with split factor {factor} matches no later mesh dimensions; set "
                            f"parallel.meta_init=off")
    return _order_one_dim(rest[:k], placements, mesh_shape) + [first] + _order_one_dim(rest[k:], placements,
                                                                                    mesh_shape)


def local_part(t: torch.Tensor) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """(the local tensor, its global box) of a parameter or buffer: DTensor or plain (whole)."""
    if not hasattr(t, "device_mesh"):
        return t.detach(), tuple(slice(0, n) for n in t.shape)
    mesh = t.device_mesh
    local = t.to_local()
    coordinate = mesh.get_coordinate()
    box = shard_box(tuple(t.shape), tuple(mesh.shape), tuple(coordinate), t.placements)
    if tuple(b.stop - b.start for b in box) != tuple(local.shape):
        raise MetaInitError(f"local shard of shape {tuple(local.shape)} does not match the box {box} computed from "
                            f"placements {t.placements} on mesh {tuple(mesh.shape)}; set parallel.meta_init=off")
    return local, box


# ------------------------------------------------------------------ materialising
@torch.no_grad()
def materialize(model: nn.Module, record: InitRecord, device, *, seed: int, weights=None) -> set[str]:
    """Allocate this rank's shards on ``device`` and fill them: buffers by ``reset_buffers()``,
    then every key of ``weights`` (a :class:`CheckpointSlices`), then the constructor's init of the
    parameters left, replayed with a generator seeded by ``seed``. Returns the names read from
    ``weights``."""
    model.to_empty(device=device)
    for module in record.buffer_modules:
        module.reset_buffers()
    parts = {name: local_part(getattr(module, attr)) for name, (module, attr, _) in record.owners.items()}
    loaded: set[str] = set()
    if weights is not None:
        for key in weights.entries:
            local, box = parts[key]
            weights.copy_into(key, box, local)
            loaded.add(key)
        weights.close()
    replay(record.ops, {n: parts[n] for n in parts if n not in loaded and not record.owners[n][2]}, seed)
    return loaded


def replay(ops: list[InitOp], targets: dict[str, tuple[torch.Tensor, tuple[slice, ...]]], seed: int) -> None:
    """Run the recorded init ops in order with a CPU generator seeded by ``seed`` (the global CPU
    generator after ``torch.manual_seed(seed)`` gives the same stream), writing only the boxes of
    ``targets`` (name → (local tensor, box)). Stops after the last op that writes a target."""
    wanted = [i for i, op in enumerate(ops) if op.name in targets]
    if not wanted:
        return
    g = torch.Generator().manual_seed(seed)
    for op in ops[:wanted[-1] + 1]:
        target = targets.get(op.name)
        if op.kind == "fill":
            if target is not None:
                target[0].fill_(torch.tensor(op.args[0], dtype=op.dtype))  # cast from the init dtype
        elif op.kind == "normal":  # the vectorised normal_ draws in blocks: generate the tensor whole
            full = torch.empty(op.shape, dtype=op.dtype).normal_(*op.args, generator=g)
            if target is not None:
                target[0].copy_(full[target[1]])
            del full
        else:
            _uniform(op, target, g)


def _uniform(op: InitOp, target, g: torch.Generator) -> None:
    """``uniform_`` of the whole tensor, keeping only the target's box: one draw per element, row-major."""
    shape = op.shape or (1,)
    rows, inner = shape[0], math.prod(shape[1:])
    if target is None:
        _draw(rows * inner, op, g)
        return
    local, box = target
    local = local.view(1) if not op.shape else local
    box = box or (slice(0, 1),)
    r0, r1 = box[0].start, box[0].stop
    _draw(r0 * inner, op, g)
    step = max(1, CHUNK_ELEMENTS // max(inner, 1))
    for a in range(r0, r1, step):
        b = min(a + step, r1)
        piece = torch.empty(((b - a),) + tuple(shape[1:]), dtype=op.dtype).uniform_(*op.args, generator=g)
        local[a - r0:b - r0].copy_(piece[(slice(None),) + tuple(box[1:])])
    _draw((rows - r1) * inner, op, g)


def _draw(n: int, op: InitOp, g: torch.Generator) -> None:
    """Advance ``g`` past ``n`` draws of ``op`` (drawn into a scratch buffer and dropped)."""
    scratch = torch.empty(min(n, CHUNK_ELEMENTS), dtype=op.dtype)
    while n > 0:
        k = min(n, scratch.numel())
        scratch[:k].uniform_(*op.args, generator=g)
        n -= k


# ------------------------------------------------------------------ the switch
def use_meta_init(mode: str, dims, init_from: Optional[str] = None) -> bool:
    """``parallel.meta_init``: on, off, or auto = on when parameters are sharded (FSDP / HSDP / TP)
    or initial weights are read (then streamed tensor by tensor instead of loaded whole)."""
    if mode in ("on", "off"):
        return mode == "on"
    return bool(dims.fsdp_enabled or dims.tp_enabled or init_from)


__all__ = ["InitOp", "InitRecord", "MetaInitError", "build_on_meta", "local_part", "materialize", "replay",
           "shard_box", "use_meta_init"]
