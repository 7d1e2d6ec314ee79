"""`vchitect demo --quick`: every stage of the demo (corpus → Ray curation → 2-process training →
sampling → diffusers export reloaded in a fresh process → outputs → summary) on a tiny budget."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_quick_demo_writes_every_output(tmp_path):
    out = tmp_path / "demo_out"
    env = dict(os.environ, WANDB_MODE="disabled")
    env.pop("WANDB_API_KEY", None)
    r = subprocess.run([sys.executable, "-m", "vchitect.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for name in ("contact_sheet.png", "loss_curve.png", "curation_report.txt", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    gifs, mp4s = sorted((out / "samples").glob("*.gif")), sorted((out / "samples").glob("*.mp4"))
    assert gifs and len(gifs) == len(mp4s)
    assert list((out / "export_samples").glob("*.gif"))
    assert (out / "export" / "model_index.json").is_file()
    assert list((out / "curation_report").glob("*.png"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["curate"]["clips"] > 0 and summary["train"]["steps"] == 4
    assert summary["export"]["max_pixel_diff"] <= 1  # the export reproduces the checkpoint's samples
    probe = summary["eval"]["probe"]
    assert probe["train"]["n"] > 0 and probe["held_out"]["n"] > 0
    assert 0 <= summary["eval"]["metrics"]["temporal_flickering"] <= 1
    assert "probe: training combos" in r.stdout and "temporal flickering" in r.stdout
    e = subprocess.run([sys.executable, "-m", "vchitect.cli", "eval", str(out / "samples")],
                       capture_output=True, text=True, timeout=300)
    assert e.returncode == 0 and "subject consistency" in e.stdout, e.stderr
