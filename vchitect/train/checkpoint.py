"""DCP checkpoints that resume exactly, also on a different number of ranks, and that are verified.

Layout of a run folder::

    checkpoints/step-000001000/      a torch.distributed.checkpoint directory (.metadata + shards)
                 └── vchitect.json   {"step", "world_size", "layout", "config", "manifest"} — written last
    checkpoints/step-000001500.tmp/  a save in progress (or one that crashed): never resumed from

A save writes into ``step-….tmp`` and renames it when every rank has finished, so a directory
without the ``.tmp`` suffix, with ``.metadata`` and ``vchitect.json``, is complete. The newest K
complete checkpoints are kept. ``manifest`` lists every file of the folder with its size and
SHA-256 (each rank hashes the shards it wrote). :func:`verify` checks a folder against it (and
that ``.metadata`` is plain DCP metadata whose shards exist and are long enough); auto-resume,
``vchitect export`` and ``vchitect sample`` take the newest checkpoint that verifies and say which
ones they passed over and why.

State-dict keys (the contract with ``vchitect export``): ``model`` (parameter FQNs as in
``VchitectTransformer3DModel.state_dict()``), ``ema`` (same FQNs, trainable parameters only),
``optimizer`` (FQN-keyed, from ``get_state_dict``), ``lr_scheduler`` and ``step``,
``dataloader_dp{r}`` (one JSON string per data-parallel rank) and ``rng_rank{r}`` (one JSON
string per rank). Model, optimizer and EMA are DTensors where the model is sharded, so DCP
reshards them on load. The loader and RNG entries are single strings, so DCP restores them whole
whatever the loader of the resuming run holds. Everything is read through
:mod:`vchitect.train.safe_dcp`: no file of a checkpoint can run code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from . import safe_dcp

log = logging.getLogger("vchitect.train")
STEP_DIR = re.compile(r"^step-(\d{9})$")
STEP_FOLDER = re.compile(r"^step-\d{9}(\.tmp)?$")  # a checkpoint, or a save that did not finish
META_NAME = "vchitect.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what to do."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def is_complete(path: Path) -> bool:
    path = Path(path)
    return (STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()
            and (path / META_NAME).is_file())


def step_folders(root: Path) -> list[Path]:
    """Every ``step-…`` folder under ``root`` (complete, ``.tmp`` or damaged), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_FOLDER.match(p.name)]
    return sorted(found, key=lambda p: (p.name[:14], p.name))


def complete_checkpoints(root: Path) -> list[Path]:
    return [p for p in step_folders(root) if is_complete(p)]


