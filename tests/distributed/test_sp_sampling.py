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


def worker(out: str) -> None:
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
    dist.destroy_process_group()


def test_sp_sampling_on_two_ranks_equals_one_process(tmp_path):
    from tests.helpers_ckpt import build_model
    from vchitect.parallel.spawn import run_local

    out = tmp_path / "sp.pt"
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{env_path}" if env_path else str(REPO)
    try:
        run_local([__file__, str(out)], nproc=2, timeout=300)
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


def test_sp_needs_a_process_group():
    import pytest

    from tests.helpers_ckpt import build_model
    from vchitect.diffusion.sampling import enable_sequence_parallel

    with pytest.raises(RuntimeError, match="torchrun"):
        enable_sequence_parallel(build_model(0))


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    worker(sys.argv[1])
