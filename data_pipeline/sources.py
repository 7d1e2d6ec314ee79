"""Inputs of a run: a local directory, an ``s3://`` prefix, or a manifest (CSV / JSONL / Parquet).

Every input becomes a :class:`SourceItem` with a stable ``source_id`` (letters, digits, ``_``
and ``-`` only): the shard sample keys ``{source_id}_{clip:04d}`` and the resume records are
named after it, so it depends only on the input's uri (or the manifest's ``id``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from . import io as vio

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


@dataclass
class SourceItem:
    uri: str
    source_id: str
    caption: Optional[str] = None
    # Timed source captions: [{"start": s, "end": s, "caption": str}, …] (e.g. per shot).
    segments: list[dict] = field(default_factory=list)

    def to_row(self) -> dict:
        return {"uri": self.uri, "source_id": self.source_id, "caption": self.caption or "",
                "segments": json.dumps(self.segments)}

    @classmethod
    def from_row(cls, row: dict) -> "SourceItem":
        return cls(uri=row["uri"], source_id=row["source_id"], caption=row.get("caption") or None,
                   segments=json.loads(row.get("segments") or "[]"))


def make_source_id(name: str, uri: str) -> str:
    """A readable, unique, key-safe id: the sanitised name plus 8 hex digits of the uri's hash."""
    stem = _UNSAFE.sub("-", name).strip("-_")[:60] or "video"
    return f"{stem}-{hashlib.sha1(uri.encode()).hexdigest()[:8]}"


def list_sources(path: str, extensions: list[str], storage_options: dict[str, Any] | None = None,
                 limit: int = 0) -> list[SourceItem]:
    """All inputs under ``path``, sorted by ``source_id`` (deterministic for the same inputs)."""
    if path.lower().endswith(MANIFEST_SUFFIXES):
        items = read_manifest(path, storage_options)
    else:
        items = _list_files(path, extensions, storage_options)
    seen: dict[str, str] = {}
    for it in items:
        if it.source_id in seen:
            raise ValueError(f"two inputs share the id {it.source_id!r}: {seen[it.source_id]!r} and "
                             f"{it.uri!r}; give them distinct ids in the manifest")
        seen[it.source_id] = it.uri
    items.sort(key=lambda it: it.source_id)
    return items[:limit] if limit else items


def _list_files(path: str, extensions: list[str], storage_options) -> list[SourceItem]:
    exts = tuple(e.lower() for e in extensions)
    if not vio.is_remote(path):
        return _list_local(path[len("file://"):] if path.startswith("file://") else path, exts)
    fs, root = vio.filesystem(path, storage_options)
    if not fs.exists(root):
        raise FileNotFoundError(f"input.path {path!r} does not exist")
    if fs.isfile(root):
        files = [root]
        root = os.path.dirname(root)
    else:
        files = fs.find(root)
    protocol = path.split("://", 1)[0]
    items = []
    for f in sorted(files):
        if f.lower().endswith(exts):
            rel = f[len(root):].lstrip("/")
            uri = f"{protocol}://{f}"
            items.append(SourceItem(uri=uri, source_id=make_source_id(os.path.splitext(rel)[0], uri)))
    return items


def _list_local(path: str, exts: tuple[str, ...]) -> list[SourceItem]:
    """Every entry under a local folder whose name has one of ``exts``, whatever it is: files,
    broken symlinks, FIFOs, devices, sockets and links to folders are inputs too, rejected with a
    reason by the probe (from ``stat``, never opened). A subfolder that cannot be listed becomes an
    input as well (rejected as ``permission_denied``), so no file is skipped without a record."""
    root = os.path.abspath(path)
    if not os.path.lexists(root):
        raise FileNotFoundError(f"input.path {path!r} does not exist")
    if not os.path.isdir(root):
        found, root = ([root] if root.lower().endswith(exts) else []), os.path.dirname(root)
    else:
        unlistable: list[OSError] = []
        found = []
        for dirpath, dirs, names in os.walk(root, onerror=unlistable.append):
            links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]  # not followed
            found += [os.path.join(dirpath, n) for n in names + links if n.lower().endswith(exts)]
        for err in unlistable:
            if os.path.abspath(err.filename) == root:
                raise err  # input.path itself cannot be listed
            found.append(os.path.abspath(err.filename))
    items = []
    for f in sorted(found):
        rel = os.path.relpath(f, root)
        items.append(SourceItem(uri=f, source_id=make_source_id(os.path.splitext(rel)[0], f)))
    return items


def read_manifest(path: str, storage_options=None) -> list[SourceItem]:
    """Rows with ``uri`` and optional ``id``, ``caption``, ``segments`` (JSON list or list)."""
    data = vio.read_bytes(path, storage_options)
    lower = path.lower()
    if lower.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    elif lower.endswith(".jsonl"):
        rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    else:
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    items = []
    for i, row in enumerate(rows):
        uri = row.get("uri") or row.get("path")
        if not uri:
            raise ValueError(f"{path}: row {i} has no `uri` column")
        uri = str(uri)
        if not vio.is_remote(uri) and not os.path.isabs(uri):
            uri = os.path.normpath(os.path.join(base, uri)) if not vio.is_remote(base) else f"{base}/{uri}"
        segments = row.get("segments") or []
        if isinstance(segments, str):
            segments = json.loads(segments) if segments.strip() else []
        sid = row.get("id")
        name = str(sid) if sid not in (None, "") else os.path.splitext(uri.rsplit("/", 1)[-1])[0]
        source_id = (_UNSAFE.sub("-", name).strip("-_")[:80] or make_source_id("video", uri)) \
            if sid not in (None, "") else make_source_id(name, uri)
        items.append(SourceItem(uri=uri, source_id=source_id, caption=row.get("caption") or None,
                                segments=[dict(s) for s in segments]))
    return items
