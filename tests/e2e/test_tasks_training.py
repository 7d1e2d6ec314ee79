"""Multi-task training on real curated shards (decode mode, MiniLM): the loader draws tasks and builds
their conditions, encode_batch makes the float condition, the trainer hands it to the condition
adapter, and the adapter (zero at the start) learns — the path from shards to gradients, end to end."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from tests.helpers_run import vchitect

TASKS = "{t2v: 0.25, i2v: 0.25, vinp: 0.25, itrans: 0.25}"


def test_multi_task_run_trains_the_condition_adapter(curated_shards, tmp_path):
    run, out = tmp_path / "run", tmp_path / "export"
    common = [f"data.sources=[{{uri: {curated_shards}}}]", "data.num_workers=0", "data.token_budget=256",
              f"train.output_dir={run}", "train.steps=4", "train.checkpoint_every=4", "train.log_every=1",
              "train.progress=false", "train.tensorboard=false", "train.wandb.mode=disabled"]
    r = vchitect("train", "configs/train/demo-shards.yaml", *common, f"data.tasks={TASKS}",
                 "model.condition_channels=4", "model.condition_vae_spatial_factor=1",
                 "model.condition_vae_temporal_factor=1", timeout=600)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4], r.stderr[-2000:]
    vchitect("export", run, out)
    weights = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    adapter_out = [v for k, v in weights.items() if k.startswith("condition_adapter.") and "conv_out" in k]
    assert adapter_out and all(v.abs().sum() > 0 for v in adapter_out)  # zero-initialised, moved by training

    # Tasks without an adapter would silently train them as text-to-video: refused before any rank starts.
    bad = vchitect("train", "configs/train/demo-shards.yaml", *common, f"data.tasks={TASKS}", check=False)
    assert bad.returncode == 2 and "model.condition_channels" in bad.stderr + bad.stdout
