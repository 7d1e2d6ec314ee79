"""Precomputed shards: the curation latents stage encodes what decode-mode training would, writes
pooled.npy and the encoders' record, and training refuses shards made with other encoders.

The shards are curated by the real stages without Ray (probe/split/clip → captions → latents →
records → packing) from one synthetic video, with a tiny random AutoencoderKL and CLIP text
encoder (the `sentence` kind: its pooled vector is the normalised masked mean, which the loader's
no-pooled.npy stand-in is not, so a batch whose pooled equals pooled.npy read the file).
"""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
import torch

from data_pipeline import synthetic
from data_pipeline.config import ConfigError, load_curate_config
from data_pipeline.sources import list_sources
from data_pipeline.stages.clip import process_video
from data_pipeline.stages.latents import LatentEncoder, check_latents
from data_pipeline.stages.models import Captioner
from data_pipeline.writer import finalize, write_record
from tests.helpers_models import save_tiny_latent_models
from vchitect.config import from_dict, load_config
from vchitect.data import DataConfig, build_loader
from vchitect.data.encode import encode_batch, load_encoders
from vchitect.data.provenance import EncoderMismatch

BUCKETS = "[{height: 32, width: 48, frames: 5}, {height: 32, width: 32, frames: 1}]"
TEXT = {"max_length": 12, "dim": 16, "pooled_dim": 16}


def curate_overrides(root, out, vae, text):
    return [f"input.path={root}/manifest.jsonl", f"output.path={out}", "clip.max_duration=3.0",
            "clip.max_size=64", "latents.enabled=true", f"latents.encoders.vae_path={vae}",
            f"latents.encoders.text_encoder_path={text}", "latents.encoders.text_encoder_kind=sentence",
            "latents.encoders.dtype=float32", f"latents.text={TEXT}", f"latents.buckets={BUCKETS}",
            "latents.fps=6", "latents.seed=5"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """(shard folder, models A (vae, text) the shards were made with, models B (other weights))."""
    tmp = tmp_path_factory.mktemp("precomputed")
    root, out = str(tmp / "raw"), str(tmp / "shards")
    synthetic.generate_corpus(root, n=1, seed=3, defects=False)
    a, b = save_tiny_latent_models(str(tmp / "a")), save_tiny_latent_models(str(tmp / "b"), seed=1)
    cfg = load_curate_config(None, curate_overrides(root, out, *a))
    check_latents(cfg)
    (item,) = list_sources(f"{root}/manifest.jsonl", [".mp4"])
    res = process_video(os.path.join(root, item.uri), item, cfg)
    Captioner(cfg)([res], {item.source_id: item})
    LatentEncoder(cfg)([res])
    assert len(res.clips) == 2 and not res.rejections
    write_record(out, res)
    finalize(out, cfg, [item.source_id], fingerprint="f")
    return out, a, b


def train_cfg(uri, vae, text, **kw) -> DataConfig:
    base = {"sources": [{"uri": str(uri)}], "mode": "precomputed", "buckets": from_yaml(BUCKETS), "fps": 6.0,
            "seed": 5, "token_budget": 480, "num_workers": 0, "latent_channels": 4, "vae_spatial_factor": 2,
            "vae_temporal_factor": 1, "text": dict(TEXT), "shuffle_buffer": 1,
            "encoders": {"vae_path": vae, "text_encoder_path": text, "text_encoder_kind": "sentence",
                         "dtype": "float32"}}
    base.update(kw)
    return from_dict(DataConfig, base)


def from_yaml(text):
    import yaml

    return yaml.safe_load(text)


def members(folder) -> dict[str, dict[str, bytes]]:
    """key → {ext: bytes} of every sample in the folder's shards."""
    out: dict = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(folder, name)) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def npy(raw: bytes) -> np.ndarray:
    return np.load(io.BytesIO(raw), allow_pickle=False)


