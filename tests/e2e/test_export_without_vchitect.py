"""An export loads and samples where vchitect is not installed: ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)`` in a fresh environment with torch, diffusers and transformers only (tests/envs.py)
runs the code the folder carries, with CFG (also the released and smooth guidance schedules), FasterCache
and FreeInit, and Many-for-Many task inputs (i2v, vinp; an export with the condition adapter and RepVideo
layer aggregation), and gives the same output, bit for bit, as the installed vchitect does with the same
folder (same code, same weights, one thread each); without the flag diffusers refuses the folder there."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers_ckpt import build_model, make_encoders, run_config, write_checkpoint
from vchitect.export import export

PROMPT, SEED = "a red car at night", 7
COMMON = dict(num_frames=3, height=16, width=16, num_inference_steps=6, guidance_scale=4.0)
# name → extra pipe() arguments; FasterCache and FreeInit as plain values (no vchitect class needed)
CASES = {
    "cfg": dict(output_type="latent"),
    "cfg_sequential": dict(output_type="latent", batch_cfg=False),
    "video": dict(output_type="np"),
    "freeinit": dict(output_type="latent", freeinit={"reinits": 1, "filter": "gaussian"}),
    "fastercache_defaults": dict(output_type="latent", fastercache=True),
    "released": dict(output_type="latent", guidance_schedule="released", timestep_spacing="released"),
    "smooth": dict(output_type="latent", guidance_schedule="smooth"),
}

SAMPLE = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np, torch
    from safetensors.torch import save_file
    assert importlib.util.find_spec("vchitect") is None, "vchitect is importable in this environment"
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    try:  # without the flag diffusers refuses the folder's code, and there is no vchitect to answer instead
        DiffusionPipeline.from_pretrained(sys.argv[1])
        raise AssertionError("loaded without trust_remote_code")
    except ValueError as exc:
        assert "trust_remote_code=True" in str(exc), exc
    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    code = sys.modules[type(pipe).__module__]  # the folder's pipeline module: its config classes too
    fastercache = code.FasterCacheConfig()
    cases = {**{k: dict(v) for k, v in json.loads(sys.argv[3]).items()},
             "fastercache": dict(output_type="latent", fastercache=fastercache)}
    out = {}
    for name, kw in cases.items():
        frames = pipe(sys.argv[4], generator=torch.Generator().manual_seed(int(sys.argv[5])),
                      **json.loads(sys.argv[6]), **kw).frames
        out[name] = torch.as_tensor(np.ascontiguousarray(frames))
    save_file(out, sys.argv[2])
    own = sorted(m for m in sys.modules if m.split(".")[0] in ("vchitect", "_vchitect_diffusers_hook"))
    print(json.dumps({"pipeline": type(pipe).__module__, "transformer": type(pipe.transformer).__module__,
                      "vchitect_modules": own, "fastercache_stats": fastercache.stats}))
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_code")
    enc = make_encoders(root / "enc")
    cfg = run_config(encoders={"text_encoder_path": str(enc["text_encoder"]), "vae_path": str(enc["vae"])})
    write_checkpoint(root / "run", 100, build_model(0), cfg)
    return export(root / "run", root / "export", max_shard_size="200KB")


def _installed_outputs(folder):
    """The same calls with the installed vchitect (no trust_remote_code: the start-up hook's path)."""
    from diffusers import DiffusionPipeline

    from vchitect.diffusion.fastercache import FasterCacheConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder)
        assert type(pipe).__module__ == "vchitect.export.pipeline"
        fastercache = FasterCacheConfig()
        cases = {**CASES, "fastercache": dict(output_type="latent", fastercache=fastercache)}
        out = {}
        for name, kw in cases.items():
            frames = pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), **COMMON, **kw).frames
            out[name] = torch.as_tensor(frames)
    finally:
        torch.set_num_threads(threads)
    return out, fastercache.stats


