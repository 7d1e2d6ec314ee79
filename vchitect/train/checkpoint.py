"""DCP checkpoints that resume exactly, also on a different number of ranks.

Layout of a run folder::

    checkpoints/step-000001000/      a torch.distributed.checkpoint directory (.metadata + shards)
                 └── vchitect.json   {"step", "world_size", "layout", "config"} — written last
    checkpoints/step-000001500.tmp/  a save in progress (or one that crashed): never resumed from

A save writes into ``step-….tmp`` and renames it when every rank has finished, so a directory
without the ``.tmp`` suffix, with ``.metadata`` and ``vchitect.json``, is complete. The newest K
complete checkpoints are kept.

State-dict keys (the contract with ``vchitect export``): ``model`` (parameter FQNs as in
``VchitectTransformer3DModel.state_dict()``), ``ema`` (same FQNs, trainable parameters only),
``optimizer`` (FQN-keyed, from ``get_state_dict``), ``lr_scheduler`` and ``step`` (JSON),
``dataloader_dp{r}`` (JSON, one per data-parallel rank), ``rng_rank{r}`` (one per rank).
Model, optimizer and EMA are DTensors where the model is sharded, so DCP reshards them on load.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

STEP_DIR = re.compile(r"^step-(\d{9})$")
META_NAME = "vchitect.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:09d}"


def is_complete(path: Path) -> bool:
    path = Path(path)
    return (STEP_DIR.match(path.name) is not None and (path / ".metadata").is_file()
            and (path / META_NAME).is_file())


def complete_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and is_complete(p)), key=lambda p: p.name)


def find_latest(root: Path) -> Optional[Path]:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META_NAME).read_text())


def saved_keys(path: Path) -> set[str]:
    """Top-level keys present in a DCP checkpoint (flattened names are cut at the first dot)."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k.split(".", 1)[0] for k in meta.state_dict_metadata}


# ---------------------------------------------------------------------------- RNG of one rank
def rng_state() -> str:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    return base64.b64encode(buf.getvalue()).decode()


def set_rng_state(text: str) -> None:
    state = torch.load(io.BytesIO(base64.b64decode(text)), weights_only=False)
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and finds checkpoints under ``root``; every rank calls every method."""

    def __init__(self, root: str | Path, keep: int, async_save: bool, simulate_crash: str = ""):
        self.root = Path(root)
        self.crash_kind, _, crash_step = simulate_crash.partition(":")
        self.crash_step = int(crash_step) if crash_step else -1
        self.keep = keep
        self.async_save = async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending = None  # (future, tmp, final, meta)

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def save(self, step: int, state: dict, meta: dict) -> None:
        self.wait()
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(tmp))
            self._pending = (future, tmp, final, meta)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._finalize(tmp, final, meta)

    def wait(self) -> None:
        if self._pending is not None:
            future, tmp, final, meta = self._pending
            self._pending = None
            future.result()
            self._finalize(tmp, final, meta)

    def _crash_if(self, kind: str, step: int) -> None:
        if self.crash_kind == kind and self.crash_step == step:
            self._barrier()
            os.kill(os.getpid(), 9)  # simulate_crash: a hard kill, no clean-up runs

    def _finalize(self, tmp: Path, final: Path, meta: dict) -> None:
        self._barrier()  # every rank's shards are written
        self._crash_if("in_save", meta["step"])
        if self.rank == 0:
            (tmp / META_NAME).write_text(json.dumps(meta, indent=1, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self._barrier()
        self._crash_if("after_save", meta["step"])

    def load(self, path: Path, state: dict) -> dict:
        """Fill ``state`` in place from ``path`` (only the keys the checkpoint has) and return it."""
        present = saved_keys(path)
        wanted = {k: v for k, v in state.items() if k in present}
        dcp.load(wanted, checkpoint_id=str(path))
        state.update(wanted)
        return state

    def resolve_resume(self, resume: str) -> Optional[Path]:
        if resume == "none":
            return None
        if resume == "auto":
            return find_latest(self.root)
        path = Path(resume)
        if not is_complete(path):
            raise FileNotFoundError(f"train.resume={resume!r} is not a complete checkpoint (a step-XXXXXXXXX "
                                    f"folder with .metadata and {META_NAME}); use auto, none or such a folder")
        return path


def load_tensors(path: Path, prefix: str = "model") -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors under ``prefix`` of a checkpoint, read in this one process without
    a process group, whatever number of ranks saved it. Other entries are not read."""
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {}
    for key, md in meta.state_dict_metadata.items():
        if key.startswith(prefix + ".") and isinstance(md, TensorStorageMetadata):
            tensors[key[len(prefix) + 1:]] = torch.empty(md.size, dtype=md.properties.dtype)
    if not tensors:
        raise KeyError(f"{path} has no '{prefix}' entries")
    dcp.load({prefix: tensors}, checkpoint_id=str(path), no_dist=True)
    return tensors