def test_curation_writes_pooled_and_the_encoder_record(shards):
    import json

    out, (vae, text), _ = shards
    samples = members(out)
    assert len(samples) == 2
    for key, m in samples.items():
        assert set(m) == {"mp4", "json", "txt", "latent.npy", "text.npy", "text_mask.npy", "pooled.npy"}
        lat, txt, mask, pooled = (npy(m[n]) for n in ("latent.npy", "text.npy", "text_mask.npy", "pooled.npy"))
        assert (lat.dtype, txt.dtype, mask.dtype, pooled.dtype) == (np.float16, np.float16, np.uint8, np.float16)
        # one training crop: the 32×48×5 bucket, latents C=4 × 5 frames × (32/2) × (48/2)
        assert lat.shape == (4, 5, 16, 24) and txt.shape == (12, 16) and pooled.shape == (16,)
        assert 0 < mask.sum() < 12
        rec = json.loads(m["json"])["latents"]
        assert rec["vae"]["name"] == "tiny-vae" and rec["vae"]["per_frame"] is True
        assert rec["text_encoder"]["kind"] == "sentence" and rec["text_encoder"]["max_length"] == 12
        assert [e["name"] for e in rec["text_encoder"]["encoders"]] == ["tiny-text"]
        assert rec["bucket"] == {"height": 32, "width": 48, "frames": 5} and rec["fps"] == 6.0
        assert (rec["seed"], rec["epoch"]) == (5, 0) and len(rec["frames"]) == 5
        assert np.diff(rec["frames"]).tolist() == [2, 2, 2, 2]  # 12 fps clip sampled at 6 fps
        assert (rec["latent_shape"], rec["text_shape"], rec["pooled_shape"]) == ([4, 5, 16, 24], [12, 16], [16])


def test_precomputed_latents_are_what_decode_mode_computes(shards):
    """The trainer in decode mode on the same shards (same seed, epoch 0), through the real loader and
    encode_batch, computes latent.npy / text.npy / pooled.npy up to float16 rounding."""
    out, (vae, text), _ = shards
    samples = members(out)
    cfg = train_cfg(out, vae, text, mode="decode")
    encoders = load_encoders(cfg)
    seen = set()
    for batch in iter(build_loader(cfg)):
        if batch["epoch"] > 0 or len(seen) == len(samples):
            break
        got = encode_batch(batch, *encoders)
        for i, key in enumerate(batch["keys"]):
            m = samples[key]
            for name, arr in (("latent.npy", got["latents"]), ("text.npy", got["text"]),
                              ("pooled.npy", got["pooled"])):
                want = arr[i].float().numpy()
                np.testing.assert_allclose(npy(m[name]).astype(np.float32), want, rtol=2e-3, atol=2e-3,
                                           err_msg=f"{key} {name}")
            assert torch.equal(torch.from_numpy(npy(m["text_mask.npy"]).astype(bool)), got["text_mask"][i])
            seen.add(key)
    assert seen == set(samples)


def test_precomputed_training_reads_pooled_npy(shards):
    out, (vae, text), _ = shards
    samples = members(out)
    loader = build_loader(train_cfg(out, vae, text, max_batch_size=1))
    it = iter(loader)
    batches = [next(it) for _ in range(2)]
    assert sorted(b["keys"][0] for b in batches) == sorted(samples)
    for b in batches:
        m = samples[b["keys"][0]]
        pooled = torch.from_numpy(npy(m["pooled.npy"]).astype(np.float32))
        assert torch.equal(b["pooled"][0], pooled)
        assert torch.equal(b["latents"][0], torch.from_numpy(npy(m["latent.npy"]).astype(np.float32)))
        text, mask = b["text"][0], b["text_mask"][0]
        assert not torch.allclose(pooled, text[mask].mean(0), atol=1e-3)  # not the masked-mean stand-in


def test_loader_refuses_shards_of_another_text_encoder_with_workers(shards):
    out, (vae, _), (_, other_text) = shards
    loader = build_loader(train_cfg(out, vae, other_text, num_workers=2))
    with pytest.raises(EncoderMismatch) as info:
        next(iter(loader))
    msg = str(info.value)
    assert "Traceback" not in msg and "worker" not in msg  # the message as raised, not the worker's dump
    for words in (f"shard {out}/shard-000000.tar, sample ", "were encoded with text encoder",
                  "tiny-text@", "data.encoders.text_encoder_path", "re-run the curation latents stage",
                  "point data.encoders at the encoders these shards were made with"):
        assert words in msg, (words, msg)
    shard_rev, config_rev = (part.split("tiny-text@")[1].split("]")[0] for part in msg.split("but ")[:2])
    assert shard_rev != config_rev


