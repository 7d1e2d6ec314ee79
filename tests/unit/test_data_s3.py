"""vchitect.data reading shards from a real S3-compatible server (moto, 127.0.0.1)."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

from vchitect.config import from_dict
from vchitect.data import DataConfig, build_loader
from vchitect.data.testing import make_clip, sample, write_shard


@pytest.fixture()
def bucket_with_shards(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(key=s3_server["key"], secret=s3_server["secret"], skip_instance_cache=True,
                           client_kwargs={"endpoint_url": s3_server["endpoint_url"],
                                          "region_name": s3_server["region"]})
    name = f"vchitect-data-{uuid.uuid4().hex[:8]}"
    fs.mkdir(name)
    clip = make_clip(72, 48, 20)
    for s in range(3):
        path = write_shard(str(tmp_path / f"train-{s:06d}.tar"),
                           [sample(f"s3v{s}_{i:04d}", 72, 48, 20, clip=clip) for i in range(4)])
        fs.put(path, f"{name}/ds/train-{s:06d}.tar")
    return name, tmp_path


def _cfg(uri, server, **kw):
    base = {"sources": [{"uri": uri}], "mode": "decode", "fps": 12.0, "num_workers": 0,
            "buckets": [{"height": 32, "width": 48, "frames": 5}], "token_budget": 24,
            "retry_backoff": 0.01, "shard_retries": 1}
    if server is not None:
        base["s3"] = {"endpoint_url": server["endpoint_url"], "region": server["region"],
                      "key": server["key"], "secret": server["secret"]}
    base.update(kw)
    return from_dict(DataConfig, base)


def test_s3_source_matches_local_and_never_logs_credentials(s3_server, bucket_with_shards, caplog):
    name, local = bucket_with_shards
    caplog.set_level(logging.INFO)  # every logger at the trainer's level: s3fs, botocore, werkzeug …
    caplog.set_level(logging.DEBUG, logger="vchitect")
    s3_loader = build_loader(_cfg(f"s3://{name}/ds", s3_server, num_workers=2))
    assert [u.rsplit("/", 1)[1] for u in s3_loader.shards[0]] == [f"train-{s:06d}.tar" for s in range(3)]
    it = iter(s3_loader)
    remote = [next(it) for _ in range(6)]
    it.close()
    local_it = iter(build_loader(_cfg(str(local), None, num_workers=2)))
    for r in remote:
        loc = next(local_it)
        assert r["keys"] == loc["keys"] and torch.equal(r["pixels"], loc["pixels"])
    epoch0 = [k for b in remote for k, e in zip(b["keys"], b["epochs"]) if e == 0]
    assert len(epoch0) >= 8 and len(set(epoch0)) == len(epoch0)
    assert s3_loader.metrics()["data/bytes"] > 0
    # a shard that does not exist: retried, skipped, reported; the error text is scrubbed
    broken = build_loader(_cfg(f"s3://{name}/ds/train-{{000002..000003}}.tar", s3_server))
    it = iter(broken)
    keys = [k for _ in range(4) for k in next(it)["keys"]]
    assert {k.split("_")[0] for k in keys} == {"s3v2"}
    assert any("train-000003.tar" in u for u in broken.failed_shards())
    logged = "\n".join(r.getMessage() for r in caplog.records) + caplog.text
    assert "unreadable after" in logged
    for secret in (s3_server["key"], s3_server["secret"]):
        assert secret not in logged
    assert s3_server["endpoint_url"] not in "\n".join(
        r.getMessage() for r in caplog.records if r.name.startswith("vchitect"))
    assert s3_server["secret"] not in repr(broken.cfg) and s3_server["secret"] not in str(broken.state_dict())
