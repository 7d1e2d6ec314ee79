"""Completion records and the deterministic shard writer.

Layout of an output folder (local or ``s3://``)::

    _work/done/{source_id}.json   one per finished input: its clips, scores, rejections (JSON)
    _work/data/{source_id}.bin    the bytes of its clips (mp4 and other members), back to back
    {prefix}-{index:06d}.tar      WebDataset shards: {key}.json, {key}.mp4, {key}.txt
    index.json  stats.json  rejected.jsonl  _SUCCESS

A completion record is written atomically when an input has been through every per-input stage
(its data file first, the record last), so a killed run resumes from the inputs without one.
Records are plain JSON read back by a strict schema (:func:`record_from_json`): anyone who can
write to the output prefix can at worst make an input be redone, never run code. A record that
does not parse or match the schema, whose data file is missing or differs from the size and
sha256 it names, is ignored with a warning and its input is processed again; records of the old
pickle format (``.pkl``) are never unpickled, only counted and redone.

Shards are packed only once every input has a record: samples sorted by (source_id, clip),
global dedup, then fixed-size packing with fixed tar headers. The same inputs and config
therefore give the same bytes, however Ray scheduled the work and however often the run was
interrupted.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import fields
from typing import Any, Callable, Iterable, Optional

from . import io as vio
from .stages.clip import Clip, InputResult
from .stages.dedup import find_duplicates
from .stages.probe import ProbeResult

WORK = "_work/done"
DATA = "_work/data"
RECORD_FORMAT = "vchitect-curate-record"
RECORD_VERSION = 2  # 1: pickle (no longer read)
_MEMBER = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")


class RecordError(ValueError):
    """A completion record that cannot be used: its input is processed again."""

    def __init__(self, path: str, source_id: str, why: str):
        super().__init__(f"completion record {path}: {why}")
        self.path, self.source_id, self.why = path, source_id, why


def record_path(out: str, source_id: str) -> str:
    return vio.join(out, WORK, f"{source_id}.json")


def data_path(out: str, source_id: str) -> str:
    return vio.join(out, DATA, f"{source_id}.bin")


def record_to_json(res: InputResult) -> tuple[bytes, bytes]:
    """(record JSON, data bytes) of a finished input; every clip member's bytes go to the data."""
    data = bytearray()
    clips = []
    for clip in res.clips:
        members = {}
        for ext, blob in (("mp4", clip.mp4), *sorted(clip.extra.items())):
            members[ext] = [len(data), len(blob)]
            data += blob
        clips.append({"clip": clip.clip, "start": clip.start, "end": clip.end, "meta": clip.meta,
                      "phash": list(clip.phash), "caption": clip.caption,
                      "caption_source": clip.caption_source, "members": members})
    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "source_id": res.source_id,
              "uri": res.uri, "probe": res.probe, "entered": res.entered, "rejections": res.rejections,
              "clips": clips,
              "data": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} if data else None}
    return _dumps(record), bytes(data)


def write_record(out: str, res: InputResult, options=None) -> None:
    """Write the completion record of ``res`` (its data file first, the record last, each atomic)."""
    for clip in res.clips:
        clip.frames = []  # only the model stages need them
    record, data = record_to_json(res)
    if data:
        vio.write_bytes(data_path(out, res.source_id), data, options)
    vio.write_bytes(record_path(out, res.source_id), record, options)


# ----------------------------------------------------------------------------- strict reading


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check(ok: bool, why: str) -> None:
    if not ok:
        raise ValueError(why)


def _keys(d, required: set, optional: set = frozenset(), what: str = "record") -> None:
    _check(isinstance(d, dict), f"{what} is not an object")
    missing, extra = required - set(d), set(d) - required - optional
    _check(not missing and not extra, f"{what}: missing {sorted(missing)}, unexpected {sorted(extra)}")


_PROBE_TYPES = {f.name: {"float": _is_num, "int": _is_int, "str": lambda x: isinstance(x, str),
                         "bool": lambda x: isinstance(x, bool)}[str(f.type)] for f in fields(ProbeResult)}
_REJECTION_REQUIRED = {"source_id", "uri", "clip", "stage", "reason", "detail"}
_REJECTION_OPTIONAL = {"score", "start", "end"}
_CLIP_KEYS = {"clip", "start", "end", "meta", "phash", "caption", "caption_source", "members"}
_RECORD_KEYS = {"format", "version", "source_id", "uri", "probe", "entered", "rejections", "clips", "data"}


def _rejection(r: Any) -> dict:
    _keys(r, _REJECTION_REQUIRED, _REJECTION_OPTIONAL, "rejection")
    _check(all(isinstance(r[k], str) for k in ("source_id", "uri", "stage", "reason", "detail")),
           "rejection: source_id, uri, stage, reason and detail must be strings")
    _check(r["clip"] is None or _is_int(r["clip"]), "rejection: clip must be an integer or null")
    _check(all(_is_num(r[k]) for k in _REJECTION_OPTIONAL & set(r)), "rejection: score/start/end must be numbers")
    return r