def test_preflight_refuses_other_encoders_before_ranks_start(shards):
    from vchitect.train.preflight import preflight

    out, (vae, text), (other_vae, other_text) = shards

    def config(vae, text, *more):
        return load_config("configs/model/tiny.yaml", [
            f"data.sources=[{{uri: '{out}'}}]", "data.mode=auto", f"data.buckets={BUCKETS}", "data.fps=6",
            "data.latent_channels=4", "data.vae_spatial_factor=2", "data.vae_temporal_factor=1",
            f"data.text={TEXT}", "model.joint_attention_dim=16", f"data.encoders.vae_path={vae}",
            f"data.encoders.text_encoder_path={text}", "data.encoders.text_encoder_kind=sentence", *more])

    preflight(config(vae, text), world_size=1)  # the encoders the shards were made with
    for cfg, words in ((config(vae, other_text), "were encoded with text encoder"),
                       (config(other_vae, text), "its latent.npy was encoded with VAE tiny-vae@"),
                       (config(vae, text, "data.text.max_length=10"), "max_length=12"),
                       (config(vae, text, "data.encoders.text_encoder_kind=t5"), "kind=sentence")):
        with pytest.raises(ConfigError) as info:
            preflight(cfg, world_size=1)
        assert isinstance(info.value, EncoderMismatch) and words in str(info.value), str(info.value)
        assert f"{out}/shard-000000.tar" in str(info.value)
    preflight(config(other_vae, other_text, "data.mode=decode"), world_size=1)  # decode mode: not read


def test_shards_without_a_record_keep_the_shape_checks(shards):
    """Foreign shards (no latents record) are not checked against the encoders; the masked-mean
    stand-in for a missing pooled.npy is the t5 kind's pooled vector, refused for other kinds and
    for recorded samples (curation always writes pooled.npy)."""
    import json

    from vchitect.data.decode import BadSample
    from vchitect.data.samples import SampleDecoder

    out, (vae, text), (_, other_text) = shards
    key, m = sorted(members(out).items())[0]
    foreign = dict(m, json=json.dumps({k: v for k, v in json.loads(m["json"]).items() if k != "latents"}).encode())
    del foreign["pooled.npy"]
    kind_t5 = {"vae_path": vae, "text_encoder_path": other_text, "text_encoder_kind": "t5", "dtype": "float32"}
    sample = SampleDecoder(train_cfg(out, vae, other_text, encoders=kind_t5))(key, foreign, 0)
    text_, mask = sample.arrays["text"], sample.arrays["text_mask"]
    np.testing.assert_allclose(sample.arrays["pooled"], text_[mask].mean(0), atol=1e-6)
    with pytest.raises(BadSample, match="masked-mean stand-in needs P == D and text_encoder_kind t5"):
        SampleDecoder(train_cfg(out, vae, other_text))(key, foreign, 0)  # sentence kind
    recorded = {k: v for k, v in m.items() if k != "pooled.npy"}
    with pytest.raises(BadSample, match="no pooled.npy"):
        SampleDecoder(train_cfg(out, vae, text, encoders={"text_encoder_kind": "t5"}))(key, recorded, 0)


def test_old_curation_keys_are_refused_naming_the_new_ones():
    base = ["input.path=x", "output.path=y"]
    for old, new in (("ray.latents_gpus=1", "ray.latents.gpus"), ("ray.latents_actors=2", "ray.latents.actors"),
                     ("ray.caption_gpus=1", "ray.caption.gpus"), ("ray.caption_actors=2", "ray.caption.actors"),
                     ("ray.model_actors=2", "ray.filters.actors"), ("latents.vae_path=v", "latents.encoders.vae_path"),
                     ("latents.text_encoder_path=t", "latents.encoders.text_encoder_path"),
                     ("latents.max_text_length=8", "latents.text.max_length"),
                     ("latents.dtype=float16", "latents.encoders.dtype")):
        with pytest.raises(ConfigError, match="renamed config key") as info:
            load_curate_config(None, base + [old])
        assert f"{old.split('=')[0]} → {new}" in str(info.value), str(info.value)
    with pytest.raises(ConfigError) as info:
        load_curate_config(None, base + ["ray.model_actor_cpus=0.3", "ray.batch_size=2"])
    for key in ("ray.filters.cpus, ray.caption.cpus and ray.latents.cpus",
                "ray.filters.batch_size, ray.caption.batch_size and ray.latents.batch_size"):
        assert key in str(info.value)
    cfg = load_curate_config(None, base + ["ray.latents.gpus=1", "ray.filters.cpus=0.3"])
    assert (cfg.ray.latents.gpus, cfg.ray.filters.cpus, cfg.ray.caption.cpus) == (1.0, 0.3, 0.5)
