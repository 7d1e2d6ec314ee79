"""Reading DCP checkpoints without letting a file run code.

A ``torch.distributed.checkpoint`` folder holds two things PyTorch reads with plain pickle:

* ``.metadata`` — ``FileSystemReader.read_metadata`` calls ``pickle.load`` on it;
* non-tensor entries (ints, strings, small dicts) — ``DefaultLoadPlanner.load_bytes`` calls
  ``torch.load(..., weights_only=False)`` on them.

A crafted checkpoint folder could therefore run code on resume, export or sampling. This module
closes both doors: :class:`SafeFileSystemReader` reads ``.metadata`` through
:func:`restricted_loads`, an unpickler that resolves only the classes DCP metadata is made of, and
:class:`SafeLoadPlanner` reads byte entries with ``torch.load(weights_only=True)``, which builds
nothing but tensors and plain containers. Tensor shards are already read with ``weights_only=True``
by PyTorch itself. Every vchitect read path (:func:`read_metadata`, :func:`load`) goes through
these two; ``tests/unit/test_no_code_execution.py`` keeps it that way.

Threat model (docs/reliability.md): the processes we start and the Ray cluster are trusted;
every file in a local folder or an S3 prefix is not.
"""

from __future__ import annotations

import io
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import default_planner
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_NAME = ".metadata"

# Everything a DCP ``.metadata`` pickle references (PyTorch 2.11–2.13): the metadata dataclasses,
# the storage index of the filesystem writer, torch.Size / dtypes / layouts / memory formats, and the
# PosixPath a checkpoint id may be recorded as. None of them runs code or touches files when built.
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"LoadItemType", "WriteItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "Path"},
    "collections": {"OrderedDict"},
}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file references something that is not plain checkpoint data."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format,
                                                                          torch.layout)):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"refers to {module}.{name}, which is not part of DCP metadata "
                                    f"(refused: a crafted file could run code)")


def restricted_loads(data: bytes):
    """Unpickle ``data`` admitting only the classes of DCP metadata."""
    return _RestrictedUnpickler(io.BytesIO(data)).load()


class SafeFileSystemReader(dcp.FileSystemReader):
    """``FileSystemReader`` whose ``read_metadata`` uses the allow-list unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            metadata = restricted_loads(data)
        except UnsafeCheckpointError as exc:
            raise UnsafeCheckpointError(f"{path}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - truncated / garbage pickles raise many kinds
            raise ValueError(f"{path} is not a readable DCP metadata file ({type(exc).__name__}: {exc})") from None
        if not isinstance(metadata, Metadata):
            raise ValueError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """``DefaultLoadPlanner`` that reads non-tensor entries with ``torch.load(weights_only=True)``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            lines = [ln.strip() for ln in str(exc).splitlines() if "Unsupported" in ln] or ["not plain data"]
            raise UnsafeCheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data, "
                                        f"refused ({lines[0]}); a crafted file could run code") from None
        if self.flatten_state_dict:
            # the helper the parent class uses, from where the parent module finds it
            default_planner.set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def read_metadata(path: str | Path) -> Metadata:
    return SafeFileSystemReader(str(path)).read_metadata()


def load(state: dict, path: str | Path, no_dist: bool = False) -> None:
    """``dcp.load`` through the safe reader and planner (fills ``state`` in place)."""
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        try:
            dcp.load(state, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner(),
                     no_dist=no_dist)
        except CheckpointException as exc:  # DCP wraps each rank's error: surface ours as itself
            for failure in exc.failures.values():
                err = failure[0] if isinstance(failure, tuple) else failure
                if isinstance(err, UnsafeCheckpointError):
                    raise UnsafeCheckpointError(f"{path}: {err}") from None
            raise
