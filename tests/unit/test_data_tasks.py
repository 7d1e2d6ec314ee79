"""Many-for-Many tasks (vchitect.data.tasks): the condition builders, the per-sample task draw in the
loader (deterministic, resumable, weighted), the `#task:` caption suffix, encode_batch's float
condition and the config checks of data.tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vchitect.config import ConfigError, from_dict
from vchitect.data import DataConfig, build_loader
from vchitect.data.config import TaskOptions
from vchitect.data.encode import encode_batch
from vchitect.data.samples import SampleDecoder, collate
from vchitect.data.tasks import TASKS, draw_task, inpaint_holes
from tests.helpers_data import make_clip, sample, write_shard

F, H, W = 9, 16, 24
OPTS = TaskOptions()


@pytest.fixture(scope="module")
def clip():  # distinct values per frame, position and channel
    return np.random.default_rng(7).integers(0, 256, (3, F, H, W), dtype=np.uint8)


def build(name, pixels, seed=0, side=None, **opts):
    cond, mask = TASKS[name].build(pixels, np.random.default_rng(seed), TaskOptions(**opts), side)
    assert cond.dtype == np.uint8 and mask.dtype == np.uint8
    assert cond.shape == (3,) + pixels.shape[1:] and mask.shape == (1,) + pixels.shape[1:]
    assert set(np.unique(mask)) <= {0, 1}
    return cond, mask


def known_frames(mask):
    per_frame = mask[0].reshape(mask.shape[1], -1)
    assert ((per_frame == 0) | (per_frame == 1)).all()
    whole = per_frame.all(1)
    assert (whole | (per_frame == 0).all(1)).all()  # frames are wholly known or wholly unknown
    return list(np.flatnonzero(whole))


def check_known_equal(cond, mask, pixels):
    m = mask.astype(bool)[0]
    assert (cond[:, m] == pixels[:, m]).all() and (cond[:, ~m] == 0).all()


# -- builders ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["t2v", "t2i"])
def test_text_only_tasks_know_nothing(clip, name):
    px = clip[:, :1] if name == "t2i" else clip
    cond, mask = build(name, px)
    assert not cond.any() and not mask.any()


@pytest.mark.parametrize("name,k,frames", [
    ("i2v", 8, [0]), ("vexd", 3, [0, 1, 2]), ("vexd", 20, list(range(F - 1))), ("itrans", 8, [0, F - 1]),
    ("vtrans", 2, [0, 1, F - 2, F - 1]), ("vtrans", 20, [0, 1, 2, 3, 5, 6, 7, 8])])
def test_frame_tasks_know_exactly_their_frames(clip, name, k, frames):
    cond, mask = build(name, clip, context_frames=k)
    assert known_frames(mask) == frames  # at most F-1 known: something is left to generate
    check_known_equal(cond, mask, clip)


@pytest.mark.parametrize("name,frames", [("vinp", F), ("iinp", 1)])
def test_inpainting_holes_are_unknown_and_the_rest_is_the_clip(clip, name, frames):
    px = clip[:, :frames]
    for seed in range(6):
        cond, mask = build(name, px, seed)
        assert 0 < mask.mean() < 1
        check_known_equal(cond, mask, px)


def test_inpainting_holes_static_or_moving():
    rng = np.random.default_rng(3)
    static = inpaint_holes(rng, F, H, W, OPTS, moving=False)
    assert (static == static[:1]).all() and static.any()
    moved = [inpaint_holes(np.random.default_rng(s), F, 32, 32, OPTS, moving=True) for s in range(5)]
    assert any((m[0] != m[-1]).any() for m in moved)


@pytest.mark.parametrize("name,frames", [("voutp", F), ("ioutp", 1)])
def test_outpainting_knows_a_centre_window_and_nothing_of_the_border(clip, name, frames):
    px = clip[:, :frames]
    for seed in range(6):
        cond, mask = build(name, px, seed, border_min=0.1, border_max=0.3)
        m = mask[0].astype(bool)
        assert (m == m[:1]).all()
        rows, cols = np.flatnonzero(m[0].any(1)), np.flatnonzero(m[0].any(0))
        t, b, l, r = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        assert m[0, t:b, l:r].all() and m[0].sum() == (b - t) * (r - l)  # one rectangle
        assert (t, b, l, r) != (0, H, 0, W)  # some border is unknown
        check_known_equal(cond, mask, px)


def test_super_resolution_is_a_blurred_copy_all_known():
    yy, xx = np.mgrid[0:H, 0:W]
    checker = (((yy + xx) % 2) * 255).astype(np.uint8)
    px = np.broadcast_to(checker, (3, F, H, W)).copy()
    cond, mask = build("vsr", px, sr_factor=4)
    assert mask.all()
    assert np.abs(cond.astype(int) - 127.5).max() < 20  # the 1-pixel checker is gone
    flat = np.full((3, 1, H, W), 90, np.uint8)
    assert (build("isr", flat)[0] == 90).all()  # flat stays flat


def test_colourisation_is_grey_all_known(clip):
    for name, px in (("vcolor", clip), ("icolor", clip[:, :1])):
        cond, mask = build(name, px)
        assert mask.all() and (cond[0] == cond[1]).all() and (cond[1] == cond[2]).all()
        y = 0.299 * px[0].astype(float) + 0.587 * px[1] + 0.114 * px[2]
        assert np.abs(cond[0] - y).max() <= 0.5 + 1e-6


def test_vedit_condition_is_the_source_video(clip):
    src = 255 - clip
    cond, mask = build("vedit", clip, side=src)
    assert mask.all() and (cond == src).all()
    with pytest.raises(ValueError, match="side video"):
        build("vedit", clip)


def test_draw_task_respects_validity_and_weights():
    w = {"t2v": 0.5, "i2v": 0.3, "vedit": 0.2, "t2i": 1.0}
    rng = np.random.default_rng(0)
    with_src = [draw_task(rng, w, F, lambda s: True).name for _ in range(4000)]
    shares = {n: with_src.count(n) / len(with_src) for n in ("t2v", "i2v", "vedit")}
    assert "t2i" not in with_src
    for n, p in (("t2v", 0.5), ("i2v", 0.3), ("vedit", 0.2)):
        assert abs(shares[n] - p) < 0.04, shares
    no_src = {draw_task(rng, w, F, lambda s: False).name for _ in range(500)}
    assert no_src == {"t2v", "i2v"}
    assert {draw_task(rng, w, 1, lambda s: True).name for _ in range(50)} == {"t2i"}
    assert draw_task(rng, {"vedit": 1.0}, F, lambda s: False) is None


# -- the loader ---------------------------------------------------------------------------------

BUCKETS = [{"height": 32, "width": 48, "frames": 5}, {"height": 32, "width": 48, "frames": 1}]
TASK_WEIGHTS = {"t2v": 1.0, "i2v": 1.0, "vinp": 1.0, "vedit": 1.0, "t2i": 1.0, "icolor": 1.0}


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """3 shards × 6 samples of 72×48 clips; the even samples carry a src.mp4 (a textured clip)."""
    root = tmp_path_factory.mktemp("tasks")
    target, src = make_clip(72, 48, 20), make_clip(72, 48, 20, pattern="texture")
    for s in range(3):
        write_shard(str(root / f"train-{s:06d}.tar"), [
            sample(f"v{s}_{i:04d}", 72, 48, 20, clip=target, **({"src.mp4": src} if i % 2 == 0 else {}))
            for i in range(6)])
    return root


def cfg_for(uri, **kw) -> DataConfig:
    base = {"sources": [{"uri": str(uri)}], "buckets": BUCKETS, "fps": 12.0, "token_budget": 48,
            "num_workers": 0, "latent_channels": 4, "mode": "decode", "image_ratio": 0.3,
            "text": {"max_length": 6, "dim": 8, "pooled_dim": 8}, "tasks": TASK_WEIGHTS}
    base.update(kw)
    return from_dict(DataConfig, base)


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_batches_carry_condition_mask_tasks_and_suffix(task_dir):
    batches = take(build_loader(cfg_for(task_dir, token_budget=24)), 12)
    seen = set()
    for b in batches:
        B, _, Fr, Hh, Ww = b["pixels"].shape
        assert b["condition"].shape == (B, 3, Fr, Hh, Ww) and b["condition"].dtype == torch.uint8
        assert b["condition_mask"].shape == (B, 1, Fr, Hh, Ww)
        assert len(b["tasks"]) == B
        for i, (task, cap, key) in enumerate(zip(b["tasks"], b["captions"], b["keys"])):
            seen.add(task)
            assert cap == f"caption of {key} #task: {TASKS[task].prompt}"
            assert TASKS[task].image == (Fr == 1)
            m = b["condition_mask"][i]
            if task in ("t2v", "t2i"):
                assert not m.any() and not b["condition"][i].any()
            if task == "i2v":
                assert m[0, 0].all() and not m[0, 1:].any()
                assert torch.equal(b["condition"][i][:, 0], b["pixels"][i][:, 0])
            if task == "vedit":
                assert int(key[-1]) % 2 == 0  # only samples with src.mp4
                assert m.all() and not torch.equal(b["condition"][i], b["pixels"][i])
    assert {"t2v", "i2v", "vinp", "vedit", "t2i", "icolor"} <= seen


def test_without_tasks_nothing_changes(task_dir):
    plain = take(build_loader(cfg_for(task_dir, tasks={})), 4)
    tasked = take(build_loader(cfg_for(task_dir)), 4)
    for p, t in zip(plain, tasked):
        assert not {"condition", "condition_mask", "tasks"} & set(p)
        assert all("#task:" not in c for c in p["captions"])
        assert p["keys"] == t["keys"] and torch.equal(p["pixels"], t["pixels"])  # same frames


@pytest.mark.parametrize("workers", [0, 2])
def test_task_draws_are_deterministic_and_resume_exactly(task_dir, workers):
    cfg = cfg_for(task_dir, token_budget=24, num_workers=workers)
    K, M = 4, 6
    ref = take(build_loader(cfg), K + M)
    again = take(build_loader(cfg), K + M)
    first = build_loader(cfg)
    part = take(first, K)
    state = first.state_dict()
    assert any(st["pending"] for st in state["streams"].values())
    resumed = build_loader(cfg)
    resumed.load_state_dict(state)
    rest = take(resumed, M)
    for x, y, z in zip(part + rest, ref, again):
        for b in (x, z):
            assert b["keys"] == y["keys"] and b["tasks"] == y["tasks"] and b["captions"] == y["captions"]
            assert torch.equal(b["condition"], y["condition"]) and torch.equal(b["condition_mask"],
                                                                               y["condition_mask"])
    other = take(build_loader(cfg_for(task_dir, token_budget=24, num_workers=workers, seed=1)), K + M)
    assert [t for b in other for t in b["tasks"]] != [t for b in ref for t in b["tasks"]]


def test_vedit_only_skips_samples_without_src_and_counts_them(task_dir):
    loader = build_loader(cfg_for(task_dir, tasks={"vedit": 1.0}, image_ratio=0.0))
    batches = take(loader, 3)
    assert all(t == "vedit" for b in batches for t in b["tasks"])
    assert all(int(k[-1]) % 2 == 0 for b in batches for k in b["keys"])
    assert loader.metrics()["data/skipped/no_task"] > 0


def test_a_source_with_its_own_tasks_draws_only_those(task_dir, tmp_path):
    """data.sources[i].tasks overrides data.tasks for that source's samples (removal pairs: vedit only)."""
    other = tmp_path / "other"
    other.mkdir()
    write_shard(str(other / "train-000000.tar"), [sample(f"o{i:04d}", 72, 48, 20, clip=make_clip(72, 48, 20))
                                                  for i in range(6)])
    cfg = cfg_for(task_dir, image_ratio=0.0, tasks={"t2v": 1.0, "i2v": 1.0},
                  sources=[{"uri": str(task_dir), "tasks": {"vedit": 1.0}}, {"uri": str(other)}])
    by_source: dict[str, set] = {"v": set(), "o": set()}
    for b in take(build_loader(cfg), 16):
        for key, task in zip(b["keys"], b["tasks"]):
            by_source[key[0]].add(task)
    assert by_source["v"] == {"vedit"} and by_source["o"] == {"t2v", "i2v"}


