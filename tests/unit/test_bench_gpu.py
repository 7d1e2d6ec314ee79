"""``make bench-gpu`` (benchmarks/gpu.py): its dry run takes the same code path on CPU at a shrunk shape and
writes one JSON line per configuration; without a GPU the real run refuses with a one-line reason."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_samples_the_released_configuration_and_writes_json_lines(tmp_path, monkeypatch, capsys):
    gpu = bench_gpu()
    real = gpu.CONFIGS["sample-2b-released"]
    assert real["model"] == "configs/model/vchitect-2b.yaml" and real["latent"] == (16, 40, 54, 96)
    assert (real["dtype"], real["text_len"], real["batch_cfg"]) == ("bf16", 333, True)
    out = tmp_path / "results" / "bench-gpu.jsonl"
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--dry-run", "--steps", "2", "--out", str(out)])
    assert gpu.main() == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == row
    assert row["dry_run"] and row["device"] == "cpu" and row["model"] == "configs/model/tiny.yaml"
    assert (row["dtype"], row["cfg_batched"], row["guidance_schedule"]) == ("bf16", True, "released")
    assert row["steps"] == 2 and len(row["step_s"]) == 2 and row["time_per_step_s"] > 0 and row["finite"]
    assert row["peak_mem_gib"] > 0 and row["video_tokens"] == 3 * 4 * 4
    # the first steps of the released 100-step run, each with the scale it has there (s = 7.5)
    assert row["guidance_scales"] == pytest.approx([8.5, 6.1813, 1.0437], abs=1e-4)


def test_without_a_gpu_the_real_run_says_so(monkeypatch, capsys):
    import torch

    gpu = bench_gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu.py"])
    assert gpu.main() == 2
    assert "no CUDA device here" in capsys.readouterr().err
