"""vchitect.train.preflight: every path mistake is one ConfigError naming the key, before any rank."""

import pytest
import torch
from safetensors.torch import save_file

from vchitect.config import ConfigError, load_config
from vchitect.train.preflight import preflight

DATA = ["data.source=shards", "data.mode=precomputed", "data.latent_channels=4", "data.text.dim=32",
        "data.text.pooled_dim=16", "data.buckets=[{height: 8, width: 8, frames: 3}]", "data.vae_spatial_factor=1",
        "data.vae_temporal_factor=1"]


def config(*overrides, uri=None):
    data = DATA + [f"data.sources=[{{uri: '{uri}'}}]"] if uri is not None else ["data.source=synthetic"]
    return load_config("configs/model/tiny.yaml", data + list(overrides))


def check(cfg, *words):
    with pytest.raises(ConfigError) as info:
        preflight(cfg, world_size=1)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_data_sources(tmp_path):
    check(config(uri=tmp_path / "nope"), "data.sources[0].uri=", "no such folder", "point it at a folder")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    check(config(uri=tmp_path / "empty"), "the folder holds no *.tar shards")
    check(config(uri=tmp_path / "empty" / "notes.txt"), "is a file but not a .tar shard")
    check(config(uri=tmp_path / "empty" / "x.tar"), "no such folder or file")
    check(config(uri=tmp_path / "empty" / "*.tar"), "the pattern matches no *.tar file")
    check(config(uri=tmp_path / "empty" / "s-{000..003}.tar"), "none of the files it names exists")
    (tmp_path / "empty" / "s-002.tar").write_bytes(b"")
    for uri in ("", "/s-002.tar", "/*.tar", "/s-{000..003}.tar"):  # one shard is enough; missing ones are skipped
        preflight(config(uri=f"{tmp_path / 'empty'}{uri}"), world_size=1)
    preflight(config(uri="s3://bucket/prefix"), world_size=1)  # left to the ranks: listing a bucket is not cheap


def test_init_from(tmp_path):
    check(config(f"train.init_from=sd3:{tmp_path / 'nope'}"), "train.init_from='sd3:", "does not exist",
          "give a .safetensors file")
    (tmp_path / "empty").mkdir()
    check(config(f"train.init_from=vchitect2:{tmp_path / 'empty'}"), "has neither diffusion_pytorch_model")
    (tmp_path / "empty" / "diffusion_pytorch_model.bin").write_bytes(b"")
    check(config(f"train.init_from=vchitect2:{tmp_path / 'empty'}"), "never loaded")
    (tmp_path / "w.pt").write_bytes(b"")
    check(config(f"train.init_from=sd3:{tmp_path / 'w.pt'}"), "only .safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "diffusion_pytorch_model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}')
    save_file({"a": torch.zeros(1)}, str(sharded / "part-1.safetensors"))
    check(config(f"train.init_from=sd3:{sharded}"), "1 shard file(s) that are not in", "part-2.safetensors")
    save_file({"b": torch.zeros(1)}, str(sharded / "part-2.safetensors"))
    preflight(config(f"train.init_from=sd3:{sharded}"), world_size=1)  # paths only: the trainer checks the keys


def test_resume_and_encoder_folders(tmp_path):
    for resume in ("auto", "none"):
        preflight(config(f"train.resume={resume}"), world_size=1)
    check(config(f"train.resume={tmp_path / 'nope'}"), "train.resume=", "no such folder", "give a step-")
    (tmp_path / "file").write_text("x")
    check(config(f"train.resume={tmp_path / 'file'}"), "is a file, not a checkpoint folder")
    check(config(f"train.resume={tmp_path}"), "is not a step-XXXXXXXXX checkpoint folder")
    step = tmp_path / "step-000000001"
    step.mkdir()
    check(config(f"train.resume={step}"), "vchitect.json is missing")
    check(config(f"data.encoders.vae_path={tmp_path / 'vae'}"), "data.encoders.vae_path=", "no such folder")


def test_layout_errors_come_from_preflight_too():
    from vchitect.parallel.dims import ParallelLayoutError

    with pytest.raises(ParallelLayoutError):
        preflight(config("parallel.sp=2"), world_size=3)
    assert preflight(config("parallel.dp_shard=-1"), world_size=2).dp == 2