def _clip(c: Any, size: int) -> Clip:
    _keys(c, _CLIP_KEYS, what="clip")
    _check(_is_int(c["clip"]) and c["clip"] >= 0, "clip: index must be a non-negative integer")
    _check(_is_num(c["start"]) and _is_num(c["end"]), "clip: start/end must be numbers")
    _check(isinstance(c["meta"], dict), "clip: meta must be an object")
    _check(isinstance(c["phash"], list) and all(_is_int(h) for h in c["phash"]), "clip: phash must be integers")
    for k in ("caption", "caption_source"):
        _check(c[k] is None or isinstance(c[k], str), f"clip: {k} must be a string or null")
    members = c["members"]
    _check(isinstance(members, dict) and "mp4" in members, "clip: members must name an mp4")
    for ext, span in members.items():
        _check(bool(_MEMBER.fullmatch(ext)) and ext not in ("json", "txt"), f"clip: bad member name {ext!r}")
        _check(isinstance(span, list) and len(span) == 2 and all(_is_int(v) and v >= 0 for v in span)
               and span[0] + span[1] <= size, f"clip: member {ext} lies outside the data")
    return Clip(clip=c["clip"], start=c["start"], end=c["end"], meta=c["meta"], phash=c["phash"],
                caption=c["caption"], caption_source=c["caption_source"])


def record_from_json(raw: bytes, source_id: str) -> tuple[InputResult, Optional[dict], dict]:
    """(result without clip bytes, data {size, sha256} or None, clip → members) of a record.

    Raises ValueError (or RecursionError on absurd nesting) for anything that is not exactly a
    record of this version for ``source_id``.
    """
    d = json.loads(raw)
    _keys(d, _RECORD_KEYS)
    _check(d["format"] == RECORD_FORMAT and _is_int(d["version"]) and d["version"] == RECORD_VERSION,
           f"not a {RECORD_FORMAT} of version {RECORD_VERSION}")
    _check(d["source_id"] == source_id, f"names source {d['source_id']!r}, not {source_id!r}")
    _check(isinstance(d["uri"], str), "uri must be a string")
    if d["probe"] is not None:
        _keys(d["probe"], set(_PROBE_TYPES), what="probe")
        _check(all(_PROBE_TYPES[k](v) for k, v in d["probe"].items()), "probe: a field has the wrong type")
    _check(isinstance(d["entered"], dict) and all(isinstance(k, str) and _is_int(v) for k, v in d["entered"].items()),
           "entered must map stage names to integers")
    _check(isinstance(d["rejections"], list), "rejections must be a list")
    data = d["data"]
    if data is not None:
        _keys(data, {"size", "sha256"}, what="data")
        _check(_is_int(data["size"]) and data["size"] > 0 and isinstance(data["sha256"], str)
               and re.fullmatch(r"[0-9a-f]{64}", data["sha256"]) is not None, "data: bad size or sha256")
    _check(isinstance(d["clips"], list), "clips must be a list")
    size = data["size"] if data else 0
    clips = [_clip(c, size) for c in d["clips"]]
    _check(len({c.clip for c in clips}) == len(clips), "clips: an index appears twice")
    _check(data is not None or not clips, "clips without data")
    res = InputResult(source_id=source_id, uri=d["uri"], probe=d["probe"], clips=clips,
                      rejections=[_rejection(r) for r in d["rejections"]], entered=d["entered"])
    return res, data, {c["clip"]: c["members"] for c in d["clips"]}


def _parse(path: str, raw: bytes, source_id: str):
    try:
        return record_from_json(raw, source_id)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RecordError(path, source_id, f"{type(exc).__name__}: {exc}") from None


def _check_data_size(path: str, source_id: str, data: Optional[dict], sizes: dict[str, int]) -> None:
    if data is not None and sizes.get(f"{source_id}.bin") != data["size"]:
        raise RecordError(path, source_id, "its data file is missing or has another size")


def read_record(out: str, source_id: str, options=None, *, with_data: bool = True,
                data_sizes: Optional[dict[str, int]] = None) -> InputResult:
    """A finished input's result; the clip bytes are read (and their sha256 checked) with
    ``with_data``, else only the data file's size is checked against ``data_sizes`` (when given).

    Raises :class:`RecordError` for a record (or data file) that cannot be used.
    """
    path = record_path(out, source_id)
    try:
        raw = vio.read_bytes(path, options)
    except FileNotFoundError:
        raise RecordError(path, source_id, "missing") from None
    res, data, members = _parse(path, raw, source_id)
    if not with_data and data_sizes is not None:
        _check_data_size(path, source_id, data, data_sizes)
    if with_data and data is not None:
        try:
            blob = vio.read_bytes(data_path(out, source_id), options)
        except FileNotFoundError:
            raise RecordError(path, source_id, "its data file is missing") from None
        if len(blob) != data["size"] or hashlib.sha256(blob).hexdigest() != data["sha256"]:
            raise RecordError(path, source_id, "its data file does not match the size and sha256 it names")
        for clip in res.clips:
            parts = {ext: blob[off:off + n] for ext, (off, n) in members[clip.clip].items()}
            clip.mp4 = parts.pop("mp4")
            clip.extra = parts
    return res


