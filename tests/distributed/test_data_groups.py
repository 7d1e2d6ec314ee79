"""4 gloo processes as DP=2 × SP=2: SP ranks get identical batches, DP ranks disjoint ones, both equal
to a single-process reference; the VAE work of a batch is split across the SP group and all-gathered.

The processes are forked (the parent holds no process group): spawning would re-import the whole
package in each of them, which costs more than the test itself on a small CPU machine."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vchitect.config import from_dict
from vchitect.data import DataConfig, ShardLoader, vae_encode_split
from vchitect.data.encode import pixels_to_unit
from tests.helpers_data import make_clip, sample, write_shard

WORLD, SP, STEPS = 4, 2, 3


def _cfg(root) -> DataConfig:
    return from_dict(DataConfig, {
        "sources": [{"uri": str(root / "shards")}], "mode": "decode", "fps": 12.0, "num_workers": 0,
        "buckets": [{"height": 16, "width": 16, "frames": 5}], "token_budget": 12, "max_batch_size": 3,
        "seed": 3})


def _worker(rank: int, root, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        sp_group, dp_rank = groups[rank // SP], rank // SP
        encode = _tiny_encoder()
        loader = ShardLoader(_cfg(root), dp_rank=dp_rank, dp_size=WORLD // SP)
        it, out = iter(loader), []
        for _ in range(STEPS):
            batch = next(it)
            x = pixels_to_unit(batch["pixels"])  # B=3 over SP=2: one rank encodes a repeat
            out.append({"keys": batch["keys"], "pixels": batch["pixels"],
                        "latents": vae_encode_split(encode, x, sp_group)})
        torch.save(out, root / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _tiny_encoder():
    """A stand-in for a VAE encoder (the real wrappers are tested in unit/test_data_encoders.py):
    B×3×F×H×W → B×4×F×H/2×W/2, the same weights in every process. Importing diffusers in four
    spawned processes would cost more than the rest of this test."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(3, 4, (1, 2, 2), stride=(1, 2, 2))
    return lambda x: torch.tanh(conv(x)).detach()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    clip = make_clip(40, 40, 12)
    for s in range(4):
        write_shard(str(root / "shards" / f"g-{s:06d}.tar"),
                    [sample(f"g{s}_{i:04d}", 40, 40, 12, clip=clip) for i in range(5)])
    return root


def test_sp_ranks_identical_dp_ranks_disjoint_vae_split(root):
    mp.start_processes(_worker, args=(root, _free_port()), nprocs=WORLD, start_method="fork")
    got = [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    encode = _tiny_encoder()
    for dp_rank in range(WORLD // SP):
        ref_it = iter(ShardLoader(_cfg(root), dp_rank=dp_rank, dp_size=WORLD // SP))
        for step in range(STEPS):
            ref = next(ref_it)
            expect = encode(pixels_to_unit(ref["pixels"]))
            for r in range(dp_rank * SP, (dp_rank + 1) * SP):  # every rank of the SP group
                b = got[r][step]
                assert b["keys"] == ref["keys"] and torch.equal(b["pixels"], ref["pixels"])
                assert b["latents"].shape == expect.shape == (3, 4, 5, 8, 8)
                assert torch.allclose(b["latents"], expect, atol=1e-5)
    keys = [{k for b in got[r] for k in b["keys"]} for r in (0, 2)]
    assert len(keys[0]) == len(keys[1]) == 3 * STEPS and not keys[0] & keys[1]
