"""vchitect.data reading shards from a real S3-compatible server (moto, 127.0.0.1)."""

from __future__ import annotations

import logging
import uuid

import pytest
import torch

from vchitect.config import from_dict
from vchitect.data import DataConfig, build_loader
from tests.helpers_data import make_clip, sample, write_shard


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


S3_KEYS = {"endpoint_url": "http://127.0.0.1:9", "region": "eu-west-1", "profile": "lab", "key": "AKIA-TEST",
           "secret": "s3cr3t", "anon": False, "options": {"requester_pays": True}}


def test_training_and_curation_configs_take_the_same_s3_keys():
    """One S3 settings shape: `data.s3` of a training config and `s3` of a curation config accept the
    same keys and give s3fs the same options (curation reads and writes through them)."""
    from data_pipeline.config import CurateConfig, storage_options
    from vchitect.config import Config, load_config
    from vchitect.data.config import S3Config

    train = load_config(overrides=[f"data.s3.{k}={v}" for k, v in S3_KEYS.items() if k != "options"]
                        + ["data.s3.options={requester_pays: true}", "data.source=synthetic"], schema=Config)
    curate = from_dict(CurateConfig, {"input": {"path": "s3://b/raw"}, "output": {"path": "s3://b/out"},
                                      "s3": S3_KEYS})
    assert type(train.data.s3) is type(curate.s3) is S3Config
    assert train.data.s3 == curate.s3
    opts = storage_options(curate)
    assert opts == train.data.s3.storage_options() == {
        "requester_pays": True, "key": "AKIA-TEST", "secret": "s3cr3t", "profile": "lab",
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}}
    assert "s3cr3t" not in repr(curate.s3) and "AKIA" not in repr(curate.s3)
    assert from_dict(S3Config, {"anon": True}).storage_options() == {"anon": True}


@pytest.mark.parametrize("old, new", [
    ({"endpoint_url": "http://127.0.0.1:9"}, "storage.endpoint_url → s3.endpoint_url"),
    ({"region": "eu-west-1"}, "storage.region → s3.region"),
    ({"options": {"key": "k", "secret": "s"}}, "storage.options.key → s3.key; storage.options.secret → s3.secret"),
    ({"options": {"requester_pays": True}}, "storage.options.requester_pays → s3.options.requester_pays"),
])
def test_old_curation_storage_keys_fail_naming_the_s3_keys(old, new, tmp_path):
    from data_pipeline.config import load_curate_config
    from data_pipeline.report import _options
    from vchitect.config import ConfigError

    path = tmp_path / "old.yaml"
    path.write_text("input: {path: raw}\noutput: {path: out}\n")
    key, value = next(iter(old.items()))
    flat = ([f"storage.{key}.{k}={v}" for k, v in value.items()] if isinstance(value, dict)
            else [f"storage.{key}={value}"])
    for load in (lambda: load_curate_config(path, flat), lambda: _options(flat)):
        with pytest.raises(ConfigError, match="renamed `s3`") as err:
            load()
        assert new in str(err.value)
