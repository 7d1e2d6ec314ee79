"""Synthetic samples written as training shards in the layout of ``vchitect-curate run``.

``write_sample_shards(out, prefix, samples, this_run)`` packs ``(key, members)`` pairs with
:class:`data_pipeline.writer.ShardWriter` (deterministic tar headers) into ``{prefix}-{index:06d}.tar``
and writes ``index.json``, ``stats.json`` (the curation's layout, so ``vchitect-curate report OUT``
reads it), an empty ``rejected.jsonl`` and ``_SUCCESS``: ``_SUCCESS`` and the index are withdrawn
first and written last, and ``{prefix}-*.tar`` left by an earlier, larger run are removed (the
loader reads every tar of the folder). Used by the removal pairs (:mod:`vchitect.demo.removal`),
the depth shots (:mod:`vchitect.demo.depth`) and the motion clips (:mod:`vchitect.demo.task_world`).
"""

from __future__ import annotations

import json
from typing import Callable, Iterable


def write_sample_shards(out: str, prefix: str, samples: Iterable[tuple[str, dict[str, bytes]]],
                        this_run: Callable[[], dict], *, samples_per_shard: int = 64, options=None) -> dict:
    """Write ``samples`` under ``out`` (local or ``s3://``; ``options``: fsspec storage options);
    ``this_run()`` (called once every sample is written) gives stats.json's ``this_run``. Returns the
    index."""
    from data_pipeline import io as vio
    from data_pipeline.writer import ShardWriter

    for name in ("_SUCCESS", "index.json", "stats.json", "rejected.jsonl"):
        vio.remove(vio.join(out, name), options)
    writer = ShardWriter(out, prefix, samples_per_shard, max_bytes=1 << 40, options=options)
    n = 0
    for key, members in samples:
        writer.add(key, members)
        n += 1
    shards = writer.close()
    keep = {e["name"] for e in shards}
    for name in vio.list_names(out, options):
        if name.startswith(prefix + "-") and name.endswith(".tar") and name not in keep:
            vio.remove(vio.join(out, name), options)
    index = {"format": "webdataset", "prefix": prefix, "shards": shards, "nsamples": n}
    stats = {"counts": {"clips_written": n, "inputs": n, "shards": len(shards)}, "rejected_by_stage": {},
             "rejected_by_reason": {}, "thresholds": {}, "this_run": this_run()}
    for name, obj in (("index.json", index), ("stats.json", stats)):
        vio.write_bytes(vio.join(out, name), (json.dumps(obj, sort_keys=True) + "\n").encode(), options)
    vio.write_bytes(vio.join(out, "rejected.jsonl"), b"", options)
    vio.write_bytes(vio.join(out, "_SUCCESS"), b"", options)
    return index
