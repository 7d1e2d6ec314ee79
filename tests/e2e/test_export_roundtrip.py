"""Export round trip: a tiny checkpoint saved by 4 FSDP2 ranks → export → DiffusionPipeline.from_pretrained
in a fresh offline process that never imports vchitect itself → generate; equals the training model's own
sampling (fp32, < 1e-5).
The same weights saved by 1 rank export to byte-identical files."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tests.helpers_ckpt import build_model, make_encoders, run_config, write_checkpoint
from vchitect.export import export
from vchitect.parallel.spawn import run_local

REPO = Path(__file__).resolve().parents[2]
PROMPT = "a red car at night"
STEPS, GUIDANCE, SEED, FRAMES, SIZE = 4, 4.0, 7, 3, 16

LOAD_AND_GENERATE = textwrap.dedent("""
    import sys, torch
    from diffusers import DiffusionPipeline  # no vchitect import, no trust_remote_code: the installed hook
    assert not any(m == "vchitect" or m.startswith("vchitect.") for m in sys.modules), "vchitect imported early"
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
    assert type(pipe).__module__ == "vchitect.export.pipeline", type(pipe)  # the installed class, not the folder's copy
    assert type(pipe.transformer).__module__ == "vchitect.models.transformer", type(pipe.transformer)
    kw = dict(num_frames={frames}, height={size}, width={size}, num_inference_steps={steps}, guidance_scale={g})
    latents = pipe({prompt!r}, generator=torch.Generator().manual_seed({seed}), output_type="latent", **kw).frames
    video = pipe({prompt!r}, generator=torch.Generator().manual_seed({seed}), output_type="np", **kw).frames
    torch.save({{"latents": latents, "video": torch.from_numpy(video)}}, sys.argv[2])
""").format(frames=FRAMES, size=SIZE, steps=STEPS, g=GUIDANCE, prompt=PROMPT, seed=SEED)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_export_round_trip_from_four_ranks(tmp_path):
    enc = make_encoders(tmp_path / "enc")
    cfg = run_config(encoders={"text_encoder_path": str(enc["text_encoder"]), "vae_path": str(enc["vae"])})

    # the same weights, saved sharded by 4 ranks and whole by 1
    run_local([str(REPO / "tests" / "helpers_ckpt.py"), str(tmp_path / "run4"), "--step", "100",
               "--config", json.dumps(cfg)], nproc=4, timeout=300)
    model = build_model(0)
    write_checkpoint(tmp_path / "run1", 100, model, cfg)
    assert json.loads((tmp_path / "run4/checkpoints/step-000000100/vchitect.json").read_text())["world_size"] == 4

    out4 = export(tmp_path / "run4", tmp_path / "out4", max_shard_size="200KB")
    out1 = export(tmp_path / "run1/checkpoints/step-000000100", tmp_path / "out1", max_shard_size="200KB")
    names = files(out1)
    assert names == files(out4) and len([n for n in names if n.startswith("transformer/")]) > 2
    match, mismatch, errors = filecmp.cmpfiles(out1, out4, names, shallow=False)
    assert not mismatch and not errors, mismatch

    # a fresh process, offline, loads the folder through diffusers alone (the installed start-up hook,
    # _vchitect_diffusers_hook, resolves VchitectPipeline) and generates
    result = tmp_path / "result.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(out4), str(result)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(result)

    # the training model, sampled directly with the training-side text encoder and VAE
    from diffusers import AutoencoderKL

    from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample
    from vchitect.models.encoders import load_text_encoder

    text = load_text_encoder(enc["text_encoder"], "t5", max_length=8)
    cond, uncond = (TextCondition(h, p, m) for h, m, p in (text.encode([PROMPT]), text.encode([""])))
    noise = torch.randn((1, 4, FRAMES, SIZE // 2, SIZE // 2), generator=torch.Generator().manual_seed(SEED))
    expected = sample(model, noise, cond, uncond, sigmas=flow_sigmas(STEPS, 3.0), guidance_scale=GUIDANCE)
    diff = (got["latents"] - expected).abs().max().item()
    assert diff < 1e-5, diff

    vae = AutoencoderKL.from_pretrained(enc["vae"])
    z = expected / 0.5 + 0.1  # the VAE's scaling_factor / shift_factor undone
    with torch.no_grad():
        frames = vae.decode(z.permute(0, 2, 1, 3, 4).flatten(0, 1)).sample  # F×3×H×W
    video = ((frames.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)[None]  # 1×F×H×W×3
    assert got["video"].shape == (1, FRAMES, SIZE, SIZE, 3)
    assert (got["video"] - video).abs().max().item() < 1e-4