@pytest.mark.parametrize("sources,tasks,match", [
    ([{"uri": "x", "tasks": {"vedit": 1.0}}], {}, r"data\.sources\[0\]\.tasks is set but data\.tasks is empty"),
    ([{"uri": "x"}, {"uri": "y", "tasks": {"rm": 1.0}}], {"t2v": 1.0}, r"data\.sources\[1\]\.tasks\.rm: unknown"),
    ([{"uri": "x", "tasks": {"vedit": 0}}], {"t2v": 1.0}, r"data\.sources\[0\]\.tasks: the weights sum to 0"),
])
def test_per_source_task_errors_name_the_source(task_dir, sources, tasks, match):
    with pytest.raises(ConfigError, match=match):
        cfg_for(task_dir, sources=sources, tasks=tasks).validate()


def test_a_sample_without_the_depth_member_draws_another_task_or_is_skipped(task_dir):
    from vchitect.data.decode import BadSample

    members = _members(task_dir)  # no depth.mp4
    with pytest.raises(BadSample, match="depth depth.mp4") as err:
        SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={"depth": 1.0}))("k0", members, 0)
    assert err.value.reason == "no_task"
    mixed = SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={"depth": 1.0, "t2v": 1.0}))
    assert {mixed("k0", members, e).task for e in range(8)} == {"t2v"}
    with pytest.raises(BadSample) as err:  # there, but not a video
        SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={"depth": 1.0}))("k0", {**members, "depth.mp4": b"x"}, 0)
    assert err.value.reason == "bad_depth" and "depth.mp4" in str(err.value)


