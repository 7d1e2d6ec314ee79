"""Completion records and the deterministic shard writer.

Layout of an output folder (local or ``s3://``)::

    _work/done/{source_id}.pkl    one per finished input (its clips, scores, rejections)
    {prefix}-{index:06d}.tar      WebDataset shards: {key}.json, {key}.mp4, {key}.txt
    index.json  stats.json  rejected.jsonl  _SUCCESS

A completion record is written atomically when an input has been through every per-input stage,
so a killed run resumes from the inputs without one. Shards are packed only once every input has
a record: samples sorted by (source_id, clip), global dedup, then fixed-size packing with fixed
tar headers. The same inputs and config therefore give the same bytes, however Ray scheduled
the work and however often the run was interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import tarfile
from collections import Counter
from typing import Any, Callable, Iterable, Optional

from . import io as vio
from .stages.clip import InputResult
from .stages.dedup import find_duplicates

WORK = "_work/done"
RECORD_VERSION = 1


def record_path(out: str, source_id: str) -> str:
    return vio.join(out, WORK, f"{source_id}.pkl")


def write_record(out: str, res: InputResult, options=None) -> None:
    for clip in res.clips:
        clip.frames = []  # only the model stages need them
    vio.write_bytes(record_path(out, res.source_id),
                    pickle.dumps({"version": RECORD_VERSION, "result": res}, protocol=5), options)


def read_record(out: str, source_id: str, options=None) -> InputResult:
    data = pickle.loads(vio.read_bytes(record_path(out, source_id), options))
    return data["result"]


def finished_ids(out: str, options=None) -> set[str]:
    return {n[: -len(".pkl")] for n in vio.list_names(vio.join(out, WORK), options) if n.endswith(".pkl")}


def sample_key(source_id: str, clip: int) -> str:
    return f"{source_id}_{clip:04d}"


def _tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Packs samples into ``{prefix}-{index:06d}.tar`` in the order they are given."""

    def __init__(self, out: str, prefix: str, samples_per_shard: int, max_bytes: int, options=None,
                 on_shard: Optional[Callable[[dict], None]] = None):
        self.out, self.prefix, self.n_max, self.b_max = out, prefix, samples_per_shard, max_bytes
        self.options = options
        self.on_shard = on_shard
        self.index: list[dict] = []
        self._buf: Optional[io.BytesIO] = None
        self._tar: Optional[tarfile.TarFile] = None
        self._count = 0

    def add(self, key: str, members: dict[str, bytes]) -> None:
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        if self._tar is not None and (self._count >= self.n_max or
                                      (self._count and self._buf.tell() + size + 1024 > self.b_max)):
            self._close()
        if self._tar is None:
            self._buf = io.BytesIO()
            self._tar = tarfile.open(fileobj=self._buf, mode="w", format=tarfile.USTAR_FORMAT)
            self._count = 0
        for ext in sorted(members):
            _tar_member(self._tar, f"{key}.{ext}", members[ext])
        self._count += 1

    def _close(self) -> None:
        self._tar.close()
        data = self._buf.getvalue()
        name = f"{self.prefix}-{len(self.index):06d}.tar"
        vio.write_bytes(vio.join(self.out, name), data, self.options)
        entry = {"name": name, "nsamples": self._count, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        self.index.append(entry)
        if self.on_shard:
            self.on_shard(entry)
        self._tar = self._buf = None

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close()
        return self.index


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n").encode()


def finalize(out: str, cfg, source_ids: Iterable[str], *, fingerprint: str, options=None,
             run_info: Optional[dict] = None, on_shard=None) -> dict:
    """Dedup, pack and write shards, index.json, stats.json, rejected.jsonl and _SUCCESS."""
    ids = sorted(source_ids)
    # Pass 1: hashes for the global dedup.
    hashes = {}
    for sid in ids:
        res = read_record(out, sid, options)
        for clip in res.clips:
            hashes[(sid, clip.clip)] = clip.phash
    dups = find_duplicates(hashes, cfg.dedup.max_distance) if cfg.dedup.enabled else {}

    # Pass 2: shards, in key order.
    writer = ShardWriter(out, cfg.output.prefix, cfg.output.samples_per_shard, cfg.output.max_shard_bytes,
                         options, on_shard=on_shard)
    rejected: list[dict] = []
    reasons: Counter = Counter()
    by_stage: dict[str, Counter] = {}
    counts = Counter(inputs=len(ids))
    for sid in ids:
        res = read_record(out, sid, options)
        counts["clip_windows"] += res.entered.get("clip", 0)
        counts["inputs_probed"] += res.probe is not None
        for rec in res.rejections:
            rejected.append(rec)
        for clip in sorted(res.clips, key=lambda c: c.clip):
            key = sample_key(sid, clip.clip)
            if (sid, clip.clip) in dups:
                osid, oclip = dups[(sid, clip.clip)]
                rejected.append({"source_id": sid, "uri": res.uri, "clip": clip.clip, "stage": "dedup",
                                 "reason": "duplicate", "detail": f"near-duplicate of {sample_key(osid, oclip)}",
                                 "start": round(clip.start, 4), "end": round(clip.end, 4)})
                continue
            meta = dict(clip.meta, key=key, caption=clip.caption)
            writer.add(key, {"mp4": clip.mp4, "json": _dumps(meta), "txt": clip.caption.encode(),
                             **getattr(clip, "extra", {})})
            counts["clips_written"] += 1
    index = writer.close()
    for rec in rejected:
        reasons[f"{rec['stage']}.{rec['reason']}"] += 1
        by_stage.setdefault(rec["stage"], Counter())[rec["reason"]] += 1
    rejected.sort(key=lambda r: (r["source_id"], -1 if r["clip"] is None else r["clip"], r["stage"]))

    # Remove shards of an earlier run that packed more of them, and half-written files.
    keep = {e["name"] for e in index}
    for name in vio.list_names(out, options):
        stale_shard = name.startswith(cfg.output.prefix + "-") and name.endswith(".tar") and name not in keep
        if stale_shard or name.startswith(".tmp-"):  # .tmp-*: a local write cut short by a kill
            vio.remove(vio.join(out, name), options)

    counts["shards"] = len(index)
    stats = {
        "config_fingerprint": fingerprint,
        "counts": dict(sorted(counts.items())),
        "rejected_by_stage": {k: dict(sorted(v.items())) for k, v in sorted(by_stage.items())},
        "rejected_by_reason": dict(sorted(reasons.items())),
        "this_run": run_info or {},
    }
    vio.write_bytes(vio.join(out, "index.json"),
                    _dumps({"format": "webdataset", "prefix": cfg.output.prefix, "shards": index,
                            "nsamples": counts["clips_written"]}), options)
    vio.write_bytes(vio.join(out, "rejected.jsonl"),
                    b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rejected), options)
    vio.write_bytes(vio.join(out, "stats.json"), _dumps(stats), options)
    vio.write_bytes(vio.join(out, "_SUCCESS"), b"", options)
    return stats
