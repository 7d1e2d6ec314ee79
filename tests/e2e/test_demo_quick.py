"""`vchitect demo --quick`: every stage of the demo (corpus → Ray curation → 2-process training →
sampling → diffusers export reloaded in a fresh process → outputs → summary) on a tiny budget — run
from a non-editable install (a wheel of this checkout in a fresh environment, tests/envs.py) with the
cwd outside the repository, so it proves the packaged configs too (issue #15)."""

import json

import pytest


@pytest.mark.slow
def test_quick_demo_writes_every_output(env_with_vchitect_wheel, tmp_path):
    out = tmp_path / "demo_out"
    env = env_with_vchitect_wheel
    r = env.run(["vchitect", "demo", "--quick", "--out", str(out)], cwd=tmp_path, timeout=600,
                env={"WANDB_MODE": "disabled", "WANDB_API_KEY": ""})
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
    e = env.run(["vchitect", "eval", str(out / "samples")], cwd=tmp_path, timeout=300)
    assert e.returncode == 0 and "subject consistency" in e.stdout, e.stderr