def test_collate_mixes_tasks_in_one_batch(task_dir):
    members = _members(task_dir)
    dec = SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={"t2v": 1.0, "vedit": 1.0}))
    samples, epoch = {}, 0
    while len(samples) < 2:
        s = dec("k0", members, epoch)
        samples.setdefault(s.task, s)
        epoch += 1
    batch = collate(list(samples.values()))
    assert sorted(batch["tasks"]) == ["t2v", "vedit"] and batch["condition"].shape[0] == 2


# -- encode_batch ---------------------------------------------------------------------------------

class _Text:
    def encode(self, captions):
        B = len(captions)
        return torch.zeros(B, 6, 8), torch.ones(B, 6, dtype=torch.bool), torch.zeros(B, 8)


def test_encode_batch_float_condition(clip):
    cond, mask = build("vinp", clip, 1)
    batch = {"pixels": torch.from_numpy(clip)[None], "captions": ["x"],
             "condition": torch.from_numpy(cond)[None], "condition_mask": torch.from_numpy(mask)[None]}
    out = encode_batch(batch, vae=type("V", (), {"encode": staticmethod(lambda x: x)})(), text_encoder=_Text())
    c = out["condition"]
    assert "condition_mask" not in out and c.dtype == torch.float32 and c.shape == (1, 4, F, H, W)
    m = torch.from_numpy(mask).bool()[None]
    assert torch.equal(c[:, 3:], m.float())
    assert (c[:, :3][~m.expand(1, 3, F, H, W)] == 0).all()
    known = torch.from_numpy(clip).float()[None] / 127.5 - 1
    assert torch.allclose(c[:, :3][m.expand(1, 3, F, H, W)], known[m.expand(1, 3, F, H, W)])
    assert c[:, :3].min() >= -1 and c[:, :3].max() <= 1