def find_latest(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / META_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{Path(path) / META_NAME} is unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{Path(path) / META_NAME} is not a JSON object")
    return meta


# ---------------------------------------------------------------------------- manifest and verification
def file_digest(path: Path, checksum: bool = True) -> dict:
    """``{"size": bytes, "sha256": hex}`` of one file (``sha256`` only with ``checksum``)."""
    path = Path(path)
    out = {"size": path.stat().st_size}
    if checksum:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        out["sha256"] = h.hexdigest()
    return out


def _files_of(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.is_file() and p.name != META_NAME)


def _own_files(names: list[str], rank: int, world: int) -> list[str]:
    """The files rank ``rank`` hashes: the DCP shards it wrote (``__{rank}_*``); rank 0 also the rest."""
    own = [n for n in names if n.startswith(f"__{rank}_")]
    if rank == 0:
        claimed = {n for n in names for r in range(world) if n.startswith(f"__{r}_")}
        own += [n for n in names if n not in claimed]
    return own


def _verify_files(path: Path, manifest: dict, names: list[str], checksum: bool) -> Optional[str]:
    for name in names:
        want = manifest["files"][name]
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return f"{f} has {size} bytes, the manifest says {want['size']} (truncated or overwritten)"
        if checksum and "sha256" in want and file_digest(f)["sha256"] != want["sha256"]:
            return f"{f} does not match its SHA-256 in {META_NAME} (corrupted)"
    return None


def _verify_structure(path: Path) -> Optional[str]:
    """``.metadata`` is plain DCP metadata and every shard it points into exists and is long enough."""
    try:
        md = safe_dcp.read_metadata(path)
    except safe_dcp.UnsafeCheckpointError as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is damage
        return f"{path / '.metadata'} cannot be read ({exc})"
    ends: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(rel, str) or "/" in rel or rel.startswith("."):
            return f"{path / '.metadata'} points to a shard outside the folder ({rel!r})"
        ends[rel] = max(ends.get(rel, 0), int(info.offset) + int(info.length))
    for rel, end in sorted(ends.items()):
        f = path / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size < end:
            return f"{f} has {f.stat().st_size} bytes, its metadata needs {end} (truncated)"
    return None


def verify(path: Path, checksum: bool = True, part: tuple[int, int] = (0, 1)) -> Optional[str]:
    """Why ``path`` cannot be resumed from or exported (naming the file), or None when it verifies.

    With ``part=(i, n)`` only every n-th file of the manifest (from the i-th) is hashed, so ``n``
    ranks can share the work; the cheap checks run in every part."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is not a folder"
    if path.name.endswith(".tmp"):
        return f"{path} is an unfinished save (.tmp): the run stopped while writing it"
    if not (path / META_NAME).is_file():
        return f"{path / META_NAME} is missing: the save did not finish"
    if not (path / ".metadata").is_file():
        return f"{path / '.metadata'} is missing"
    try:
        meta = read_meta(path)
    except CheckpointError as exc:
        return str(exc)
    manifest = meta.get("manifest")
    if manifest is not None:
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            return f"{path / META_NAME} has a malformed manifest"
        names = sorted(manifest["files"])
        if ".metadata" not in names:
            return f"{path / META_NAME}: the manifest does not list .metadata"
        hashed = names[part[0]::part[1]]
        sizes_only = sorted(set(names) - set(hashed))
        reason = (_verify_files(path, manifest, sizes_only, checksum=False)
                  or _verify_files(path, manifest, hashed, checksum))
        if reason:
            return reason
    return _verify_structure(path)


def find_verified(root: Path, checksum: bool = True, say: Callable[[str], None] = log.warning,
                  verifier: Optional[Callable[[Path], Optional[str]]] = None,
                  folders: Optional[list[Path]] = None) -> Optional[Path]:
    """The newest checkpoint under ``root`` (or of ``folders``) that verifies; one line through ``say``
    for each newer ``step-…`` folder passed over, with the reason."""
    verifier = verifier or (lambda p: verify(p, checksum))
    for path in reversed(step_folders(root) if folders is None else folders):
        reason = verifier(path)
        if reason is None:
            return path
        say(f"passing over checkpoint {path.name}: {reason}")
    return None


# ---------------------------------------------------------------------------- RNG of one rank (JSON)
def _tensor_b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _b64_tensor(text: str, like: torch.Tensor) -> torch.Tensor:
    data = base64.b64decode(text, validate=True)
    if len(data) != like.numel():
        raise ValueError(f"RNG state of {len(data)} bytes, expected {like.numel()}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def rng_state() -> str:
    """This rank's torch, Python (and CUDA) generator state as a JSON string."""
    version, internal, gauss = random.getstate()
    state = {"torch": _tensor_b64(torch.get_rng_state()), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = _tensor_b64(torch.cuda.get_rng_state().cpu())
    return json.dumps(state)


def set_rng_state(text: str) -> None:
    """Restore :func:`rng_state`'s string; anything else is refused with a clear error."""
    try:
        state = json.loads(text)
        torch_state = _b64_tensor(state["torch"], torch.get_rng_state())
        version, internal, gauss = state["python"]
        if not (isinstance(version, int) and all(isinstance(x, int) for x in internal)
                and (gauss is None or isinstance(gauss, float))):
            raise ValueError("python generator state is not integers")
        cuda = (_b64_tensor(state["cuda"], torch.cuda.get_rng_state())
                if "cuda" in state and torch.cuda.is_available() else None)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"the saved RNG state is not vchitect's JSON format ({exc}); the checkpoint "
                              f"is damaged or was not written by this version") from None
    torch.set_rng_state(torch_state)
    random.setstate((version, tuple(internal), gauss))
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


class Checkpointer:
    """Saves, verifies and finds checkpoints under ``root``; every rank calls every method."""

    def __init__(self, root: str | Path, keep: int, async_save: bool, simulate_crash: str = "",
                 checksums: bool = True):
        self.root = Path(root)
        self.crash_kind, _, crash_step = simulate_crash.partition(":")
        self.crash_step = int(crash_step) if crash_step else -1
        self.keep = keep
        self.async_save = async_save
        self.checksums = checksums
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._pending = None  # (future, tmp, final, meta, start time)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _gather(self, obj) -> list:
        """``obj`` of every rank (in-memory exchange between our own processes)."""
        if not dist.is_initialized() or self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def save(self, step: int, state: dict, meta: dict) -> None:
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        started = time.perf_counter()
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = (future, tmp, final, meta, started)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, final, meta, started)

    def wait(self) -> None:
        if self._pending is not None:
            future, tmp, final, meta, started = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final, meta, started)

    def crash_if(self, kind: str, step: int) -> None:
        """``train.simulate_crash=KIND:STEP`` (tests): a hard kill of every rank, no clean-up runs."""
        if self.crash_kind == kind and self.crash_step == step:
            self._barrier()
            os.kill(os.getpid(), 9)

    def _finalize(self, tmp: Path, final: Path, meta: dict, started: float) -> None:
        self._barrier()  # every rank's shards are written
        names = _files_of(tmp)
        digests = {n: file_digest(tmp / n, self.checksums) for n in _own_files(names, self.rank, self.world)}
        manifest = {"version": MANIFEST_VERSION, "files": {}}
        for part in self._gather(digests):
            manifest["files"].update(part)
        self.crash_if("in_save", meta["step"])
        if self.rank == 0:
            (tmp / META_NAME).write_text(json.dumps({**meta, "manifest": manifest}, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            size = sum(f["size"] for f in manifest["files"].values())
            log.info("checkpoint saved to %s (step %d, %.1f MB, %.1f s)", final, meta["step"], size / 1e6,
                     time.perf_counter() - started)
        self._barrier()
        self.crash_if("after_save", meta["step"])

    def load(self, path: Path, state: dict, present: Optional[set[str]] = None) -> dict:
        """Fill ``state`` in place from ``path`` (only the keys the checkpoint has) and return it.
        ``present``: the checkpoint's flattened keys, when the caller has read them already."""
        if present is None:
            present = set(safe_dcp.read_metadata(path).state_dict_metadata)
        tops = {k.split(".", 1)[0] for k in present}
        wanted = {k: v for k, v in state.items()
                  if (k in present if isinstance(v, (str, int, float)) else k in tops)}
        safe_dcp.load(wanted, path)
        state.update(wanted)
        return state

    def verify(self, path: Path) -> Optional[str]:
        """:func:`verify` with the hashing shared by all ranks; every rank gets the same answer."""
        reasons = self._gather(verify(path, self.checksums, part=(self.rank, self.world)))
        return next((r for r in reasons if r), None)

    def resolve_resume(self, resume: str) -> Optional[Path]:
        """The checkpoint to resume from: None (fresh start), the newest one that verifies (auto,
        with one line per newer folder passed over), or the given folder, which must verify."""
        from vchitect.config import ConfigError

        if resume == "none":
            return None
        if resume == "auto":
            say = log.warning if self.rank == 0 else (lambda _msg: None)
            folders = [step_folders(self.root) if self.rank == 0 else None]
            if dist.is_initialized() and self.world > 1:  # every rank walks rank 0's list
                dist.broadcast_object_list(folders, src=0)
            return find_verified(self.root, say=say, verifier=self.verify, folders=folders[0])
        path = Path(resume)
        reason = (f"{path} is not a step-XXXXXXXXX checkpoint folder" if STEP_DIR.match(path.name) is None
                  else self.verify(path))
        if reason:
            raise ConfigError(f"train.resume={resume!r} cannot be resumed from: {reason}. Use auto (the newest "
                              f"checkpoint that verifies), none, or another step-… folder")
        return path


def load_tensors(path: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors under ``prefix`` of a checkpoint, read in this one process without
    a process group, whatever number of ranks saved it. Other entries are not read."""
    meta = safe_dcp.read_metadata(path)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix + ".") and isinstance(md, TensorStorageMetadata):
            tensors[key[len(prefix) + 1:]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not tensors:
        raise KeyError(f"{path} has no '{prefix}' entries")
    safe_dcp.load({prefix: tensors}, path, no_dist=True)
    return tensors
