"""The trainer's loader reads what the curation writer writes (the shard contract in DESIGN.md)."""

from __future__ import annotations

import json

from vchitect.config import from_dict
from vchitect.data import DataConfig, build_loader
from tests.helpers_data import make_clip


def test_loader_reads_curation_writer_shards(tmp_path):
    from data_pipeline.writer import ShardWriter, sample_key

    clip = make_clip(72, 48, 20)
    writer = ShardWriter(str(tmp_path), "train", samples_per_shard=3, max_bytes=1 << 30)
    keys = []
    for src in ("vidA", "vid-b"):
        for c in range(3):
            key = sample_key(src, c)
            keys.append(key)
            writer.add(key, {"mp4": clip, "txt": f"caption of {key}".encode(),
                             "json": json.dumps({"fps": 24, "width": 72, "height": 48}).encode()})
    index = writer.close()
    assert [e["name"] for e in index] == ["train-000000.tar", "train-000001.tar"]
    cfg = from_dict(DataConfig, {"sources": [{"uri": str(tmp_path)}], "mode": "decode", "fps": 12.0,
                                 "num_workers": 0, "buckets": [{"height": 32, "width": 48, "frames": 5}],
                                 "max_batch_size": 1})
    it = iter(build_loader(cfg))
    batches = [next(it) for _ in range(6)]
    assert sorted(k for b in batches for k in b["keys"]) == sorted(keys)
    for b in batches:
        assert b["captions"] == [f"caption of {b['keys'][0]}"]
        assert b["pixels"].shape == (1, 3, 5, 32, 48)
