"""The fine-tune recipe of the released Vchitect-2.0 2B, end to end, shape-shrunk: the repository's
configs/curate/finetune-vchitect2-2b.yaml and configs/train/finetune-vchitect2-2b.yaml with only sizes
and paths overridden, on tiny random stand-ins of the released artefacts (an SD3 pipeline folder with
CLIP-L / CLIP-G / T5 and an SD3-style VAE; a randomised transformer in the released format).

curation with latents (Ray, sd3 encoders, released masks) → training from ``vchitect2:`` on the
precomputed shards (2 ranks, the recipe's Ulysses SP and full checkpointing) → export with the three
encoders → ``vchitect sample --preset vchitect2-released`` from the export folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers_finetune import save_released_transformer, save_tiny_sd3_vae
from tests.helpers_models import SD3_WIDTHS, save_tiny_sd3_encoders
from tests.helpers_run import ENV, REPO, vchitect

# The 2B recipe, shrunk: everything the recipe files set stays but these sizes.
MODEL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=4, sample_size=16,
             pos_embed_max_size=16, joint_attention_dim=SD3_WIDTHS["t5"],
             pooled_projection_dim=SD3_WIDTHS["proj_l"] + SD3_WIDTHS["proj_g"])
TEXT = {"max_length": 333, "dim": SD3_WIDTHS["t5"], "pooled_dim": MODEL["pooled_projection_dim"], "masks": "released"}
BUCKET = {"height": 32, "width": 48, "frames": 4}


def flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip()


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    from vchitect.demo.corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("finetune")
    sd3 = save_tiny_sd3_encoders(str(root / "models" / "sd3"))
    save_tiny_sd3_vae(os.path.join(sd3, "vae"))
    released = save_released_transformer(str(root / "models" / "Vchitect-2.0-2B" / "transformer"), seed=1, **MODEL)
    write_demo_corpus(str(root / "raw"), n_videos=3, shots_per_video=2, seed=0)
    return root, sd3, released


@pytest.fixture(scope="module")
def shards(artefacts):
    root, sd3, _ = artefacts
    out = root / "shards"
    # The recipe's curation on the demo corpus: the demo filters (for its synthetic footage) over the
    # recipe's, and the latents section of the recipe with the shrunk sizes.
    cfg = root / "curate.yaml"
    cfg.write_text(yaml.safe_dump({"include": [str(REPO / "configs/curate/finetune-vchitect2-2b.yaml"),
                                               str(REPO / "configs/curate/demo.yaml")]}))
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "run", str(cfg),
                        f"input.path={root / 'raw' / 'manifest.jsonl'}", f"output.path={out}",
                        "ray.latents.gpus=0", "ray.latents.actors=1", "ray.latents.cpus=0.5",
                        f"latents.encoders.text_encoder_path={sd3}", f"latents.encoders.vae_path={sd3}/vae",
                        "latents.encoders.dtype=float32", f"latents.text={flow(TEXT)}",
                        f"latents.buckets={flow([BUCKET])}"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout[-6000:]
    return out


def test_curation_writes_the_released_conditioning(shards, artefacts):
    _, sd3, _ = artefacts
    tars = sorted(shards.glob("*.tar"))
    assert tars, sorted(p.name for p in shards.iterdir())
    with tarfile.open(tars[0]) as t:
        members = {m.name.split(".", 1)[1]: t.extractfile(m).read() for m in t.getmembers()
                   if m.name.startswith(t.getmembers()[0].name.split(".", 1)[0] + ".")}
    meta = json.loads(members["json"])
    rec = meta["latents"]
    assert rec["text_encoder"]["kind"] == "sd3" and rec["text_encoder"]["masks"] == "released"
    assert len(rec["text_encoder"]["encoders"]) == 3  # CLIP-L, CLIP-G, T5
    assert rec["vae"]["scaling_factor"] == pytest.approx(1.5305) and rec["vae"]["per_frame"] is True
    load = lambda name: np.load(__import__("io").BytesIO(members[name]), allow_pickle=False)  # noqa: E731
    assert load("latent.npy").shape == (MODEL["in_channels"], BUCKET["frames"], BUCKET["height"] // 2,
                                        BUCKET["width"] // 2)
    assert load("text.npy").shape == (333, TEXT["dim"])
    assert load("pooled.npy").shape == (TEXT["pooled_dim"],)
    assert load("text_mask.npy").all()  # released: no masks, every token attended


def test_finetune_recipe_trains_exports_and_samples(shards, artefacts, tmp_path):
    root, sd3, released = artefacts
    run = tmp_path / "run"
    model = [f"model.{k}={v}" for k, v in MODEL.items()]
    vchitect("train", REPO / "configs/train/finetune-vchitect2-2b.yaml", *model,
             f"data.sources=[{{uri: {shards}}}]", f"data.buckets={flow([BUCKET])}", f"data.text={flow(TEXT)}",
             f"data.latent_channels={MODEL['in_channels']}", "data.vae_spatial_factor=2", "data.token_budget=1000",
             "data.num_workers=1", f"data.encoders.text_encoder_path={sd3}", f"data.encoders.vae_path={sd3}/vae",
             "data.encoders.dtype=float32", "parallel.sp=2", f"train.init_from=vchitect2:{released}",
             f"train.output_dir={run}", "train.steps=4", "train.warmup_steps=1", "train.lr=1e-3",
             "train.checkpoint_every=2", "train.log_every=1", "train.progress=false", "train.tensorboard=false",
             "train.wandb.mode=disabled", nproc=2, timeout=600)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in metrics)

    out = tmp_path / "export"
    vchitect("export", run, out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_kind"] == "sd3" and index["text_masks"] == "released"
    assert all((out / sub).is_dir() for sub in ("text_encoder_3", "tokenizer_3", "vae"))

    # The fine-tune started from the released weights: the exported transformer lies next to them,
    # far closer than a fresh initialisation of the same shape.
    from vchitect.models import VchitectTransformer3DModel

    start = load_file(os.path.join(released, "diffusion_pytorch_model.safetensors"))
    tuned = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    fresh = VchitectTransformer3DModel(**MODEL).state_dict()
    dist = lambda a: sum(float((a[k].float() - start[k].float()).norm()) for k in start)  # noqa: E731
    assert 0 < dist(tuned) < 0.2 * dist(fresh)

    video = tmp_path / "sample.mp4"
    r = vchitect("sample", out, "--preset", "vchitect2-released", "--prompt", "a red circle moves right",
                 "--frames", BUCKET["frames"], "--height", BUCKET["height"], "--width", BUCKET["width"],
                 "--dtype", "fp32", "--out", video, timeout=600)
    import av

    with av.open(str(video)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    assert len(frames) == BUCKET["frames"] and frames[0].shape == (BUCKET["height"], BUCKET["width"], 3), r.stderr
    # the preset's settings, with the explicit flags over them
    assert (f"sampling 4 frames at 32×48: 100 steps, guidance 7.5 (released), timestep spacing released, "
            f"transformer float32") in r.stdout, r.stdout
