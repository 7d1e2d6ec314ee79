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
    # the multi-task learning proof on the same base, every stage on a tiny budget (docs/demo.md, "Multi-task")
    tasks_out = tmp_path / "tasks_out"
    t = env.run(["vchitect", "demo", "--tasks", "--quick", "--base", str(out), "--out", str(tasks_out)],
                cwd=tmp_path, timeout=600, env={"WANDB_MODE": "disabled", "WANDB_API_KEY": ""})
    assert t.returncode == 0, t.stdout[-3000:] + t.stderr[-3000:]
    ts = json.loads((tasks_out / "tasks_summary.json").read_text())
    assert ts["train"]["steps"] == 4 and ts["shards"]["motion_clips"] == 24
    for model in ("tuned", "base_model"):
        for task in ("i2v", "itrans", "vinp", "vedit"):
            assert ts[model][task]["figures"]["n"] == 3, (model, task)
        assert ts[model]["t2v"]["figures"]["train"]["n"] > 0
    assert (tasks_out / "tasks_sheet.png").stat().st_size > 0 and (tasks_out / "tasks_sheet_base.png").is_file()
    assert "vchitect demo --tasks" in t.stdout and "removal" in t.stdout
    bad = env.run(["vchitect", "demo", "--tasks", "--base", str(tmp_path / "nothing")], cwd=tmp_path, timeout=120)
    assert bad.returncode != 0 and "not a finished `vchitect demo` output folder" in bad.stdout + bad.stderr