# -- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    ({"tasks": {"i2vv": 1.0}}, r"data\.tasks\.i2vv: unknown task; valid names: t2v, i2v"),
    ({"tasks": {"i2v": -1}}, r"data\.tasks\.i2v=-1"),
    ({"tasks": {"t2v": 0.0}}, "sum to 0"),
    ({"mode": "precomputed"}, "data.mode: decode"),
    ({"mode": "auto"}, "data.mode: decode"),
    ({"buckets": [BUCKETS[0]], "image_ratio": 0.0}, r"data\.tasks\.t2i is an image task"),
    ({"buckets": [BUCKETS[1]], "image_ratio": 0.0}, r"data\.tasks\.t2v is a video task"),
    ({"tasks": {"depth": 1.0}, "task_options": {"depth_member": None}}, "depth_member"),
    ({"task_options": {"hole_min": 0.6}}, "hole_min"),
])
def test_task_config_errors_name_the_key(task_dir, kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg_for(task_dir, **kw).validate()


def test_depth_with_a_member_validates(task_dir):
    cfg_for(task_dir, tasks={"depth": 1.0}).validate()  # depth.mp4 by default
    cfg_for(task_dir, tasks={"depth": 1.0}, task_options={"depth_member": "z.mp4"}).validate()


def _members(task_dir, index=0):
    import webdataset as wds

    ds = iter(wds.WebDataset(str(task_dir / "train-000000.tar"), shardshuffle=False))
    for _ in range(index + 1):
        members = next(ds)
    return {k: v for k, v in members.items() if not k.startswith("__")}


def test_decoder_draws_tasks_by_their_weights(task_dir):
    members = _members(task_dir)  # has src.mp4
    dec = SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={"t2v": 3.0, "i2v": 1.0, "t2i": 5.0}))
    drawn = [dec("k0", members, epoch).task for epoch in range(240)]
    assert set(drawn) == {"t2v", "i2v"}  # t2i is an image task: never for a video sample
    assert abs(drawn.count("i2v") / len(drawn) - 0.25) < 0.08


def test_depth_task_reads_its_member_at_the_clip_frames(task_dir):
    from vchitect.data.tasks import grey

    members = _members(task_dir)
    members["depth.mp4"] = members.pop("src.mp4")
    dec = SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={"depth": 1.0},
                                task_options={"depth_member": "depth.mp4"}))
    s = dec("k0", members, 0)
    plain = SampleDecoder(cfg_for(task_dir, image_ratio=0.0, tasks={}))
    depth = plain("k0", {**members, "mp4": members["depth.mp4"]}, 0).arrays["pixels"]  # same frames
    assert s.task == "depth" and s.arrays["condition_mask"].all()
    assert np.array_equal(s.arrays["condition"], grey(depth))
    assert s.caption.endswith(" #task: depth-to-video")
