"""End-to-end curation on Ray (2 CPUs): synthetic corpus, S3 output, bad inputs, kill-and-resume."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import yaml

from tests.helpers_curate import crafted_pickle

from data_pipeline import synthetic
from data_pipeline.config import load_curate_config
from tests.helpers_models import save_tiny_blip, save_tiny_latent_models, write_bad_inputs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "curate", "synthetic.yaml")


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 2 CPUs, like the smallest machine we support."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    truth = synthetic.generate_corpus(root, n=3, seed=1)
    return root, truth


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return save_tiny_blip(str(tmp_path_factory.mktemp("models") / "tiny-blip"))


def _overrides(root, out):
    # Every clip of the synthetic manifest has a source caption; the VLM runs in the S3 and
    # bad-input tests, whose inputs have none.
    return [f"input.path={root}/manifest.jsonl", f"output.path={out}"]


@pytest.fixture(scope="module")
def curated(ray_cluster, corpus, tmp_path_factory):
    from data_pipeline.pipeline import run

    root, truth = corpus
    out = str(tmp_path_factory.mktemp("curated") / "out")
    cfg = load_curate_config(CONFIG, _overrides(root, out))
    t0 = time.time()
    stats = run(cfg, progress=False)
    return {"out": out, "stats": stats, "truth": truth, "root": root, "seconds": time.time() - t0}


def _rejected(out):
    with open(os.path.join(out, "rejected.jsonl")) as f:
        return [json.loads(line) for line in f]


def _samples(out):
    """key → {ext: bytes} over every shard in index order."""
    index = json.load(open(os.path.join(out, "index.json")))
    samples = {}
    for shard in index["shards"]:
        with tarfile.open(os.path.join(out, shard["name"])) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def _same_outputs(out, ref) -> None:
    """Shards, index.json and rejected.jsonl byte for byte as in ``ref``; nothing else left over."""
    names = sorted(n for n in os.listdir(ref) if n.endswith(".tar")) + ["index.json", "rejected.jsonl"]
    assert sorted(n for n in os.listdir(out) if n.endswith(".tar")) == names[:-2]
    for n in names:
        assert (out / n).read_bytes() == open(os.path.join(ref, n), "rb").read(), n
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]


def _truth_shot(truth, uri, start, end):
    name = os.path.basename(uri).replace("_copy", "")
    shots = [s for s in truth["shots"] if s["file"] == name]
    return max(shots, key=lambda s: min(end, s["end"]) - max(start, s["start"]))


# ----------------------------------------------------------------------------- synthetic corpus


def test_expected_clips_are_kept(curated):
    out, truth, stats = curated["out"], curated["truth"], curated["stats"]
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    samples = _samples(out)
    assert len(samples) == truth["expected_clips"] == stats["counts"]["clips_written"] == 7
    index = json.load(open(os.path.join(out, "index.json")))
    assert [s["name"] for s in index["shards"]] == [f"shard-{i:06d}.tar" for i in range(len(index["shards"]))]
    assert sum(s["nsamples"] for s in index["shards"]) == 7
    for key, members in samples.items():
        assert set(members) == {"mp4", "json", "txt"}
        assert all(ch.isalnum() or ch in "_-" for ch in key)


def test_each_planted_defect_is_rejected_by_the_right_filter(curated):
    out, truth = curated["out"], curated["truth"]
    rejected = _rejected(out)
    got = {}
    for r in rejected:
        name = os.path.basename(r["uri"])
        if r["clip"] is None:
            got[(name, None)] = f"{r['stage']}.{r['reason']}"
        else:
            shot = _truth_shot(truth, r["uri"], r["start"], r["end"])
            got[(name, shot["shot"])] = f"{r['stage']}.{r['reason']}"
    shots = {s["shot"]: s["expected"] for s in truth["shots"] if s["file"] == "defects.mp4"}
    assert got[("defects.mp4", [k for k, v in shots.items() if v == "motion"][0])] == "filter.motion"
    assert got[("defects.mp4", [k for k, v in shots.items() if v == "blur"][0])] == "filter.blur"
    assert got[("defects.mp4", [k for k, v in shots.items() if v == "ocr"][0])] == "filter.ocr"
    n_shots = sum(1 for s in truth["shots"] if s["file"] == "video_0000.mp4")
    for i in range(n_shots):
        assert got[("video_0000_copy.mp4", i)] == "dedup.duplicate"
    for name in ("corrupt_truncated.mp4", "corrupt_empty.mp4", "corrupt_text.mp4"):
        assert got[(name, None)].startswith("probe."), name
    # nothing else was rejected: every clean shot survived
    assert len(rejected) == 3 + n_shots + 3
    stats = curated["stats"]
    assert stats["rejected_by_reason"] == {"dedup.duplicate": n_shots, "filter.blur": 1, "filter.motion": 1,
                                           "filter.ocr": 1, "probe.empty_file": 1, "probe.not_a_video": 2}


def test_captions_match_the_shapes(curated):
    out, truth = curated["out"], curated["truth"]
    for key, m in _samples(out).items():
        meta = json.loads(m["json"])
        shot = _truth_shot(truth, meta["source_uri"], meta["start"], meta["end"])
        assert m["txt"].decode() == shot["caption"] == meta["caption"]
        assert meta["caption_source"] == "source"
        assert shot["color"] in synthetic.COLORS and shot["shape"] in synthetic.SHAPES
        assert {"sharpness", "motion", "text_area", "nsfw"} <= set(meta["scores"])


def test_shards_read_back_with_webdataset_and_ray(curated):
    import av
    import ray
    import webdataset as wds

    out = curated["out"]
    index = json.load(open(os.path.join(out, "index.json")))
    urls = [os.path.join(out, s["name"]) for s in index["shards"]]
    n = 0
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        assert sample["__key__"] == meta["key"]
        with av.open(io.BytesIO(sample["mp4"])) as c:
            frames = sum(1 for _ in c.decode(video=0))
        assert frames == meta["num_frames"] >= 12
        assert sample["txt"].decode() == meta["caption"]
        n += 1
    assert n == 7
    ds = ray.data.read_webdataset(urls, decoder=None)
    rows = ds.take_all()
    assert len(rows) == 7
    assert {"mp4", "json", "txt"} <= set(rows[0])


def test_report_prints_counts_and_writes_histograms(curated, tmp_path, capsys):
    from data_pipeline.cli import main

    assert main(["report", curated["out"], "--plots", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "clips_written    7" in text and "motion" in text and "duplicate" in text
    pngs = sorted(os.listdir(tmp_path))
    assert "hist_motion.png" in pngs and "hist_sharpness.png" in pngs
    assert all(open(tmp_path / p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in pngs)


# ----------------------------------------------------------------------------- bad inputs, S3


def _s3fs(s3):
    import s3fs

    return s3fs.S3FileSystem(key=s3["key"], secret=s3["secret"],
                             client_kwargs={"endpoint_url": s3["endpoint_url"], "region_name": s3["region"]})


def _s3_overrides(s3):
    return [f"s3.endpoint_url={s3['endpoint_url']}", f"s3.region={s3['region']}"]


def _with_credentials(cfg, s3):
    cfg.s3.key, cfg.s3.secret = s3["key"], s3["secret"]
    return cfg


def test_bad_inputs_and_s3_output(ray_cluster, corpus, blip, s3_server, tmp_path):
    """Every bad input is accounted for and the job finishes; inputs from local disk and S3,
    shards to S3; clips without source captions are captioned by the (tiny) VLM actor pool, and
    latents come from a (tiny) VAE / text-encoder actor pool."""
    from data_pipeline.pipeline import run
    from data_pipeline.report import report

    root, truth = corpus
    fs = _s3fs(s3_server)
    fs.mkdir("curate-s3")
    fs.put_file(os.path.join(root, "videos", "video_0001.mp4"), "curate-s3/raw/remote video.mp4")
    bad = tmp_path / "bad inputs"
    expected = write_bad_inputs(str(bad), os.path.join(root, "videos", "video_0001.mp4"))
    good = bad / "good $(video) 'one'.mp4"
    good.write_bytes(open(os.path.join(root, "videos", "video_0002.mp4"), "rb").read())
    rows = [str(bad / n) for n in expected] + [str(bad / "no such file.mp4"), "s3://curate-s3/missing.mp4",
                                                str(good), "s3://curate-s3/raw/remote video.mp4"]
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["uri"])
        w.writerows([r] for r in rows)
    out = "s3://curate-s3/shards"
    vae, text = save_tiny_latent_models(str(tmp_path / "latent-models"))
    cfg = load_curate_config(CONFIG, [f"input.path={manifest}", f"output.path={out}",
                                      f"caption.vlm_path={blip}", "caption.max_new_tokens=6",
                                      # three actor pools (filters, VLM, latents) on 2 CPUs
                                      *[f"ray.{stage}.cpus=0.3" for stage in ("filters", "caption", "latents")],
                                      "clip.max_size=64", "latents.enabled=true",
                                      f"latents.encoders.vae_path={vae}", f"latents.encoders.text_encoder_path={text}",
                                      "latents.encoders.text_encoder_kind=sentence", "latents.encoders.dtype=float32",
                                      "latents.text={max_length: 8, dim: 16, pooled_dim: 16}",
                                      "latents.buckets=[{height: 32, width: 48, frames: 5}]", "latents.fps=6",
                                      *_s3_overrides(s3_server)])
    stats = run(_with_credentials(cfg, s3_server), progress=False)

    assert fs.exists("curate-s3/shards/_SUCCESS")
    rejected = [json.loads(line) for line in fs.cat_file("curate-s3/shards/rejected.jsonl").splitlines()]
    reasons = {os.path.basename(r["uri"]): r["reason"] for r in rejected if r["clip"] is None}
    assert reasons == dict(expected, **{"no such file.mp4": "unreadable", "missing.mp4": "missing"})
    assert stats["counts"]["inputs"] == len(rows)
    n_good = sum(1 for s in truth["shots"] if s["file"] in ("video_0001.mp4", "video_0002.mp4"))
    assert stats["counts"]["clips_written"] == n_good
    index = json.loads(fs.cat_file("curate-s3/shards/index.json"))
    sources = set()
    for shard in index["shards"]:
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"curate-s3/shards/{shard['name']}"))) as tar:
            exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
            assert exts == {"mp4", "json", "txt", "latent.npy", "text.npy", "text_mask.npy", "pooled.npy"}
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(m).read())
                    assert meta["caption_source"] == "vlm:tiny-blip"  # no source captions given
                    assert meta["latents"]["latent_shape"] == [4, 5, 16, 24]  # the 32×48×5 bucket
                    assert meta["latents"]["text_encoder"]["encoders"][0]["name"] == "tiny-text"
                    sources.add(meta["source_uri"])
    assert sources == {str(good), "s3://curate-s3/raw/remote video.mp4"}
    # the report reads an s3:// output too
    lines = []
    pngs = report(out, str(tmp_path / "plots"),
                  _s3_overrides(s3_server) + [f"s3.key={s3_server['key']}", f"s3.secret={s3_server['secret']}"],
                  echo=lines.append)
    assert any(line.split() == ["clips_written", str(n_good)] for line in lines)
    assert len(pngs) >= 2 and all(os.path.exists(p) for p in pngs)
    # credentials never reach the outputs
    for name in ("stats.json", "index.json", "rejected.jsonl"):
        assert s3_server["secret"].encode() not in fs.cat_file(f"curate-s3/shards/{name}")


def test_depth_stage_on_ray_writes_depth_members(ray_cluster, tmp_path):
    """depth.model_path on: an actor pool runs a tiny Depth-Anything over every clip; each sample gets a
    depth.mp4 with the clip's frames whose levels are the model's own normalised prediction."""
    import av
    import numpy as np

    from data_pipeline.pipeline import run
    from tests.helpers_models import depth_reference, save_tiny_depth_anything
    from vchitect.models.encoders import folder_identity

    root = str(tmp_path / "raw")
    truth = synthetic.generate_corpus(root, n=1, seed=5, defects=False)
    model = save_tiny_depth_anything(str(tmp_path / "tiny-depth"))
    out = str(tmp_path / "out")
    stats = run(load_curate_config(CONFIG, _overrides(root, out) + [
        f"depth.model_path={model}", "clip.max_size=96", "filters.ocr=false", "filters.nsfw=false"]), progress=False)
    samples = _samples(out)
    assert len(samples) == stats["counts"]["clips_written"] == truth["expected_clips"] == 2
    for key, m in samples.items():
        assert set(m) == {"mp4", "depth.mp4", "json", "txt"}
        meta = json.loads(m["json"])
        assert meta["depth"]["model"] == folder_identity(model) and meta["depth"]["frames"] == meta["num_frames"]
        with av.open(io.BytesIO(m["depth.mp4"])) as c:
            got = np.stack([f.to_ndarray(format="rgb24")[..., 0] for f in c.decode(video=0)])
        assert got.shape == (meta["num_frames"], meta["height"], meta["width"])
        assert np.abs(got.astype(int) - depth_reference(model, m["mp4"])).max() <= 1, key


# ----------------------------------------------------------------------------- resume


# Code a CLI subprocess runs before `main`: deterministic kill points inside the packing.
DIE_AFTER_FIRST_SHARD = (  # SIGKILL right after the first shard file is complete
    "import os, signal\n"
    "from data_pipeline import writer\n"
    "close = writer.ShardWriter._close\n"
    "def close_then_die(self):\n"
    "    close(self)\n"
    "    os.kill(os.getpid(), signal.SIGKILL)\n"
    "writer.ShardWriter._close = close_then_die\n")
DIE_WRITING_SECOND_SHARD = (  # killed in the middle of writing the second shard
    "import os\n"
    "from data_pipeline import io as vio\n"
    "write = vio.write_bytes\n"
    "def write_or_die(path, data, options=None):\n"
    "    if path.endswith('-000001.tar'):  # half of it on disk under a temporary name, then gone\n"
    "        with open(os.path.join(os.path.dirname(path), '.tmp-cut-short'), 'wb') as f:\n"
    "            f.write(data[: len(data) // 2])\n"
    "        os._exit(137)\n"
    "    write(path, data, options)\n"
    "vio.write_bytes = write_or_die\n")


def _cli(cfg_path, address=None, patch=""):
    args = ["run", str(cfg_path), "--no-progress"] + (["--address", address] if address else [])
    code = patch + "import sys\nfrom data_pipeline.cli import main\nsys.exit(main(sys.argv[1:]))\n"
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)


def _cfg_file(tmp_path, root, out, *more) -> str:
    """The synthetic config with ``_overrides(root, out)`` and ``more``, as a YAML file for the CLI."""
    cfg = {"include": CONFIG}
    for o in _overrides(root, str(out)) + list(more):
        *sections, key = o.split("=", 1)[0].split(".")
        node = cfg
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = yaml.safe_load(o.split("=", 1)[1])
    path = tmp_path / f"{os.path.basename(str(out))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _wait_for(pred, proc, timeout=120.0):
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            return False
        if time.time() - t0 > timeout:
            raise TimeoutError("the run did not get there in time")
        time.sleep(0.005)
    return True


def test_killed_run_resumes_to_the_same_bytes(curated, ray_cluster, tmp_path):
    root, ref = curated["root"], curated["out"]
    out = tmp_path / "resumed"
    cfg_path = _cfg_file(tmp_path, root, out, *[f"ray.{stage}.batch_size=1" for stage in ("filters", "caption")])
    done = out / "_work" / "done"
    n_inputs = curated["stats"]["counts"]["inputs"]

    # 1. kill while inputs are being processed (this run starts its own local Ray; the next ones
    #    join the test's cluster with --address)
    p = _cli(cfg_path)
    # (a finished record is a .json; a .tmp- file is one being written, gone if the kill lands now)
    assert _wait_for(lambda: done.exists() and any(f.suffix == ".json" for f in done.iterdir()), p), \
        p.communicate()[0].decode()[-3000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = {f.name: f.stat().st_mtime_ns for f in done.iterdir() if f.suffix == ".json"}
    assert 0 < len(first) < n_inputs
    assert not (out / "_SUCCESS").exists()

    # 2. rerun; killed by SIGKILL as soon as the first shard has been written
    p = _cli(cfg_path, ray_cluster, DIE_AFTER_FIRST_SHARD)
    log2 = p.communicate(timeout=300)[0].decode()
    assert p.returncode == -signal.SIGKILL, log2[-3000:]
    assert f"{len(first)} already finished" in log2, log2[-3000:]
    assert (out / "shard-000000.tar").exists() and not (out / "_SUCCESS").exists()
    assert not (out / "shard-000001.tar").exists() and not (out / "index.json").exists()

    # 3. rerun to the end
    p = _cli(cfg_path, ray_cluster)
    log3 = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 0, log3[-3000:]

    # inputs finished before a kill were not processed again
    for name, mtime in first.items():
        assert (done / name).stat().st_mtime_ns == mtime
    _same_outputs(out, ref)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["counts"] == curated["stats"]["counts"]
    assert stats["rejected_by_reason"] == curated["stats"]["rejected_by_reason"]
    assert stats["this_run"]["resumed_inputs"] + stats["this_run"]["processed_inputs"] == n_inputs
    assert stats["this_run"]["resumed_inputs"] >= len(first)


def test_crafted_completion_records_are_redone_never_executed(curated, ray_cluster, tmp_path):
    """Records planted under _work/done/ by anyone who can write the output: a pickle that would
    create a file when unpickled, as an old-format .pkl and as a .json; a JSON record that does not
    match the schema; clip bytes changed behind a record. The rerun creates no file, redoes those
    inputs and packs the same bytes."""
    import shutil

    from data_pipeline.pipeline import run

    ref, root = curated["out"], curated["root"]
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    done = out / "_work" / "done"
    ids = sorted(p.stem for p in done.glob("*.json"))
    video, empty, text = (next(i for i in ids if i.startswith(p)) for p in ("video_0001", "corrupt_empty",
                                                                             "corrupt_text"))
    marker = tmp_path / "marker"
    evil = crafted_pickle(marker)
    (done / f"{video}.json").write_bytes(evil)   # not JSON at all
    (done / f"{video}.pkl").write_bytes(evil)
    (done / f"{empty}.json").unlink()             # only an old-format record
    (done / f"{empty}.pkl").write_bytes(evil)
    rec = json.loads((done / f"{text}.json").read_bytes())
    rec["rejections"][0]["clip"] = "0"            # JSON, but not the schema
    (done / f"{text}.json").write_text(json.dumps(rec))
    other = next(i for i in ids if i.startswith("video_0002"))
    data = bytearray((out / "_work" / "data" / f"{other}.bin").read_bytes())
    data[100] ^= 1                                # clip bytes changed, same size: found when packing
    (out / "_work" / "data" / f"{other}.bin").write_bytes(bytes(data))
    lines = []
    stats = run(load_curate_config(CONFIG, _overrides(root, str(out))), progress=False, echo=lines.append)
    assert not marker.exists()
    assert stats["this_run"]["processed_inputs"] == 4
    assert stats["this_run"]["resumed_inputs"] == len(ids) - 4
    warnings = [line for line in lines if "warning" in line]
    # one per bad JSON record (naming it), one for the .pkl files, one for the changed data
    assert len(warnings) == 4, warnings
    assert sum(f"{video}.json" in w for w in warnings) == 1 and sum(f"{text}.json" in w for w in warnings) == 1
    assert sum(f"{other}.json" in w and "sha256" in w for w in warnings) == 1
    assert any("2 completion record(s) in the old pickle format" in w and "redone" in w for w in warnings)
    _same_outputs(out, ref)
    assert not list(done.glob("*.pkl")) and (out / "_SUCCESS").exists()


def test_killed_while_packing_leaves_no_stale_index_and_repacks_the_same_bytes(curated, tmp_path):
    """Every input is recorded, and the output still holds a complete earlier packing that lacked one
    of them (an input added since). The packing run is killed while writing its second shard; the
    output must not claim to be complete meanwhile, and the rerun gives the uninterrupted bytes."""
    import shutil

    from data_pipeline.pipeline import run
    from data_pipeline.writer import finalize

    ref, root = curated["out"], curated["root"]
    out = tmp_path / "packed"
    shutil.copytree(os.path.join(ref, "_work"), out / "_work")
    cfg_path = _cfg_file(tmp_path, root, out)
    ids = sorted(p.stem for p in (out / "_work" / "done").glob("*.json"))
    earlier = [i for i in ids if not i.startswith("defects")]  # its clip comes first: every shard changes
    finalize(str(out), load_curate_config(cfg_path), earlier, fingerprint="earlier")
    assert (out / "_SUCCESS").exists() and (out / "shard-000001.tar").exists()

    p = _cli(cfg_path, patch=DIE_WRITING_SECOND_SHARD)  # all inputs recorded: no Ray, straight to packing
    log = p.communicate(timeout=300)[0].decode()
    assert p.returncode == 137, log[-3000:]
    assert (out / ".tmp-cut-short").exists()  # the kill really landed inside the second shard
    assert (out / "shard-000000.tar").read_bytes() == open(os.path.join(ref, "shard-000000.tar"), "rb").read()
    # half repacked: neither _SUCCESS nor an index of the earlier packing may be left to trust
    assert not (out / "_SUCCESS").exists() and not (out / "index.json").exists()

    stats = run(load_curate_config(cfg_path), progress=False, echo=lambda _: None)
    _same_outputs(out, ref)
    assert (out / "_SUCCESS").exists() and stats["counts"] == curated["stats"]["counts"]
