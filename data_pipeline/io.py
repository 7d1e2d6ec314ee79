"""Paths that may be local or ``s3://``: one place that knows about fsspec."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import fsspec


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem(path: str, options: dict[str, Any] | None = None):
    """(fsspec filesystem, path inside it) for ``path``."""
    if is_remote(path):
        protocol = path.split("://", 1)[0]
        fs = fsspec.filesystem(protocol, **(options or {}))
        return fs, path.split("://", 1)[1]
    local = path[len("file://"):] if path.startswith("file://") else path
    return fsspec.filesystem("file"), os.path.abspath(local)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(path: str, options: dict[str, Any] | None = None) -> bytes:
    fs, p = filesystem(path, options)
    with fs.open(p, "rb") as f:
        return f.read()


def write_bytes(path: str, data: bytes, options: dict[str, Any] | None = None) -> None:
    """Write atomically: readers never see a partial file (local: rename; S3: single PUT)."""
    fs, p = filesystem(path, options)
    if is_remote(path):
        fs.pipe_file(p, data)
        return
    os.makedirs(os.path.dirname(p), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def exists(path: str, options: dict[str, Any] | None = None) -> bool:
    fs, p = filesystem(path, options)
    return fs.exists(p)


def list_names(folder: str, options: dict[str, Any] | None = None) -> list[str]:
    """Base names of the files directly in ``folder`` (empty when it does not exist)."""
    fs, p = filesystem(folder, options)
    try:
        entries = fs.ls(p, detail=False, refresh=True) if is_remote(folder) else fs.ls(p, detail=False)
    except FileNotFoundError:
        return []
    return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)


def list_sizes(folder: str, options: dict[str, Any] | None = None) -> dict[str, int]:
    """Base name → size in bytes of the files directly in ``folder`` (empty when it does not exist)."""
    fs, p = filesystem(folder, options)
    try:
        entries = fs.ls(p, detail=True, refresh=True) if is_remote(folder) else fs.ls(p, detail=True)
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
            for e in entries if e.get("type") != "directory"}


def read_many(paths: list[str], options: dict[str, Any] | None = None) -> dict[str, bytes | Exception]:
    """path → its bytes, or the exception that reading it raised (remote: fetched concurrently)."""
    if not paths:
        return {}
    if not is_remote(paths[0]):
        out: dict[str, bytes | Exception] = {}
        for path in paths:
            try:
                out[path] = read_bytes(path, options)
            except OSError as exc:
                out[path] = exc
        return out
    fs, _ = filesystem(paths[0], options)
    inner = {filesystem(path, options)[1]: path for path in paths}
    got = fs.cat(list(inner), on_error="return")
    return {path: got.get(k, FileNotFoundError(path)) for k, path in inner.items()}


def remove(path: str, options: dict[str, Any] | None = None) -> None:
    fs, p = filesystem(path, options)
    try:
        fs.rm(p)
    except FileNotFoundError:
        pass


@contextmanager
def local_copy(uri: str, options: dict[str, Any] | None = None) -> Iterator[str]:
    """A local file path for ``uri``: the file itself, or a temporary download of a remote object."""
    if not is_remote(uri):
        yield uri[len("file://"):] if uri.startswith("file://") else uri
        return
    fs, p = filesystem(uri, options)
    fd, tmp = tempfile.mkstemp(suffix=os.path.splitext(p)[1] or ".bin", prefix="vchitect-src-")
    os.close(fd)
    try:
        fs.get_file(p, tmp)
        yield tmp
    finally:
        os.unlink(tmp)
