"""An sd3 export (CLIP-L + CLIP-G + T5, tiny random encoders) carries text_encoder_3 / tokenizer_3 and the
mask mode; its ``encode_prompt`` is the training-side encoder's output bit for bit, with the installed
vchitect and, through ``trust_remote_code``, in an environment without vchitect, where it also samples
(CFG with the empty negative prompt) to the same latents as the installed code."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers_ckpt import build_model, run_config, write_checkpoint
from tests.helpers_models import SD3_WIDTHS, save_tiny_sd3_encoders
from vchitect.export import VchitectPipeline, export
from vchitect.models.encoders import CLIP_TOKENS, load_text_encoder

PROMPTS = ["a red circle moves from left to right", ""]
MAX_LENGTH = CLIP_TOKENS + 16
DIMS = dict(joint_attention_dim=SD3_WIDTHS["t5"], pooled_projection_dim=SD3_WIDTHS["proj_l"] + SD3_WIDTHS["proj_g"])
COMMON = dict(num_frames=2, height=16, width=16, num_inference_steps=3, guidance_scale=4.0, output_type="latent")

SAMPLE = textwrap.dedent("""
    import importlib.util, json, sys
    import torch
    from safetensors.torch import save_file
    assert importlib.util.find_spec("vchitect") is None, "vchitect is importable in this environment"
    torch.set_num_threads(1)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True)
    c = pipe.encode_prompt(json.loads(sys.argv[3]))
    latents = pipe(json.loads(sys.argv[3])[0], generator=torch.Generator().manual_seed(3),
                   **json.loads(sys.argv[4])).frames
    save_file({"hidden": c.hidden, "mask": c.mask, "pooled": c.pooled, "latents": latents.contiguous()}, sys.argv[2])
    print(json.dumps({"pipeline": type(pipe).__module__, "t5": type(pipe.text_encoder_3).__name__,
                      "masks": pipe.config.text_masks}))
""")


@pytest.fixture(scope="module", params=["masked", "released"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"sd3_{request.param}")
    folder = save_tiny_sd3_encoders(str(root / "sd3"))
    cfg = run_config(model_kwargs=DIMS, encoders={"text_encoder_kind": "sd3", "text_encoder_path": folder})
    cfg["data"]["text"] = {"max_length": MAX_LENGTH, "masks": request.param}
    write_checkpoint(root / "run", 10, build_model(0, **DIMS), cfg)
    return export(root / "run", root / "export"), folder, request.param


def test_sd3_export_encodes_like_training(exported):
    out, folder, masks = exported
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_3"][1] == "T5Tokenizer" and index["tokenizer_2"][1] == "CLIPTokenizer"
    assert index["text_encoder_kind"] == "sd3" and index["text_masks"] == masks
    assert index["max_sequence_length"] == MAX_LENGTH
    assert (out / "tokenizer_3" / "spiece.model").is_file() and (out / "tokenizer_3" / "tokenizer.json").is_file()
    pipe = VchitectPipeline.from_pretrained(out)
    got = pipe.encode_prompt(PROMPTS)
    hidden, mask, pooled = load_text_encoder(folder, "sd3", max_length=MAX_LENGTH, masks=masks).encode(PROMPTS)
    assert torch.equal(got.hidden, hidden) and torch.equal(got.mask, mask) and torch.equal(got.pooled, pooled)
    assert bool(mask.all()) == (masks == "released")


def test_sd3_export_takes_the_encoders_from_base(exported, tmp_path):
    out, folder, masks = exported
    cfg = run_config(model_kwargs=DIMS, encoders={"text_encoder_kind": "sd3"})  # precomputed run: no paths
    cfg["data"]["text"] = {"max_length": MAX_LENGTH, "masks": masks}
    write_checkpoint(tmp_path / "run", 10, build_model(0, **DIMS), cfg)
    index = json.loads((export(tmp_path / "run", tmp_path / "export", base=folder) / "model_index.json").read_text())
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"] and index["tokenizer_2"][0] == "transformers"


def test_sd3_export_samples_where_vchitect_is_not_installed(exported, env_without_vchitect, tmp_path):
    out, folder, masks = exported
    result = tmp_path / "out.safetensors"
    r = env_without_vchitect.run(["python", "-c", SAMPLE, str(out), str(result), json.dumps(PROMPTS),
                                  json.dumps(COMMON)], timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["pipeline"].endswith(".vchitect_export_pipeline") and info["t5"] == "T5EncoderModel"
    assert info["masks"] == masks
    got = load_file(result)
    hidden, mask, pooled = load_text_encoder(folder, "sd3", max_length=MAX_LENGTH, masks=masks).encode(PROMPTS)
    assert torch.equal(got["hidden"], hidden) and torch.equal(got["mask"], mask) and torch.equal(got["pooled"], pooled)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from diffusers import DiffusionPipeline

        latents = DiffusionPipeline.from_pretrained(out)(PROMPTS[0], generator=torch.Generator().manual_seed(3),
                                                         **COMMON).frames
    finally:
        torch.set_num_threads(threads)
    assert latents.shape == got["latents"].shape and torch.equal(got["latents"], latents)
