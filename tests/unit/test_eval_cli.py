"""`vchitect eval VIDEOS_DIR` reads GIF/MP4 videos, their prompts, and prints metrics and the probe."""

import json
import subprocess
import sys

import numpy as np

from data_pipeline.synthetic import Shot, render_shot
from vchitect.eval.cli import evaluate_folder, find_videos, read_video
from vchitect.export.cli import write_video


def test_eval_folder_of_generator_clips(tmp_path):
    prompts = {}
    for i, (color, direction) in enumerate([("red", "left to right"), ("blue", "bottom to top")]):
        shot = Shot(color, "circle", direction, (245, 245, 245), seconds=1.0)
        frames = np.stack(render_shot(shot, 32, 32, fps=8.0)).astype(np.float32) / 255
        write_video(frames, tmp_path / f"v{i}.gif")
        write_video(frames, tmp_path / f"v{i}.mp4")
        prompts[f"v{i}"] = shot.caption
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    assert [p.suffix for p in find_videos(tmp_path).values()] == [".gif", ".gif"]
    assert read_video(tmp_path / "v0.mp4").shape == (8, 32, 32, 3)
    res = evaluate_folder(tmp_path, held_out=[("blue", "bottom to top")])
    assert res["probe"]["train"]["color"] == 1.0 and res["probe"]["train"]["direction"] == 1.0
    assert res["probe"]["held_out"]["n"] == 1 and res["probe"]["held_out"]["both"] == 1.0
    assert 0.9 < res["metrics"]["temporal_flickering"] <= 1.0
    r = subprocess.run([sys.executable, "-m", "vchitect.cli", "eval", str(tmp_path), "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "coincide here: both use pixel features" in " ".join(r.stdout.split())
    assert "temporal flickering" in r.stdout and json.loads((tmp_path / "r.json").read_text())["metrics"]["videos"] == 2


def test_features_note_only_when_both_consistencies_use_pixels():
    from vchitect.eval.cli import features_note

    pixels = {"subject_features": "pixels", "background_features": "pixels"}
    assert "--subject-features dino:PATH" in features_note(pixels)
    assert features_note({"subject_features": "dino", "background_features": "clip"}) is None
    assert features_note({"subject_features": "pixels", "background_features": "clip"}) is None
