"""``data.encoders.shard``: the sd3 stack's T5, FSDP2-sharded over 2 gloo ranks, gives the single-process
outputs, each rank encoding its own prompts (and a rank whose prompts are all cached still joins the
all-gathers of the other's forward)."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers_models import save_tiny_sd3_encoders

WORLD = 2
PROMPTS = [["a red circle moves from left to right", ""], ["the video shows a blue square", "green triangle"]]
MAX_LENGTH = 77 + 32


def _worker(rank: int, folder: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from vchitect.config import from_dict
        from vchitect.data import DataConfig
        from vchitect.data.encode import load_encoders

        cfg = from_dict(DataConfig, {"source": "synthetic", "text": {"max_length": MAX_LENGTH, "masks": "masked"},
                                     "encoders": {"text_encoder_kind": "sd3", "text_encoder_path": folder,
                                                  "dtype": "float32", "shard": True, "text_cache_size": 8}})
        _, enc = load_encoders(cfg, "cpu", shard_mesh=init_device_mesh("cpu", (WORLD,)))
        block = enc.model.encoder.block[0].layer[0].SelfAttention.q.weight
        assert isinstance(block, DTensor) and block.to_local().shape[0] == block.shape[0] // WORLD
        results = [enc.encode(PROMPTS[rank])]
        # rank 0 asks again for its (cached) prompts while rank 1 encodes new ones: both run the forward
        results.append(enc.encode(PROMPTS[rank] if rank == 0 else ["a new prompt"]))
        torch.save([tuple(t.clone() for t in r) for r in results], f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sharded_t5_equals_the_single_process_encoder(tmp_path):
    from vchitect.models.encoders import load_text_encoder

    folder = save_tiny_sd3_encoders(str(tmp_path / "sd3"))
    mp.start_processes(_worker, args=(folder, str(tmp_path), _free_port()), nprocs=WORLD, start_method="fork")
    ref = load_text_encoder(folder, "sd3", max_length=MAX_LENGTH, masks="masked")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        second = PROMPTS[rank] if rank == 0 else ["a new prompt"]
        for result, prompts in zip(got, (PROMPTS[rank], second)):
            expect = ref.encode(prompts)
            assert result[0].shape == (len(prompts), MAX_LENGTH, 96)
            assert torch.equal(result[1], expect[1])
            assert torch.equal(result[0], expect[0]) and torch.equal(result[2], expect[2])  # bit for bit


def test_trainer_runs_with_a_sharded_sd3_encoder(tmp_path):
    """`vchitect launch --nproc 2` with data.encoders.shard: the trainer shards the T5 over its FSDP mesh; the
    null text, the (precomputed, synthetic) batches and validation sampling keep the ranks' forwards in step."""
    from tests.helpers_run import vchitect, write_config

    folder = save_tiny_sd3_encoders(str(tmp_path / "sd3"))
    cfg = write_config(
        tmp_path, model={"in_channels": 3, "joint_attention_dim": 96, "pooled_projection_dim": 80},
        data={"text": {"max_length": MAX_LENGTH, "masks": "released"},
              "encoders": {"text_encoder_path": folder, "text_encoder_kind": "sd3", "dtype": "float32",
                           "shard": True}},
        train={"output_dir": str(tmp_path / "run"), "steps": 2, "checkpoint_every": 0,
               "validation": {"every": 2, "prompts": ["a red circle"], "steps": 1, "frames": 1, "height": 8,
                              "width": 8}})
    vchitect("train", cfg, nproc=2)
    assert (tmp_path / "run" / "samples" / "step-000000002" / "00.gif").is_file()