def finished_ids(out: str, options=None, warn: Optional[Callable[[str], None]] = None) -> set[str]:
    """Ids of the inputs with a usable completion record.

    A record that does not parse or match the schema, or whose data file is missing or has
    another size, is left out (its input is processed again) with one ``warn`` line naming it;
    old pickle records (``.pkl``) are left out, unread, with one line for all of them.
    """
    warn = warn or (lambda msg: None)
    folder = vio.join(out, WORK)
    names = vio.list_names(folder, options)
    old = [n for n in names if n.endswith(".pkl")]
    if old:
        warn(f"{len(old)} completion record(s) in the old pickle format under {folder} (e.g. {old[0]}) are "
             "ignored, never unpickled: their inputs will be redone")
    ids = [n[: -len(".json")] for n in names if n.endswith(".json") and not n.startswith(".tmp-")]
    if not ids:
        return set()
    sizes = vio.list_sizes(vio.join(out, DATA), options)
    raws = vio.read_many([record_path(out, sid) for sid in ids], options)
    good = set()
    for sid in ids:
        path = record_path(out, sid)
        raw = raws[path]
        try:
            if isinstance(raw, Exception):
                raise RecordError(path, sid, f"cannot be read: {type(raw).__name__}: {raw}")
            _res, data, _members = _parse(path, raw, sid)
            _check_data_size(path, sid, data, sizes)
        except RecordError as exc:
            warn(f"ignoring {exc}; the input will be processed again")
            continue
        good.add(sid)
    return good


def remove_record(out: str, source_id: str, options=None) -> None:
    vio.remove(record_path(out, source_id), options)


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


# score → (filter switch, lower-limit field, upper-limit field) of FilterConfig; None: no such limit
SCORE_LIMITS = {"sharpness": ("blur", "min_sharpness", None), "motion": ("motion", "min_motion", "max_motion"),
                "text_area": ("ocr", None, "max_text_area"), "nsfw": ("nsfw", None, "max_nsfw"),
                "aesthetic": (None, "min_aesthetic", None)}


def score_thresholds(f) -> dict:
    """``{score: {"min": x, "max": y}}``: the limits the run's filters applied to each score (for the report)."""
    out = {}
    for score, (switch, lo, hi) in SCORE_LIMITS.items():
        if switch is not None and not getattr(f, switch):
            continue
        limits = {k: getattr(f, field) for k, field in (("min", lo), ("max", hi)) if field}
        out[score] = limits
    return out


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False) + "\n").encode()


def finalize(out: str, cfg, source_ids: Iterable[str], *, fingerprint: str, options=None,
             run_info: Optional[dict] = None, on_shard=None) -> dict:
    """Dedup, pack and write shards, index.json, stats.json, rejected.jsonl and _SUCCESS.

    Raises :class:`RecordError` when a record or its data turns out unusable (the caller redoes
    that input and packs again).
    """
    ids = sorted(source_ids)
    # Pass 1: hashes for the global dedup.
    hashes = {}
    sizes = vio.list_sizes(vio.join(out, DATA), options)
    for sid in ids:
        res = read_record(out, sid, options, with_data=False, data_sizes=sizes)
        for clip in res.clips:
            hashes[(sid, clip.clip)] = clip.phash
    dups = find_duplicates(hashes, cfg.dedup.max_distance) if cfg.dedup.enabled else {}

    # Shards are about to change: withdraw the marker of an earlier packing (first) and its
    # index, so that a run killed while packing never leaves an output that claims to be complete.
    for name in ("_SUCCESS", "index.json", "stats.json", "rejected.jsonl"):
        vio.remove(vio.join(out, name), options)

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
    # Old pickle records (never read; every input has a JSON record by now) and record writes cut short.
    for folder in (WORK, DATA):
        for name in vio.list_names(vio.join(out, folder), options):
            if name.startswith(".tmp-") or (folder == WORK and name.endswith(".pkl")):
                vio.remove(vio.join(out, folder, name), options)

    counts["shards"] = len(index)
    stats = {
        "config_fingerprint": fingerprint,
        "counts": dict(sorted(counts.items())),
        "rejected_by_stage": {k: dict(sorted(v.items())) for k, v in sorted(by_stage.items())},
        "rejected_by_reason": dict(sorted(reasons.items())),
        "thresholds": score_thresholds(cfg.filters),
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
