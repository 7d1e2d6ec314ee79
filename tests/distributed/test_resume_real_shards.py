"""Exact resume on real curated shards: decode mode, the MiniLM text encoder, 2 ranks, 2 loader workers
each and a shuffle buffer, killed with SIGKILL between two checkpoints (issue #14); and the same with
Many-for-Many tasks on (issue #17: data.tasks draws a task per sample, the condition adapter trains).

Every later loss, every parameter, optimizer and EMA value and the loader's counters must equal an
uninterrupted run's, bit for bit. The synthetic-data resume tests (test_trainer.py) could not see
the loader's per-stream state being dropped on resume: synthetic batches depend only on the step.
With tasks, each sample's task, condition and ``#task:`` caption must come out the same after the
resume (the resumed loader re-decodes its buffered samples in fresh worker processes): a task drawn
from anything but the sample's own generator (a worker's or the process's RNG, a per-loader counter)
would give other captions and conditions after the kill, and so other losses and weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers_run import assert_same_tensors, losses, vchitect
from vchitect.train.checkpoint import find_latest, load_tensors

COUNTERS = ("data/samples", "data/batches", "data/skipped", "data/bytes", "data/epoch")


# several tasks, among them i2v, vinp and t2v; the adapter of the demo's pixel-space model (VAE factors 1)
TASKS = ["data.tasks={t2v: 0.25, i2v: 0.25, vinp: 0.25, itrans: 0.15, vexd: 0.1}", "model.condition_channels=4",
         "model.condition_vae_spatial_factor=1", "model.condition_vae_temporal_factor=1"]


def _overrides(shards: Path, run: Path, steps: int = 10) -> list[str]:
    return [f"data.sources=[{{uri: {shards}}}]", "data.num_workers=2", "data.shuffle_buffer=3", "data.token_budget=256",
            f"train.output_dir={run}", f"train.steps={steps}", "train.checkpoint_every=4", "train.keep_checkpoints=5",
            "train.log_every=1", "train.warmup_steps=2", "train.progress=false", "train.tensorboard=false",
            "train.wandb.mode=disabled"]


def _records(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec  # the resumed run rewrites later steps: the last record wins
    return out


@pytest.fixture(scope="module")
def uninterrupted(curated_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("real_ref") / "run"
    vchitect("train", "configs/train/demo-shards.yaml", *_overrides(curated_shards, run), *TASKS, nproc=2, timeout=600)
    return run


def test_sigkill_between_checkpoints_then_resume_is_bitwise(curated_shards, uninterrupted, tmp_path):
    """One run covers both issues (each 2-rank run costs about 40 s of the suite): the loader's per-stream
    state and counters (#14), and with tasks on, the task draws and conditions (#17)."""
    run = tmp_path / "run"
    args = ("train", "configs/train/demo-shards.yaml", *_overrides(curated_shards, run), *TASKS)
    r = vchitect(*args, "train.simulate_crash=at_step:6", nproc=2, timeout=600, check=False)
    assert r.returncode != 0
    assert find_latest(run / "checkpoints").name == "step-000000004"  # killed between 4 and 8
    assert max(losses(run)) == 6
    r = vchitect(*args, nproc=2, timeout=600)
    assert "resumed from" in r.stderr and "step-000000004" in r.stderr

    ref, got = _records(uninterrupted), _records(run)
    assert sorted(got) == list(range(1, 11))
    assert {s: v["loss"] for s, v in got.items()} == {s: v["loss"] for s, v in ref.items()}
    for step in range(5, 11):  # counters carry on from the checkpoint (they used to restart at 0)
        assert {k: got[step][k] for k in COUNTERS} == {k: ref[step][k] for k in COUNTERS}, step
    assert ref[10]["data/samples"] > ref[4]["data/samples"] > 0
    final, want = run / "checkpoints" / "step-000000010", uninterrupted / "checkpoints" / "step-000000010"
    for prefix in ("model", "ema", "optimizer"):
        assert_same_tensors(load_tensors(final, prefix), load_tensors(want, prefix))
    # the conditions reached the model: its zero-initialised adapter output moved, as in the reference run
    model = load_tensors(final, "model")
    adapter = [v for k, v in model.items() if k.startswith("condition_adapter.") and "conv_out" in k]
    assert adapter and all(v.abs().sum() > 0 for v in adapter)
