"""Acceptance: `vchitect launch --nproc 2 train configs/train/demo.yaml train.steps=20` on CPU writes
JSONL metrics, TensorBoard events, an offline wandb run and checkpoints."""

import json
import os
import subprocess
import sys


def test_demo_config_runs_and_writes_every_output(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, WANDB_API_KEY="", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY")
    r = subprocess.run([sys.executable, "-m", "vchitect.cli", "launch", "--nproc", "2", "train",
                        "configs/train/demo.yaml", "train.steps=20", f"train.output_dir={out}"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 20 and all("loss" in rec for rec in records)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
    assert (out / "checkpoints" / "step-000000020" / ".metadata").is_file()
