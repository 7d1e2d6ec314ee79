"""The README's commands run as written, in order, in a fresh folder (issue #15).

Only the budgets shrink (fewer raw videos, fewer steps); every command is taken from README.md, so
the walk-through cannot drift from what works. The folder holds links to the checkout's configs/
and to this interpreter's virtual environment as `.venv`, exactly the relative paths the README uses.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORTER = {"--n 16": "--n 3", "train.steps=20": "train.steps=2"}
# covered elsewhere, where they run once per suite: tests/e2e/test_demo_quick.py runs both (from a wheel)
ELSEWHERE = {".venv/bin/vchitect demo --quick", ".venv/bin/vchitect eval demo_out/samples"}


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(".venv/bin/")]


def test_the_readme_shows_the_walk_through():
    commands = readme_commands()
    assert ELSEWHERE <= set(commands)  # what is skipped here is still in the README
    def first(words: str) -> int:
        return next(i for i, c in enumerate(commands) if words in c)

    # curate → train on those shards → export that run → sample that export
    assert (first("vchitect-curate run") < first("train configs/train/demo-shards.yaml")
            < first("vchitect export runs/demo out/demo") < first("vchitect sample out/demo"))
    assert "output.path=data/shards" in commands[first("vchitect-curate run")]


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    (tmp_path / "configs").symlink_to(REPO / "configs")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    env.pop("WANDB_API_KEY", None)
    ran = []
    for command in readme_commands():
        if command in ELSEWHERE:
            continue
        for long, short in SHORTER.items():
            command = command.replace(long, short)
        r = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=900, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"{command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        ran.append(command)
    assert len(ran) >= 8
    assert list((tmp_path / "data" / "shards").glob("*.tar"))
    assert (tmp_path / "out" / "demo" / "model_index.json").is_file()
    from PIL import Image

    with Image.open(tmp_path / "red.gif") as gif:
        assert gif.n_frames > 1