def test_export_samples_where_vchitect_is_not_installed(exported, env_without_vchitect, tmp_path):
    result = tmp_path / "frames.safetensors"
    r = env_without_vchitect.run(["python", "-c", SAMPLE, str(exported), str(result), json.dumps(CASES), PROMPT,
                                  str(SEED), json.dumps(COMMON)], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["vchitect_modules"] == [], info  # nothing of vchitect was imported, or importable
    assert info["pipeline"].endswith(".vchitect_export_pipeline"), info  # the folder's copies ran
    assert info["transformer"].endswith(".vchitect_models_transformer"), info
    got = load_file(result)

    expected, stats = _installed_outputs(exported)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        assert torch.equal(got[name], expected[name].to(got[name].dtype)), \
            (name, (got[name] - expected[name]).abs().max().item())
    assert got["video"].shape == (1, 3, 16, 16, 3)
    # the samplers did something: FreeInit and FasterCache change the result, FasterCache reused work
    assert not torch.equal(got["freeinit"], got["cfg"])
    assert not torch.equal(got["released"], got["cfg"]) and not torch.equal(got["smooth"], got["cfg"])
    assert not torch.equal(got["fastercache"], got["cfg"]) and torch.equal(got["fastercache"],
                                                                           got["fastercache_defaults"])
    assert info["fastercache_stats"] == stats
    assert stats["attention_reused_rows"] > 0 and stats["uncond_rebuilt"] > 0, stats
    assert (got["cfg_sequential"] - got["cfg"]).abs().max() < 1e-5  # one 2B batch or two B calls



# ------------------------------------------------------------------ Many-for-Many tasks
TASK_SAMPLE = textwrap.dedent("""
    import importlib.util, json, sys
    import numpy as np, torch
    from safetensors.torch import load_file, save_file
    assert importlib.util.find_spec("vchitect") is None, "vchitect is importable in this environment"
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    given = {k: v.numpy() for k, v in load_file(sys.argv[3]).items()}
    out = {}
    for name, kw in json.loads(sys.argv[4]).items():
        inputs = {k: given[v] for k, v in kw.pop("inputs").items()}
        frames = pipe(sys.argv[5], generator=torch.Generator().manual_seed(int(sys.argv[6])), **kw, **inputs).frames
        out[name] = torch.from_numpy(np.ascontiguousarray(frames))
    save_file(out, sys.argv[2])
    own = sorted(m for m in sys.modules if m.split(".")[0] in ("vchitect", "_vchitect_diffusers_hook"))
    print(json.dumps({"pipeline": type(pipe).__module__, "vchitect_modules": own,
                      "condition_channels": pipe.transformer.config.condition_channels,
                      "repvideo": dict(pipe.transformer.config.repvideo),
                      "gates": pipe.transformer.layer_aggregation.gate.tolist()}))
""")
TASK_COMMON = dict(height=8, width=8, num_inference_steps=3, guidance_scale=3.0)
# name → pipe() arguments; "inputs" maps an argument to a tensor of TASK_INPUTS
TASK_CASES = {
    "i2v": dict(task="i2v", num_frames=5, inputs={"image": "first"}, **TASK_COMMON),
    "i2v_raw": dict(task="i2v", num_frames=5, paste_known=False, inputs={"image": "first"}, **TASK_COMMON),
    "vinp": dict(task="vinp", inputs={"video": "clip", "mask": "mask"}, **TASK_COMMON),
    "vinp_raw": dict(task="vinp", paste_known=False, inputs={"video": "clip", "mask": "mask"}, **TASK_COMMON),
}


def task_inputs() -> dict:
    rng = np.random.default_rng(5)
    mask = np.ones((8, 8), np.uint8)
    mask[2:6, 3:7] = 0
    return {"first": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "clip": rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), "mask": mask}


def test_a_task_export_samples_where_vchitect_is_not_installed(env_without_vchitect, tmp_path):
    """i2v and vinp (pasted and raw) through the folder's own code equal the installed vchitect's, bit for bit;
    the model also has RepVideo layer aggregation on (3 layers, learned gates away from zero), so the shipped
    transformer code runs that path too."""
    from diffusers import DiffusionPipeline

    enc = make_encoders(tmp_path / "enc")
    adapter = dict(in_channels=3, condition_channels=4, condition_vae_spatial_factor=1,
                   condition_vae_temporal_factor=1, condition_hidden_channels=4, num_layers=3,
                   repvideo=dict(window=3, gate="learned"))
    model = build_model(0, **adapter)
    with torch.no_grad():
        torch.nn.init.normal_(model.condition_adapter.conv_out.weight, std=0.05)
        model.layer_aggregation.gate.fill_(0.6)
    write_checkpoint(tmp_path / "run", 1, model, run_config(adapter, encoders={"text_encoder_path":
                                                                                  str(enc["text_encoder"])}))
    folder = export(tmp_path / "run", tmp_path / "export")
    given = task_inputs()
    save_file({k: torch.from_numpy(v) for k, v in given.items()}, str(tmp_path / "inputs.safetensors"))
    result = tmp_path / "frames.safetensors"
    r = env_without_vchitect.run(["python", "-c", TASK_SAMPLE, str(folder), str(result),
                                  str(tmp_path / "inputs.safetensors"), json.dumps(TASK_CASES), PROMPT, str(SEED)],
                                 timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["vchitect_modules"] == [] and info["pipeline"].endswith(".vchitect_export_pipeline"), info
    assert info["condition_channels"] == 4
    assert info["repvideo"]["window"] == 3 and info["gates"][2] == pytest.approx(0.6)
    assert (folder / "transformer" / "vchitect_models_repvideo.py").is_file()
    got = load_file(result)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder)
        assert type(pipe).__module__ == "vchitect.export.pipeline"
        pipe.set_progress_bar_config(disable=True)
        for name, case in TASK_CASES.items():
            kw = dict(case)
            inputs = {k: given[v] for k, v in kw.pop("inputs").items()}
            want = torch.from_numpy(pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), **kw, **inputs).frames)
            assert torch.equal(got[name], want), (name, (got[name] - want).abs().max())
    finally:
        torch.set_num_threads(threads)
    # the folder's code pasted the given pixels (and only with paste_known)
    assert torch.equal(got["i2v"][0, 0], torch.from_numpy(given["first"]).float() / 255)
    assert not torch.equal(got["i2v_raw"][0, 0], got["i2v"][0, 0])
    known = torch.from_numpy(given["mask"]).bool()
    assert torch.equal(got["vinp"][0][:, known], torch.from_numpy(given["clip"]).float()[:, known] / 255)
