"""vchitect.data loader on local shards written in the curation contract's format."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
import torch

from vchitect.config import ConfigError, from_dict, load_config
from vchitect.data import DataConfig, ShardLoader, build_loader
from vchitect.data.buckets import Bucket, batch_size, choose_bucket, latent_shape
from vchitect.data.stream import stream_units
from tests.helpers_data import make_clip, npy, sample, write_shard

LAND, PORT = (72, 48), (48, 72)  # (width, height) of the test clips
BUCKETS = [{"height": 32, "width": 48, "frames": 5}, {"height": 48, "width": 32, "frames": 5},
           {"height": 32, "width": 32, "frames": 1}]


def cfg_for(uri, **kw) -> DataConfig:
    base = {"sources": [{"uri": str(uri)}], "buckets": BUCKETS, "fps": 12.0, "token_budget": 48,
            "num_workers": 0, "latent_channels": 4, "text": {"max_length": 6, "dim": 8, "pooled_dim": 8},
            "retry_backoff": 0.01, "shard_retries": 1}
    base.update(kw)
    return from_dict(DataConfig, base)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def clips():
    return {LAND: make_clip(*LAND, 20), PORT: make_clip(*PORT, 20)}


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, clips):
    """4 shards × 6 samples; even samples landscape, odd portrait."""
    root = tmp_path_factory.mktemp("video")
    for s in range(4):
        write_shard(str(root / f"train-{s:06d}.tar"), [
            sample(f"vid{s}_{i:04d}", *(LAND if i % 2 == 0 else PORT), 20,
                   clip=clips[LAND if i % 2 == 0 else PORT]) for i in range(6)])
    return root


def precomputed_extra(key, lat_shape=(4, 2, 4, 6), L=6, D=8, rng=None):
    rng = rng or np.random.default_rng(abs(hash(key)) % 2**32)
    return {"latent.npy": npy(rng.standard_normal(lat_shape).astype(np.float16)),
            "text.npy": npy(rng.standard_normal((L, D)).astype(np.float16)),
            "text_mask.npy": npy(np.arange(L) < 4)}


# -- buckets ----------------------------------------------------------------------------------

def test_bucket_choice_by_aspect_and_duration():
    bs = [Bucket(32, 48, 17), Bucket(32, 48, 5), Bucket(48, 32, 5), Bucket(32, 32, 1), Bucket(32, 48, 1)]
    assert choose_bucket(bs, 720, 480, 10.0, 8, image=False) == Bucket(32, 48, 17)  # longest that fits
    assert choose_bucket(bs, 720, 480, 1.0, 8, image=False) == Bucket(32, 48, 5)    # too short for 17
    assert choose_bucket(bs, 480, 720, 10.0, 8, image=False) == Bucket(48, 32, 5)   # portrait
    assert choose_bucket(bs, 720, 480, 0.1, 8, image=False) is None                 # fits no video bucket
    assert choose_bucket(bs, 700, 500, None, 8, image=True) == Bucket(32, 48, 1)
    assert choose_bucket(bs, 500, 500, None, 8, image=True) == Bucket(32, 32, 1)
    # batch size from a token budget: 32×48×17 → 5 × 2 × 3 = 30 tokens
    assert latent_shape(Bucket(32, 48, 17), 16, 8, 4) == (16, 5, 4, 6)
    assert batch_size(Bucket(32, 48, 17), 100, 64, 8, 4, 2) == 3
    assert batch_size(Bucket(32, 32, 1), 100, 64, 8, 4, 2) == 25
    assert batch_size(Bucket(32, 32, 1), 100, 8, 8, 4, 2) == 8
    assert batch_size(Bucket(256, 256, 17), 1, 8, 8, 4, 2) == 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="data.sources is empty"):
        load_config(None, [], schema=DataConfig)
    with pytest.raises(ConfigError, match="not divisible"):
        load_config(None, ["sources=[{uri: x}]", "buckets=[{height: 30, width: 32, frames: 1}]"],
                    schema=DataConfig)
    with pytest.raises(ConfigError, match="mode"):
        load_config(None, ["sources=[{uri: x}]", "mode=fast"], schema=DataConfig)
    assert "hunter2" not in repr(load_config(None, ["sources=[{uri: x}]", "s3={secret: hunter2}"],
                                             schema=DataConfig))


def test_frames_sampled_at_target_fps():
    """Frame i of the test clip is grey level 8·i: sampling 24 fps → 12 fps takes every other frame."""
    from vchitect.data.decode import decode_video

    pix, b, frames = decode_video(make_clip(64, 48, 20, fps=24), lambda i: Bucket(32, 32, 5), 12.0,
                                  np.random.default_rng(0))
    levels = pix.astype(float).mean(axis=(0, 2, 3)) / 8
    assert pix.shape == (3, 5, 32, 32) and pix.dtype == np.uint8
    assert np.diff(frames).tolist() == [2, 2, 2, 2]  # the source frames it reports
    assert np.allclose(np.diff(levels), 2.0, atol=0.2), levels


@pytest.mark.parametrize("size,bucket", [((854, 480), (480, 832)),   # crop clear of the tail
                                         ((342, 256), (256, 336)),   # crop reaches the tail: rgb24
                                         ((96, 64), (64, 96))])      # nothing cropped
def test_planar_frames_match_rgb24(size, bucket):
    import av
    import io

    from vchitect.data.decode import _to_planar

    w, h = size
    with av.open(io.BytesIO(make_clip(w, h, 2, pattern="texture"))) as c:
        frame = next(c.decode(c.streams.video[0]))
        ref = frame.reformat(width=w, height=h, format="rgb24").to_ndarray()
    bh, bw = bucket
    out = np.zeros((3, bh, bw), np.uint8)
    _to_planar(frame, w, h, Bucket(bh, bw, 1), out)
    top, left = (h - bh) // 2, (w - bw) // 2
    assert np.array_equal(out, ref[top:top + bh, left:left + bw].transpose(2, 0, 1))


# -- decode mode: shapes, captions ------------------------------------------------------------

def test_decode_batches_have_bucket_shapes_and_captions_match_keys(video_dir):
    loader = build_loader(cfg_for(video_dir, mode="decode"))
    seen = set()
    for batch in take(loader, 6):
        H, W, F = batch["bucket"]
        B = len(batch["keys"])
        assert B == batch_size(Bucket(H, W, F), 48, 64, 8, 4, 2) == 4
        assert batch["pixels"].shape == (B, 3, F, H, W) and batch["pixels"].dtype == torch.uint8
        assert batch["captions"] == [f"caption of {k}" for k in batch["keys"]]
        for k in batch["keys"]:
            landscape = int(k.split("_")[1]) % 2 == 0
            assert (W > H) == landscape, (k, batch["bucket"])
        seen.update(batch["keys"])
    assert len(seen) == 24  # 6 batches × 4 = one epoch, no repeats


def test_precomputed_mode_reads_latents(tmp_path):
    samples = []
    for i in range(4):
        shape = (4, 2, 4, 6) if i % 2 == 0 else (4, 1, 4, 4)  # 32×48×5 video / 32×32 image latents
        samples.append(sample(f"pre_{i:04d}", 64, 48, 3, clip=b"not needed",
                              **precomputed_extra(f"pre_{i:04d}", shape)))
    write_shard(str(tmp_path / "s-000000.tar"), samples)
    loader = build_loader(cfg_for(tmp_path, mode="precomputed", token_budget=24))  # video B=2, image B=6
    batch = take(loader, 1)[0]
    assert batch["keys"] == ["pre_0000", "pre_0002"] and batch["bucket"] == (32, 48, 5)
    assert batch["latents"].shape == (2, 4, 2, 4, 6) and batch["latents"].dtype == torch.float32
    assert batch["text"].shape == (2, 6, 8) and batch["text_mask"].dtype == torch.bool
    assert batch["text_mask"].sum(1).tolist() == [4, 4]
    expect = torch.from_numpy(np.load(__import__("io").BytesIO(samples[0]["latent.npy"])).astype(np.float32))
    assert torch.equal(batch["latents"][0], expect)
    # pooled falls back to the masked mean of the hidden states when P == D and there is no pooled.npy
    text, mask = batch["text"][0], batch["text_mask"][0]
    assert torch.allclose(batch["pooled"][0], text[mask].mean(0), atol=1e-6)


# -- bad data ---------------------------------------------------------------------------------

def test_corrupt_shard_yields_good_samples_and_reports_exactly_the_bad_ones(tmp_path, clips, caplog):
    good = [sample(f"ok_{i:04d}", *LAND, 20, clip=clips[LAND]) for i in range(3)]
    good += [sample(f"lat_{i:04d}", *LAND, 20, clip=clips[LAND], **precomputed_extra(f"lat_{i}"))
             for i in range(2)]
    truncated = sample("bad_0000", *LAND, 20, clip=clips[LAND][: len(clips[LAND]) // 2])
    no_txt = sample("bad_0001", *LAND, 20, clip=clips[LAND])
    del no_txt["txt"]
    wrong_latent = sample("bad_0002", *LAND, 20, clip=clips[LAND],
                          **precomputed_extra("bad_0002", lat_shape=(4, 2, 5, 5)))
    order = [good[0], truncated, good[3], good[1], no_txt, wrong_latent, good[4], good[2]]
    write_shard(str(tmp_path / "c-000000.tar"), order)
    loader = build_loader(cfg_for(tmp_path, mode="auto", max_batch_size=1, shuffle_buffer=1))
    with caplog.at_level(logging.WARNING, logger="vchitect.data"):
        batches = take(loader, 5)
    keys = [b["keys"][0] for b in batches]
    assert sorted(keys) == sorted(s["__key__"] for s in good)
    kinds = {b["keys"][0]: ("latents" if "latents" in b else "pixels") for b in batches}
    assert {k for k, v in kinds.items() if v == "latents"} == {"lat_0000", "lat_0001"}
    m = loader.metrics()
    assert m["data/skipped"] == 3
    assert m["data/delivered_per_s"] > 0 and "data/samples_per_s" not in m
    assert (m["data/skipped/undecodable"], m["data/skipped/missing_member"],
            m["data/skipped/bad_latent"]) == (1, 1, 1)
    warned = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(warned) == 3
    for key in ("bad_0000", "bad_0001", "bad_0002"):
        assert sum(key in w and "c-000000.tar" in w for w in warned) == 1


def test_unreadable_shard_is_retried_then_skipped(tmp_path, clips, caplog):
    write_shard(str(tmp_path / "a-000000.tar"), [sample(f"a_{i:04d}", *LAND, 20, clip=clips[LAND])
                                                 for i in range(4)])
    good = (tmp_path / "a-000000.tar").read_bytes()
    (tmp_path / "a-000001.tar").write_bytes(good[: len(good) * 2 // 3])  # cut mid-member
    (tmp_path / "a-000002.tar").write_bytes(b"\x00garbage" * 100)
    loader = build_loader(cfg_for(tmp_path, mode="decode", max_batch_size=1, shard_retries=2))
    with caplog.at_level(logging.WARNING, logger="vchitect.data"):
        keys = [b["keys"][0] for b in take(loader, 10)]
    assert set(keys) >= {f"a_{i:04d}" for i in range(4)}
    assert loader.metrics()["data/shards_failed"] >= 2
    failed = loader.failed_shards()
    assert any(f.endswith("a-000001.tar") for f in failed) and any(f.endswith("a-000002.tar") for f in failed)
    retries = [r for r in caplog.records if "retry" in r.getMessage() and "a-000002.tar" in r.getMessage()]
    assert len(retries) >= 2


# -- distribution -----------------------------------------------------------------------------

@pytest.mark.parametrize("n_shards,G", [(7, 3), (3, 3), (2, 5), (1, 4), (10, 4)])
def test_stream_units_partition_every_epoch(n_shards, G):
    shards = [f"s{i}" for i in range(n_shards)]
    for epoch in range(3):
        covered = []
        for g in range(G):
            for url, stride, offset in stream_units(shards, 0, 0, epoch, g, G):
                covered += [(url, i) for i in range(20) if i % stride == offset]
        assert sorted(covered) == sorted((s, i) for s in shards for i in range(20))  # disjoint + complete
    orders = {tuple(u for g in range(G) for u, _, _ in stream_units(shards, 0, 0, e, g, G)) for e in range(4)}
    assert n_shards < 3 or len(orders) > 1  # reshuffled per epoch


def test_dp_ranks_and_workers_split_an_epoch(video_dir):
    """2 DP ranks × 2 workers: disjoint per rank, together exactly one epoch."""
    per_rank = []
    for r in range(2):
        loader = ShardLoader(cfg_for(video_dir, mode="decode", num_workers=2, max_batch_size=1), r, 2)
        per_rank.append([b["keys"][0] for b in take(loader, 6)])
    a, b = set(per_rank[0]), set(per_rank[1])
    assert len(a) == len(b) == 6 and not a & b
    assert len(a | b) == 12  # 24 samples per epoch; 12 taken so far, none twice
    again = ShardLoader(cfg_for(video_dir, mode="decode", num_workers=2, max_batch_size=1), 0, 2)
    assert [b["keys"][0] for b in take(again, 6)] == per_rank[0]  # deterministic


# -- resume -----------------------------------------------------------------------------------

def _same(b1, b2):
    assert b1["keys"] == b2["keys"] and b1["bucket"] == b2["bucket"]
    assert torch.equal(b1["pixels"], b2["pixels"])


@pytest.mark.parametrize("workers,K", [(0, 3), (2, 5)])
def test_resume_continues_exactly(video_dir, workers, K):
    """K batches, save, rebuild, load, M more == K+M batches of one uninterrupted loader."""
    cfg = cfg_for(video_dir, mode="decode", num_workers=workers, token_budget=24, image_ratio=0.25)
    M = 6
    ref = take(build_loader(cfg), K + M)
    first = build_loader(cfg)
    part = take(first, K)
    state = first.state_dict()
    assert any(st["pending"] for st in state["streams"].values())  # buffers were non-empty
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    rest = take(resumed, M)
    for x, y in zip(part + rest, ref):
        _same(x, y)
    keys = [k for b in ref for k in b["keys"]]
    epoch0 = [k for b in ref for k, e in zip(b["keys"], b["epochs"]) if e == 0]
    assert len(set(epoch0)) == len(epoch0) and len(set(keys)) > 12


def test_resume_on_a_different_world_restarts_the_epoch(video_dir):
    cfg = cfg_for(video_dir, mode="decode", max_batch_size=1)
    loader = build_loader(cfg)
    take(loader, 30)  # into epoch 1
    state = loader.state_dict()
    with pytest.raises(ValueError, match="belongs to DP rank 0"):
        ShardLoader(cfg, 1, 2).load_state_dict({**state, "dp_rank": 0, "dp_size": 2})
    other = ShardLoader(cfg, 1, 2)
    other.load_state_dict(state)
    b = take(other, 1)[0]
    assert b["epoch"] == 1
    assert other.state_dict()["streams"]["0"]["sources"][0]["epoch"] == 1


# -- joint image-video, mixing ----------------------------------------------------------------

def test_image_ratio_is_honoured(tmp_path, clips):
    write_shard(str(tmp_path / "v-000000.tar"), [sample(f"v_{i:04d}", *LAND, 20, clip=clips[LAND])
                                                 for i in range(300)])
    cfg = cfg_for(tmp_path, mode="decode", image_ratio=0.3, token_budget=12)  # video B=1, image B=3
    n_img = n = 0
    for b in take(build_loader(cfg), 240):
        H, W, F = b["bucket"]
        assert b["pixels"].shape[2] == F
        n += len(b["keys"])
        n_img += len(b["keys"]) if F == 1 else 0
        if n >= 280:
            break
    assert abs(n_img / n - 0.3) < 0.08, (n_img, n)


def test_image_shards_and_source_weights(tmp_path, clips):
    from PIL import Image
    import io

    buf = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(buf, format="PNG")
    write_shard(str(tmp_path / "img" / "i-000000.tar"),
                [{"__key__": f"img_{i:04d}", "png": buf.getvalue(), "txt": b"an image"} for i in range(50)])
    write_shard(str(tmp_path / "vid" / "v-000000.tar"),
                [sample(f"v_{i:04d}", *LAND, 20, clip=clips[LAND]) for i in range(50)])
    cfg = cfg_for(tmp_path, mode="decode", max_batch_size=1,
                  sources=[{"uri": str(tmp_path / "img"), "weight": 3.0},
                           {"uri": str(tmp_path / "vid"), "weight": 1.0}])
    batches = take(build_loader(cfg), 60)
    imgs = [b for b in batches if b["keys"][0].startswith("img")]
    assert all(b["bucket"] == (32, 32, 1) and b["pixels"].shape == (1, 3, 1, 32, 32) for b in imgs)
    assert abs(len(imgs) / 60 - 0.75) < 0.17


def test_brace_expansion():
    from vchitect.data.sources import _expand_braces

    assert _expand_braces("s-{000008..000011}.tar") == [f"s-{i:06d}.tar" for i in range(8, 12)]
    assert _expand_braces("{a,b}/x-{1..2}.tar") == ["a/x-1.tar", "a/x-2.tar", "b/x-1.tar", "b/x-2.tar"]
    assert _expand_braces("plain.tar") == ["plain.tar"]


def test_brace_and_glob_sources(video_dir):
    brace = cfg_for(str(video_dir / "train-{000000..000001}.tar"), mode="decode")
    glob = cfg_for(str(video_dir / "train-00000[01].tar"), mode="decode")
    assert ShardLoader(brace).shards == ShardLoader(glob).shards and len(ShardLoader(glob).shards[0]) == 2
    with pytest.raises(ConfigError, match=r"data.sources\[0\].uri=.*nothing-\*.tar.*matches no \*.tar file"):
        ShardLoader(cfg_for(os.path.join(str(video_dir), "nothing-*.tar")))
    with pytest.raises(ConfigError, match="none of the files it names exists"):
        ShardLoader(cfg_for(str(video_dir / "other-{000000..000001}.tar")))
    with pytest.raises(ConfigError, match="the folder holds no \\*.tar shards"):
        ShardLoader(cfg_for(video_dir.parent))


# -- synthetic --------------------------------------------------------------------------------

def test_synthetic_loader_shapes_and_resume():
    cfg = load_config(None, ["source=synthetic", "latent_channels=4", "text={max_length: 6, dim: 8, "
                             "pooled_dim: 5}", "token_budget=48", "image_ratio=0.5",
                             "buckets=[{height: 32, width: 48, frames: 5}, "
                             "{height: 32, width: 32, frames: 1}]"],
                      schema=DataConfig)
    a = build_loader(cfg, 0, 2)
    batches = take(a, 4)
    state = a.state_dict()
    for b in batches:
        H, W, F = b["bucket"]
        B = len(b["keys"])
        assert b["latents"].shape == (B,) + latent_shape(Bucket(H, W, F), 4, 8, 4)
        assert b["text"].shape == (B, 6, 8) and b["text_mask"].shape == (B, 6) and b["pooled"].shape == (B, 5)
    c = build_loader(cfg, 0, 2)
    c.load_state_dict(state)
    assert torch.equal(next(iter(c))["latents"], take(build_loader(cfg, 0, 2), 5)[4]["latents"])
    assert not torch.equal(take(build_loader(cfg, 1, 2), 1)[0]["text"], batches[0]["text"])


def test_sample_level_rejections(clips):
    from vchitect.data.decode import BadSample
    from vchitect.data.samples import SampleDecoder

    dec = SampleDecoder(cfg_for("unused", mode="auto"))
    ok = sample("k_0000", *LAND, 20, clip=clips[LAND])
    assert dec("k_0000", ok, 0).bucket == Bucket(32, 48, 5)
    cases = {"bad_caption": {**ok, "txt": b"\xff\xfe\x00binary"},
             "missing_member": {k: v for k, v in ok.items() if k != "mp4"},
             "no_bucket": {**ok, "mp4": make_clip(*LAND, 3)},  # 3 frames at 24 fps: too short for 5 at 12
             "bad_text": {**ok, **precomputed_extra("k", L=6, D=5)}}
    for reason, members in cases.items():
        with pytest.raises(BadSample) as err:
            dec("k_0000", members, 0)
        assert err.value.reason == reason


def test_shuffle_buffer_mixes_within_a_shard_never_across_epochs(tmp_path, clips):
    write_shard(str(tmp_path / "o-000000.tar"), [sample(f"o_{i:04d}", *LAND, 20, clip=clips[LAND])
                                                 for i in range(12)])
    tar_order = [f"o_{i:04d}" for i in range(12)]
    plain = [b["keys"][0] for b in take(build_loader(cfg_for(tmp_path, mode="decode", max_batch_size=1,
                                                             shuffle_buffer=1)), 12)]
    assert plain == tar_order
    batches = take(build_loader(cfg_for(tmp_path, mode="decode", max_batch_size=1, shuffle_buffer=8)), 24)
    keys = [b["keys"][0] for b in batches]
    assert keys[:12] != tar_order and sorted(keys[:12]) == tar_order  # epoch 0: a permutation
    assert sorted(keys[12:]) == tar_order and keys[12:] != keys[:12]   # epoch 1: another one
    assert [b["epoch"] for b in batches] == [0] * 12 + [1] * 12


def test_precomputed_video_serves_as_image_through_its_first_latent_frame():
    from vchitect.data.samples import SampleDecoder

    members = {"txt": b"a clip", **precomputed_extra("v", lat_shape=(4, 2, 4, 4))}  # 32×32×5 latent
    buckets = [{"height": 32, "width": 32, "frames": 5}, {"height": 32, "width": 32, "frames": 1}]
    video = SampleDecoder(cfg_for("x", mode="precomputed", buckets=buckets))("v", members, 0)
    image = SampleDecoder(cfg_for("x", mode="precomputed", buckets=buckets, image_ratio=1.0))("v", members, 0)
    assert video.bucket == Bucket(32, 32, 5) and video.arrays["latents"].shape == (4, 2, 4, 4)
    assert image.bucket == Bucket(32, 32, 1) and image.arrays["latents"].shape == (4, 1, 4, 4)
    assert np.array_equal(image.arrays["latents"][:, 0], video.arrays["latents"][:, 0])


def test_synthetic_loader_counters_survive_a_state_round_trip():
    from vchitect.data.config import DataConfig
    from vchitect.data.synthetic import SyntheticLoader

    cfg = DataConfig(source="synthetic")
    a = SyntheticLoader(cfg)
    it = iter(a)
    for _ in range(3):
        next(it)
    b = SyntheticLoader(cfg)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert b.metrics()["data/samples"] == a.metrics()["data/samples"] > 0
    assert b.metrics()["data/batches"] == 3
    # the loader's rate has its own name, unlike the trainer's samples_per_s (the step window's throughput)
    assert a.metrics()["data/delivered_per_s"] > 0 and "data/samples_per_s" not in a.metrics()
    assert torch.equal(next(iter(b))["latents"], next(it)["latents"])
