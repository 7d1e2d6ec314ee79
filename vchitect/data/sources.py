"""Shard sources: list the tars of a local folder / brace / glob / ``s3://`` prefix, and stream their
samples (WebDataset layout: members ``{key}.{ext}`` grouped by key, in tar order).

Reading a shard retries with exponential backoff and then gives up on it without raising, so one
bad file or a flaky object store never stops training. URLs are logged; credentials never are.
"""

from __future__ import annotations

import glob as globlib
import logging
import os
import re
import tarfile
import time
from typing import Callable, Iterator, Optional

from vchitect.config import ConfigError

from .config import S3Config

log = logging.getLogger("vchitect.data")

_FS: dict = {}  # per-process s3fs instance (not shared across forked workers)


def s3_filesystem(s3: S3Config):
    import s3fs

    key = (os.getpid(), id(s3))
    if key not in _FS:
        _FS[key] = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options())
    return _FS[key]


def _expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` → a-000.tar, a-001.tar, a-002.tar; ``{x,y}`` → x, y; several groups."""
    m = re.search(r"\{([^{}]*)\}", pattern)  # innermost group first
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        width = len(rng.group(1)) if rng.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        parts = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        parts = body.split(",")
    return [out for p in parts for out in _expand_braces(head + p + tail)]


def scrub(text: str, s3: S3Config) -> str:
    """``text`` with every configured or environment credential, endpoint and profile masked."""
    secrets = [s3.key, s3.secret, s3.endpoint_url, s3.profile] + [
        os.environ.get(v) for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                                    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")]
    for value in secrets:
        if value:
            text = text.replace(value, "<redacted>")
    return text


def list_shards(uri: str, s3: S3Config) -> list[str]:
    """Every shard URL of one source, sorted (deterministic for the same listing)."""
    if uri.startswith("s3://"):
        fs = s3_filesystem(s3)
        if "{" in uri:
            return sorted(_expand_braces(uri))
        if any(c in uri for c in "*?["):
            return sorted("s3://" + p for p in fs.glob(uri[5:]) if p.endswith(".tar"))
        if uri.endswith(".tar"):
            return [uri]
        prefix = uri[5:].rstrip("/")
        try:
            found = fs.find(prefix)
        except FileNotFoundError:
            found = []
        return sorted("s3://" + p for p in found if p.endswith(".tar"))
    if "{" in uri:
        return sorted(_expand_braces(uri))
    if any(c in uri for c in "*?["):
        return sorted(p for p in globlib.glob(uri) if p.endswith(".tar"))
    if os.path.isdir(uri):
        return sorted(os.path.join(uri, n) for n in os.listdir(uri) if n.endswith(".tar"))
    return [uri] if uri.endswith(".tar") else []


SOURCE_HINT = ("point it at a folder of *.tar shards (what `vchitect-curate run` writes), a brace or glob pattern "
               "of them, or s3://bucket/prefix; or set data.source=synthetic")


def local_source_problem(uri: str) -> Optional[str]:
    """Why the local source ``uri`` has no shard to read, or None when it has one. Cheap: stops at
    the first shard found (a brace pattern with some files missing passes; those are skipped later)."""
    if "{" in uri:
        return None if any(os.path.isfile(p) for p in _expand_braces(uri)) else "none of the files it names exists"
    if any(c in uri for c in "*?["):
        return None if any(p.endswith(".tar") for p in globlib.iglob(uri)) else "the pattern matches no *.tar file"
    if os.path.isdir(uri):
        with os.scandir(uri) as entries:
            return None if any(e.name.endswith(".tar") for e in entries) else "the folder holds no *.tar shards"
    if os.path.isfile(uri):
        return None if uri.endswith(".tar") else "is a file but not a .tar shard"
    return "no such folder or file"


def source_error(index: int, uri: str, problem: str) -> ConfigError:
    return ConfigError(f"data.sources[{index}].uri={uri!r}: {problem}; {SOURCE_HINT}")


def open_shard(url: str, s3: S3Config):
    if url.startswith("s3://"):
        return s3_filesystem(s3).open(url[5:], "rb", block_size=8 << 20, cache_type="readahead")
    return open(url, "rb", buffering=1 << 20)


def iter_tar(fileobj) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """(key, {ext: bytes}, bytes) per sample, in tar order. Keys carry the member's folder."""
    key, members, nbytes = None, {}, 0
    with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            folder, base = os.path.split(info.name)
            if base.startswith((".", "__")) or "." not in base:
                continue
            stem, ext = base.split(".", 1)
            k = f"{folder}/{stem}" if folder else stem
            if k != key:
                if key is not None:
                    yield key, members, nbytes
                key, members, nbytes = k, {}, 0
            members[ext] = tar.extractfile(info).read()
            nbytes += info.size
    if key is not None:
        yield key, members, nbytes


def read_shard(url: str, s3: S3Config, start: int = 0, stride: int = 1, offset: int = 0,
               retries: int = 3, backoff: float = 1.0,
               on_failed: Optional[Callable[[str, str], None]] = None,
               ) -> Iterator[tuple[int, str, dict[str, bytes], int]]:
    """(index, key, members, bytes) for samples ``index >= start`` with ``index % stride == offset``.

    A read error re-opens the shard after ``backoff`` seconds (doubling) and continues after the last
    sample yielded; after ``retries`` re-tries the rest of the shard is skipped and ``on_failed(url,
    reason)`` is called.
    """
    nxt = start
    for attempt in range(retries + 1):
        try:
            with open_shard(url, s3) as f:
                for i, (key, members, nbytes) in enumerate(iter_tar(f)):
                    if i < nxt or i % stride != offset:
                        continue
                    nxt = i + 1
                    yield i, key, members, nbytes
            return
        except Exception as exc:  # I/O, truncated tar, object store errors: all retried
            reason = scrub(f"{type(exc).__name__}: {str(exc)[:300]}", s3)
            if attempt < retries:
                log.warning("shard %s: read failed (%s); retry %d/%d in %.1fs",
                            url, type(exc).__name__, attempt + 1, retries, backoff * 2 ** attempt)
                time.sleep(backoff * 2 ** attempt)
            else:
                log.error("shard %s: unreadable after %d attempts (%s); skipping the rest of it",
                          url, retries + 1, reason)
                if on_failed is not None:
                    on_failed(url, reason)
