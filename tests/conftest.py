"""Suite-wide fixtures: the local S3 server (tests/s3.py), fresh environments without vchitect and with a
wheel of it (tests/envs.py), and one curated corpus of real shards.

``curated_shards`` runs the real curation CLI (Ray, PyAV, the demo's curation config) once per
suite run on a small demo corpus; every training test that needs real shards (decode mode, the
MiniLM text encoder) shares it instead of curating its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3", "tests.envs"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def curated_shards(tmp_path_factory) -> Path:
    """WebDataset shards curated from 6 clean 3-shot demo videos (plus the planted defects)."""
    from vchitect.demo.corpus import write_demo_corpus

    root = tmp_path_factory.mktemp("curated_shards")
    write_demo_corpus(str(root / "raw"), n_videos=6, shots_per_video=3, seed=0)
    out = root / "shards"
    # As a user runs it in a log (no terminal, Ray's defaults): tests/e2e/test_curate_console.py reads
    # what it printed, stdout and stderr together, from curate.log next to the shards.
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "run", str(REPO / "configs/curate/demo.yaml"),
                        f"input.path={root / 'raw' / 'manifest.jsonl'}", f"output.path={out}",
                        "output.samples_per_shard=4"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, env=env,
                       stdin=subprocess.DEVNULL)
    (root / "curate.log").write_text(r.stdout)
    assert r.returncode == 0, r.stdout[-6000:]
    assert len(list(out.glob("*.tar"))) >= 3, sorted(p.name for p in out.iterdir())
    return out
