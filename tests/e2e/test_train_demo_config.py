"""Acceptance: `vchitect launch --nproc 2 train configs/train/demo.yaml train.steps=20` on CPU writes
JSONL metrics, TensorBoard events, an offline wandb run and checkpoints, and (stdout a pipe, as in
a Slurm log) prints each log step's metrics as one line, with plain progress lines."""

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

    # Not a terminal: no rich; every metric line whole (it is longer than rich's 80 columns), then
    # a progress line after the first and the last logged step.
    metric_lines = [ln for ln in r.stdout.splitlines() if ln.startswith("step ")]
    assert [ln.split(" |")[0] for ln in metric_lines] == ["step 10", "step 20"], r.stdout[-4000:]
    assert max(map(len, metric_lines)) > 80
    for ln in metric_lines:
        for label in ("loss", "grad_norm", "lr", "samples/s", "tokens/s", "TFLOP/s", "mem GiB", "data wait"):
            assert f"| {label} " in ln, ln
    progress = [ln for ln in r.stdout.splitlines() if ln.startswith("train: step ")]
    assert len(progress) == 2 and progress[-1].startswith("train: step 20/20 (100%), "), r.stdout[-4000:]
    assert all(" steps/s, elapsed " in ln and ", ETA " in ln for ln in progress), progress
    assert "\x1b[" not in r.stdout and "━" not in r.stdout
