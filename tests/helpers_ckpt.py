"""Write checkpoints in the trainer's contract format, and tiny local encoders — for export tests.

The contract (see vchitect/export/export.py): ``RUN/checkpoints/step-{step:09d}/`` is a DCP directory
(written as ``….tmp`` and renamed) whose state dict holds ``model`` (plain FQNs of
``VchitectTransformer3DModel.state_dict()``), ``ema`` (trainable parameters only), and optimizer /
lr_scheduler / step / ``dataloader_dp{r}`` / ``rng_rank{r}`` entries (names as in
vchitect/train/checkpoint.py); next to ``.metadata`` sits ``vchitect.json`` ``{"step", "config",
"world_size", "layout"}``.

Distributed use (4 gloo ranks, each holding an FSDP2-sharded model)::

    python tests/helpers_ckpt.py RUN_DIR --step 100      # under vchitect.parallel.spawn.run_local
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

TINY = dict(sample_size=16, patch_size=2, in_channels=4, num_layers=2, num_attention_heads=4, attention_head_dim=8,
            joint_attention_dim=16, pooled_projection_dim=16, pos_embed_max_size=32)
WORDS = "a the cat dog runs on grass red car city at night slowly over bridge".split()


def build_model(seed: int = 0, **overrides):
    """The tiny model with every branch active (the zero-initialised outputs get small weights)."""
    from vchitect.models import VchitectTransformer3DModel

    torch.manual_seed(seed)
    model = VchitectTransformer3DModel(**{**TINY, **overrides})
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(k in name for k in ("to_out_temporal", "to_out_context", "to_add_out_temporal")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def run_config(model_kwargs: dict | None = None, shift: float = 3.0, encoders: dict | None = None) -> dict:
    """A resolved run config as the trainer records it (only the parts export reads are realistic)."""
    return {"model": {**TINY, **(model_kwargs or {})},
            "diffusion": {"shift": shift, "shift_reference_tokens": 0, "text_dropout": 0.1},
            "data": {"encoders": {"text_encoder_kind": "t5", **(encoders or {})}, "text": {"max_length": 8}},
            "train": {"steps": 100}}


def ema_of(model) -> dict:
    """Deterministic stand-in for EMA weights: every parameter scaled by 0.9 (buffers are left out)."""
    return {name: p.detach() * 0.9 for name, p in model.named_parameters() if p.requires_grad}


def write_checkpoint(run_dir: str | Path, step: int, model, config: dict, with_ema: bool = True) -> Path:
    """Save ``model`` (plain or FSDP2/DTensor-sharded; collective when a process group is up)."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    final = Path(run_dir) / "checkpoints" / f"step-{step:09d}"
    tmp = final.with_name(final.name + ".tmp")
    model_sd = model.state_dict()
    state = {
        "model": model_sd,
        "optimizer": {"state": {name: {"exp_avg": torch.zeros_like(p)} for name, p in list(model_sd.items())[:3]}},
        "lr_scheduler": {"last_epoch": step},
        "dataloader_dp0": {"cursor": [step, 7]},
        f"rng_rank{rank}": {"torch": torch.tensor([1, 2, 3])},
        "step": step,
    }
    if with_ema:
        state["ema"] = ema_of(model)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not distributed)
    if rank == 0:
        (tmp / "vchitect.json").write_text(json.dumps({"step": step, "config": config, "world_size": world,
                                                            "layout": {"dp_shard": world}}))
    if distributed:
        dist.barrier()
    if rank == 0:
        os.replace(tmp, final)
    if distributed:
        dist.barrier()
    return final


# ------------------------------------------------------------------ tiny encoders
def save_tokenizer(path: str | Path, max_len: int = 16) -> None:
    """A word-level tokenizer that appends ``</s>`` (like T5), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>",
                            model_max_length=max_len).save_pretrained(path)


def make_encoders(root: str | Path, d_model: int = 16) -> dict[str, Path]:
    """Tiny random T5 encoder (+ tokenizer) and AutoencoderKL (4 latent channels, ÷2) under ``root``."""
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    root = Path(root)
    torch.manual_seed(0)
    T5EncoderModel(T5Config(vocab_size=32, d_model=d_model, d_kv=4, num_heads=2, num_layers=1, d_ff=32)
                   ).save_pretrained(root / "t5")
    save_tokenizer(root / "t5")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                  sample_size=32, scaling_factor=0.5, shift_factor=0.1).save_pretrained(root / "vae")
    return {"text_encoder": root / "t5", "vae": root / "vae"}


def make_clip(root: str | Path, projection_dim: int = 16) -> Path:
    """Tiny random CLIPTextModelWithProjection (+ tokenizer): the optional pooled-vector encoder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    path = Path(root) / "clip"
    torch.manual_seed(1)
    CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, projection_dim=projection_dim, eos_token_id=2)).save_pretrained(path)
    save_tokenizer(path)
    return path


def main() -> int:
    """One rank of a sharded save: FSDP2 over all ranks on a 1-D CPU mesh, then the contract save."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--step", type=int, default=100)
    ap.add_argument("--config", required=True, help="run config as JSON")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = build_model(0)
    for block in model.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    write_checkpoint(args.run_dir, args.step, model, json.loads(args.config))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
