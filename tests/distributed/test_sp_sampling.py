"""Sequence-parallel sampling on 2 gloo processes equals single-process sampling (with CFG, with
FasterCache, and with a token count that does not divide by the number of ranks).

Run as a script (by the test, through ``vchitect.parallel.spawn.run_local``) it is one rank."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# name: (latent frames, height, width, FasterCache?)
CASES = {"cfg": (3, 8, 8, False), "nondivisible": (2, 10, 6, False), "fastercache": (3, 8, 8, True)}
STEPS = 4


def inputs(frames: int, height: int, width: int):
    from vchitect.diffusion.sampling import TextCondition

    g = torch.Generator().manual_seed(11)
    noise = torch.randn(1, 4, frames, height, width, generator=g)
    cond = TextCondition(torch.randn(1, 5, 16, generator=g), torch.randn(1, 16, generator=g),
                         torch.tensor([[True, True, True, False, False]]))
    uncond = TextCondition(torch.randn(1, 5, 16, generator=g) * 0.1, torch.randn(1, 16, generator=g) * 0.1,
                           torch.tensor([[True, False, False, False, False]]))
    return noise, cond, uncond


def run_case(model, name: str) -> torch.Tensor:
    from vchitect.diffusion.fastercache import FasterCacheConfig
    from vchitect.diffusion.sampling import flow_sigmas, sample

    frames, height, width, cached = CASES[name]
    noise, cond, uncond = inputs(frames, height, width)
    fc = FasterCacheConfig(attention_start=0.2, cfg_start=0.4, cfg_interval=2) if cached else None
    return sample(model, noise, cond, uncond, sigmas=flow_sigmas(STEPS, 2.0), guidance_scale=4.0, fastercache=fc)


def sample_args(pipe: str, out: str):
    import argparse

    from vchitect.export.cli import add_sample_parser

    parser = argparse.ArgumentParser()
    add_sample_parser(parser.add_subparsers())
    return parser.parse_args(["sample", pipe, "--prompt", "a red car", "--frames", "3", "--height", "16", "--width",
                              "16", "--steps", "3", "--guidance-scale", "4", "--out", out])


def gif_frames(path) -> "np.ndarray":
    import numpy as np
    from PIL import Image, ImageSequence

    with Image.open(path) as im:
        return np.stack([np.asarray(f.convert("RGB"), dtype=np.int16) for f in ImageSequence.Iterator(im)])


def worker(out: str, pipe: str) -> None:
    import torch.distributed as dist

    from tests.helpers_ckpt import build_model
    from vchitect.diffusion.sampling import enable_sequence_parallel

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    model = build_model(0)
    mesh = enable_sequence_parallel(model)
    assert mesh.size() == dist.get_world_size() == 2
    seen = []  # video tokens per frame that the first block sees on this rank
    model.transformer_blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    results = {}
    for name in CASES:
        seen.clear()
        results[name] = run_case(model, name)
        results[name + "/tokens"] = sorted(set(seen))
    if dist.get_rank() == 0:
        torch.save(results, out)
    # `vchitect sample` under a multi-rank launch: sequence parallel over all ranks, rank 0 writes
    args = sample_args(pipe, out + f".rank{dist.get_rank()}.gif")
    assert args.func(args) == 0
    dist.destroy_process_group()


def test_sp_sampling_on_two_ranks_equals_one_process(tmp_path):
    from tests.helpers_ckpt import build_model, make_encoders, run_config, write_checkpoint
    from vchitect.export import export
    from vchitect.parallel.spawn import run_local

    enc = make_encoders(tmp_path / "enc")
    cfg = run_config(encoders={"text_encoder_path": str(enc["text_encoder"]), "vae_path": str(enc["vae"])})
    write_checkpoint(tmp_path / "run", 1, build_model(0), cfg)
    pipe = export(tmp_path / "run", tmp_path / "pipe")
    out = tmp_path / "sp.pt"
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{env_path}" if env_path else str(REPO)
    try:
        run_local([__file__, str(out), str(pipe)], nproc=2, timeout=300)
    finally:
        if env_path:
            os.environ["PYTHONPATH"] = env_path
        else:
            os.environ.pop("PYTHONPATH")
    got = torch.load(out)
    model = build_model(0)
    for name, (_, height, width, _) in CASES.items():
        tokens = (height // 2) * (width // 2)
        assert got[name + "/tokens"] == [-(-tokens // 2)], name  # each rank holds half the tokens
        expected = run_case(model, name)
        diff = (got[name] - expected).abs().max().item()
        assert diff < 1e-5, (name, diff)
    assert not (tmp_path / "sp.pt.rank1.gif").exists()  # only rank 0 writes
    single = sample_args(str(pipe), str(tmp_path / "single.gif"))
    assert single.func(single) == 0
    a, b = gif_frames(tmp_path / "sp.pt.rank0.gif"), gif_frames(tmp_path / "single.gif")
    assert a.shape == b.shape == (3, 16, 16, 3) and abs(a - b).mean() < 0.5


def test_sp_needs_a_process_group():
    import pytest

    from tests.helpers_ckpt import build_model
    from vchitect.diffusion.sampling import enable_sequence_parallel

    with pytest.raises(RuntimeError, match="torchrun"):
        enable_sequence_parallel(build_model(0))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(sys.argv[1], sys.argv[2])
