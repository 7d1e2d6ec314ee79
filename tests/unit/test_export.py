"""Export: checkpoint discovery and errors, model/EMA-only reads, dtype, sharding, atomic output,
pixel-space pipelines without encoders, and the ``vchitect export`` / ``vchitect sample`` commands."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers_ckpt import build_model, ema_of, make_clip, make_encoders, run_config, write_checkpoint
from vchitect.export import ExportError, VchitectPipeline, export, find_checkpoint, load_weights
from vchitect.export.cli import add_export_parser, add_sample_parser


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    enc = make_encoders(root / "enc")
    cfg = run_config(encoders={"text_encoder_path": str(enc["text_encoder"]), "vae_path": str(enc["vae"])})
    model = build_model(0)
    write_checkpoint(root / "run", 100, model, cfg)
    write_checkpoint(root / "run", 200, model, cfg)
    return root, model


def transformer_weights(folder):
    files = sorted((folder / "transformer").glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


def test_find_checkpoint_picks_the_newest_complete_step(ckpt, tmp_path):
    root, _ = ckpt
    assert find_checkpoint(root / "run").name == "step-000000200"
    assert find_checkpoint(root / "run" / "checkpoints").name == "step-000000200"
    step = root / "run" / "checkpoints" / "step-000000100"
    assert find_checkpoint(step) == step
    with pytest.raises(ExportError, match="does not exist"):
        find_checkpoint(tmp_path / "nope")
    partial = tmp_path / "checkpoints" / "step-000000300.tmp"
    partial.mkdir(parents=True)
    with pytest.raises(ExportError, match="incomplete"):
        find_checkpoint(partial)
    with pytest.raises(ExportError, match="no checkpoint under .* verifies"):
        find_checkpoint(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "empty")
    no_json = tmp_path / "checkpoints" / "step-000000400"
    no_json.mkdir()
    (no_json / ".metadata").write_bytes(b"")
    with pytest.raises(ExportError, match="vchitect.json is missing"):
        find_checkpoint(no_json)


def test_export_reads_only_model_and_ema_entries(ckpt, monkeypatch):
    import torch.distributed.checkpoint as dcp

    root, model = ckpt
    requested = []
    original = dcp.FileSystemReader.read_data

    def spy(self, plan, planner):
        requested.extend(item.dest_index.fqn for item in plan.items)
        return original(self, plan, planner)

    monkeypatch.setattr(dcp.FileSystemReader, "read_data", spy)
    weights = load_weights(find_checkpoint(root / "run"), ema=True)
    assert requested and all(k.startswith(("model.", "ema.")) for k in requested)
    ema = ema_of(model)
    sd = model.state_dict()
    for name, value in weights.items():
        expected = ema.get(name, sd[name])  # EMA where it exists, model weights (and buffers) otherwise
        assert torch.equal(value, expected), name
    assert "pos_embed.pos_embed" in weights and "pos_embed.pos_embed" not in ema


def test_export_writes_a_loadable_folder_with_shards_dtype_and_shift(ckpt, tmp_path):
    root, model = ckpt
    out = export(root / "run", tmp_path / "pipe", max_shard_size="200KB")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["vchitect_pipeline", "VchitectPipeline"]
    assert index["transformer"] == ["vchitect_transformer", "VchitectTransformer3DModel"]
    assert (out / "vchitect_pipeline.py").is_file() and (out / "transformer" / "vchitect_transformer.py").is_file()
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "T5EncoderModel"]
    assert (out / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list((out / "transformer").glob("*.safetensors"))) > 1
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    for sub in ("vae", "text_encoder", "tokenizer"):
        assert (out / sub).is_dir()
    weights = transformer_weights(out)
    sd = model.state_dict()
    assert set(weights) == set(sd) and all(torch.equal(weights[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob(".pipe.tmp-*"))

    half = export(root / "run", tmp_path / "bf16", dtype="bf16", ema=True)
    w16 = transformer_weights(half)
    assert all(v.dtype == torch.bfloat16 for v in w16.values())
    name = "transformer_blocks.0.attn.to_q.weight"
    assert torch.equal(w16[name], (sd[name] * 0.9).to(torch.bfloat16))


def test_exported_files_are_readable_by_the_group(ckpt, tmp_path):
    """safetensors writes 0600 and the copied encoder weights are 0600 at the source; an export on a shared
    cluster gets the modes of any new file under the umask (022 → 0644 files, 0755 folders)."""
    import os
    import stat

    root, _ = ckpt
    source_weights = root / "enc" / "t5" / "model.safetensors"
    os.chmod(source_weights, 0o600)
    previous = os.umask(0o022)
    try:
        out = export(root / "run", tmp_path / "pipe", max_shard_size="200KB")
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in paths}
    weights = [p for p in paths if p.suffix == ".safetensors"]
    assert len(weights) >= 3 and (out / "text_encoder" / "model.safetensors") in weights
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o755 if (tmp_path / k).is_dir() else 0o644)}
    assert not wrong, wrong
    assert all(modes[str(p.relative_to(tmp_path))] & 0o040 for p in weights)
    previous = os.umask(0o077)  # a user who wants private files keeps them private
    try:
        private = export(root / "run", tmp_path / "private")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((private / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mode) == 0o600


def test_export_errors_leave_nothing_behind(ckpt, tmp_path):
    root, _ = ckpt
    with pytest.raises(ExportError, match="choose bf16, fp16 or fp32"):
        export(root / "run", tmp_path / "x", dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    with pytest.raises(ExportError, match="--overwrite"):
        export(root / "run", tmp_path / "full")
    export(root / "run", tmp_path / "again")
    export(root / "run", tmp_path / "again", overwrite=True, dtype="bf16")
    assert (tmp_path / "again" / "model_index.json").is_file() and not list(tmp_path.glob(".again*"))
    with pytest.raises(ExportError, match="no EMA"):
        step = root / "noema" / "checkpoints"
        write_checkpoint(root / "noema", 5, build_model(0), run_config(), with_ema=False)
        export(step, tmp_path / "y", ema=True)
    broken = tmp_path / "base"
    (broken / "vae").mkdir(parents=True)
    (broken / "vae" / "config.json").write_text("{not json")
    with pytest.raises(ExportError, match="cannot be read as JSON"):
        export(root / "run", tmp_path / "z", base=broken)
    with pytest.raises(ExportError, match="do not fit this model config"):
        write_checkpoint(tmp_path / "mismatch", 1, build_model(0), run_config({"patch_size": 4}))
        export(tmp_path / "mismatch", tmp_path / "v")
    with pytest.raises(ExportError, match="pass --base"):
        cfg = run_config(encoders={"vae_path": str(tmp_path / "missing-vae")})
        write_checkpoint(tmp_path / "elsewhere", 1, build_model(0), cfg)
        export(tmp_path / "elsewhere", tmp_path / "w")
    # no x, y, z, v, w output folders and no temporary folders
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "base", "elsewhere", "full", "mismatch"]


def test_pixel_space_pipeline_without_encoders(tmp_path):
    model = build_model(0, in_channels=3)
    write_checkpoint(tmp_path / "run", 10, model, run_config({"in_channels": 3}, shift=1.0))
    out = export(tmp_path / "run", tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["vae"] == [None, None] and index["text_encoder"] == [None, None]
    pipe = VchitectPipeline.from_pretrained(out)
    from vchitect.diffusion.sampling import TextCondition

    g = torch.Generator().manual_seed(0)
    text = TextCondition(torch.randn(1, 4, 16, generator=g), torch.randn(1, 16, generator=g))
    frames = pipe(prompt_embeds=text, num_frames=2, height=8, width=8, num_inference_steps=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="pt").frames
    assert frames.shape == (1, 2, 3, 8, 8) and 0 <= frames.min() and frames.max() <= 1
    images = pipe(prompt_embeds=text, num_frames=2, height=8, width=8, num_inference_steps=1, guidance_scale=1.0,
                  output_type="pil").frames
    assert len(images) == 1 and len(images[0]) == 2 and images[0][0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompt_embeds=text, output_type="mp4")
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(prompt_embeds=text, height=9, width=8, num_inference_steps=1, guidance_scale=1.0)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe("a cat", num_inference_steps=1)


def test_cli_export_and_sample_write_files(ckpt, tmp_path, capsys):
    root, _ = ckpt
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    add_export_parser(sub)
    add_sample_parser(sub)
    args = parser.parse_args(["export", str(root / "run"), str(tmp_path / "pipe"), "--dtype", "fp32"])
    assert args.func(args) == 0
    args = parser.parse_args(["export", str(tmp_path / "missing"), str(tmp_path / "p2")])
    assert args.func(args) == 2 and "does not exist" in capsys.readouterr().out
    common = ["--prompt", "a red car", "--frames", "3", "--height", "16", "--width", "16", "--steps", "2",
              "--guidance-scale", "3"]
    args = parser.parse_args(["sample", str(tmp_path / "pipe"), *common, "--out", str(tmp_path / "v.gif")])
    assert args.func(args) == 0
    from PIL import Image

    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == 3 and im.size == (16, 16)
    args = parser.parse_args(["sample", str(root / "run"), *common, "--fastercache", "--freeinit", "1",
                              "--out", str(tmp_path / "v.mp4")])
    assert args.func(args) == 0
    import av

    with av.open(str(tmp_path / "v.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 3


def test_cli_user_errors_are_one_line_with_exit_code_2(ckpt, tmp_path, capsys):
    """Through vchitect.cli.main: a missing checkpoint, a bad --max-shard-size, a bad --out suffix
    (caught before sampling, not after) — one `… error:` line each, exit code 2, nothing written."""
    from vchitect.cli import main

    root, _ = ckpt
    prompt = ["--prompt", "a cat", "--steps", "1", "--frames", "2"]
    cases = [(["export", str(tmp_path / "missing"), str(tmp_path / "p")], "export error: ", "does not exist"),
             (["export", str(root / "run"), str(tmp_path / "p"), "--max-shard-size", "5XB"], "export error: ",
              "--max-shard-size '5XB': give a size such as 5GB"),
             (["sample", str(tmp_path / "missing"), *prompt, "--out", str(tmp_path / "v.gif")], "sample error: ",
              "does not exist"),
             (["sample", str(root / "run"), *prompt, "--out", str(tmp_path / "v.avi")], "sample error: ",
              "write .mp4 or .gif")]
    for argv, kind, words in cases:
        assert main(argv) == 2, argv
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and out.startswith(kind) and words in out, out
    assert not (tmp_path / "p").exists() and not list(tmp_path.glob("v.*"))


def test_pipeline_shows_a_progress_bar_per_denoising_step_unless_disabled(capsys):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vchitect.diffusion.sampling import TextCondition

    pipe = VchitectPipeline(build_model(0), FlowMatchEulerDiscreteScheduler(shift=1.0))
    g = torch.Generator().manual_seed(0)
    text = TextCondition(torch.randn(1, 4, 16, generator=g), torch.randn(1, 16, generator=g))
    kw = dict(prompt_embeds=text, num_frames=2, height=8, width=8, num_inference_steps=3, guidance_scale=1.0,
              output_type="latent")
    seen = []
    pipe(**kw, callback=lambda i, t, z: seen.append(i))
    assert seen == [0, 1, 2]  # the caller's callback still runs
    assert "3/3" in capsys.readouterr().err
    pipe(**kw, freeinit={"reinits": 1})
    assert "6/6" in capsys.readouterr().err  # every FreeInit pass counts
    pipe.set_progress_bar_config(disable=True)
    pipe(**kw)
    assert "3/3" not in capsys.readouterr().err


def test_pipeline_schedule_follows_the_exported_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from vchitect.diffusion.sampling import flow_sigmas

    model = build_model(0)
    fixed = VchitectPipeline(model, FlowMatchEulerDiscreteScheduler(shift=3.0))
    assert torch.allclose(fixed.sigmas(6, tokens=64, device="cpu"), flow_sigmas(6, 3.0), atol=1e-6)
    # resolution-dependent: s = shift · sqrt(tokens / shift_reference_tokens), as in training
    dynamic = VchitectPipeline(model, FlowMatchEulerDiscreteScheduler(shift=2.0, use_dynamic_shifting=True),
                               shift_reference_tokens=16)
    assert torch.allclose(dynamic.sigmas(6, tokens=64, device="cpu"), flow_sigmas(6, 4.0), atol=1e-6)
    # the released pipeline's spacing: the scheduler's own set_timesteps(N), linspace(1, σ_min, N) shifted, then 0
    released = fixed.sigmas(6, tokens=64, device="cpu", timestep_spacing="released")
    reference = FlowMatchEulerDiscreteScheduler(shift=3.0)
    reference.set_timesteps(6)
    assert torch.equal(released, reference.sigmas) and released[-2] < flow_sigmas(6, 3.0)[-2]  # last step lower
    with pytest.raises(ValueError, match="timestep_spacing='karras': choose one of uniform, released"):
        fixed.sigmas(6, tokens=64, device="cpu", timestep_spacing="karras")


def test_sample_preset_gives_the_released_settings_and_explicit_flags_win(ckpt, tmp_path, monkeypatch):
    """``vchitect sample --preset vchitect2-released``: the released frames, size, steps, guidance, schedule,
    spacing, negative prompt and a bf16 transformer reach the pipeline; flags given on the command line win."""
    import numpy as np

    from vchitect.cli import SAMPLE_DEFAULTS, build_parser
    from vchitect.export.pipeline import VchitectPipelineOutput

    root, _ = ckpt
    export(root / "run", tmp_path / "pipe")
    calls = []

    def fake_call(self, prompt, **kw):
        calls.append(dict(kw, prompt=prompt, transformer_dtype=self.transformer.dtype))
        return VchitectPipelineOutput(frames=np.zeros((1, 2, 16, 16, 3), np.float32))

    monkeypatch.setattr(VchitectPipeline, "__call__", fake_call)
    parser = build_parser()
    base = ["sample", str(tmp_path / "pipe"), "--prompt", "a red car", "--out", str(tmp_path / "v.gif")]
    args = parser.parse_args([*base, "--preset", "vchitect2-released", "--steps", "10", "--negative-prompt", "blur"])
    assert args.func(args) == 0
    released = dict(num_frames=40, height=432, width=768, guidance_scale=7.5, guidance_schedule="released",
                    timestep_spacing="released")
    assert {k: calls[-1][k] for k in released} == released
    assert calls[-1]["num_inference_steps"] == 10 and calls[-1]["negative_prompt"] == "blur"  # explicit wins
    assert calls[-1]["transformer_dtype"] == torch.bfloat16
    args = parser.parse_args([*base, "--preset", "vchitect2-released", "--guidance-schedule", "smooth",
                              "--dtype", "fp32", "--frames", "2"])
    assert args.func(args) == 0
    assert calls[-1]["guidance_schedule"] == "smooth" and calls[-1]["num_frames"] == 2
    assert calls[-1]["num_inference_steps"] == 100 and calls[-1]["negative_prompt"] == ""
    assert calls[-1]["transformer_dtype"] == torch.float32
    args = parser.parse_args(base)  # no preset: today's defaults, the export's own dtype
    assert args.func(args) == 0
    assert calls[-1]["guidance_schedule"] == "constant" and calls[-1]["timestep_spacing"] == "uniform"
    assert calls[-1]["num_frames"] == SAMPLE_DEFAULTS["frames"] == 16 and calls[-1]["guidance_scale"] == 6.0
    assert calls[-1]["negative_prompt"] is None and calls[-1]["transformer_dtype"] == torch.float32


def test_pooled_clip_encoder_is_exported_as_text_encoder_2(ckpt, tmp_path):
    from vchitect.models.encoders import load_text_encoder

    root, _ = ckpt
    enc = root / "enc"
    clip = make_clip(tmp_path)
    cfg = run_config(encoders={"text_encoder_path": str(enc / "t5"), "pooled_encoder_path": str(clip)})
    write_checkpoint(tmp_path / "run", 1, build_model(0), cfg)
    out = export(tmp_path / "run", tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["vae"] == [None, None]
    pipe = VchitectPipeline.from_pretrained(out)
    got = pipe.encode_prompt(["a red car"])
    hidden, mask, pooled = load_text_encoder(enc / "t5", "t5", max_length=8, pooled_path=clip).encode(["a red car"])
    assert torch.allclose(got.pooled, pooled, atol=1e-6) and torch.allclose(got.hidden, hidden, atol=1e-6)
