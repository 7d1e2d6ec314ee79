"""The tiny CPU training run shared by the tests that start real runs (tests/distributed, tests/slurm):
its config, the CLI as a subprocess (also under a pseudo-terminal: :func:`run_cli`), and the comparisons
of two runs (losses, tensors)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
VCHITECT = [sys.executable, "-m", "vchitect.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # one thread per rank on a small machine

# The tiny model on synthetic data: 12 steps, checkpoints at 6 and 12; a section given to
# write_config updates (not replaces) the one here.
TINY_RUN = {
    "include": str(REPO / "configs/model/tiny.yaml"),
    "parallel": {"dp_shard": -1},
    "data": {"source": "synthetic", "buckets": [{"height": 8, "width": 8, "frames": 3}],
             "vae_spatial_factor": 1, "vae_temporal_factor": 1, "token_budget": 96, "text": {"max_length": 6},
             "num_workers": 0},
    "diffusion": {"text_dropout": 0.2},
    "train": {"steps": 12, "lr": 1e-3, "warmup_steps": 2, "schedule": "cosine", "weight_decay": 0.01,
              "ema_decay": 0.9, "checkpoint_every": 6, "keep_checkpoints": 5, "log_every": 1, "progress": False,
              "tensorboard": False, "wandb": {"mode": "disabled"}},
}


def strip_terminal(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "")


def run_cli(args: list[str], in_pty: bool = False, timeout: float = 300,
            env: dict | None = None) -> tuple[int, str, float]:
    """(exit code, stdout + stderr, seconds) of ``python -m vchitect.cli ARGS``; under a pseudo-terminal
    80 columns wide when ``in_pty`` (rich then colours and would wrap at 80). ``env``: default :data:`ENV`."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    env = ENV if env is None else env
    cmd = [sys.executable, "-m", "vchitect.cli", *args]
    t0 = time.time()
    if not in_pty:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return r.returncode, r.stdout + r.stderr, time.time() - t0
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=dict(env, TERM="xterm-256color"))
    os.close(slave)
    out = b""
    try:
        while time.time() - t0 < timeout:
            if select.select([master], [], [], 1.0)[0]:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the terminal has gone
                    break
                if not chunk:
                    break
                out += chunk
        code = proc.wait(timeout=30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    return code, strip_terminal(out.decode(errors="replace")), time.time() - t0


def write_config(tmp: Path, name: str = "run.yaml", **sections) -> Path:
    """``tmp/name``: :data:`TINY_RUN` with each of ``sections`` merged into its section."""
    cfg = json.loads(json.dumps(TINY_RUN))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def vchitect(*args, nproc: int | None = None, timeout: float = 300, check: bool = True):
    """``vchitect ARGS…`` (under ``vchitect launch --nproc N`` when ``nproc``), output captured."""
    cmd = list(VCHITECT)
    if nproc:
        cmd += ["launch", "--nproc", str(nproc)]
    r = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=ENV)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return r


def losses(run_dir: Path) -> dict[int, float]:
    """step → loss of a run's metrics.jsonl."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # a resumed run rewrites later steps; the last record wins
    return out


def assert_same_tensors(a: dict, b: dict, exact: bool = True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
