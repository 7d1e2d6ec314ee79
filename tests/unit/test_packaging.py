"""Packaging rules checked in this interpreter: run-time files found in a checkout or as a wheel's package
data (vchitect/resources.py), wandb an optional extra imported only when a run enables it, one setuptools
floor. A wheel installed in a fresh environment: tests/e2e/test_wheel_install.py."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vchitect import resources

REPO = Path(__file__).resolve().parents[2]


def test_resources_come_from_the_wheel_copy_when_there_is_one(tmp_path, monkeypatch):
    assert resources.resource_dir("configs") == REPO / "configs"  # a checkout: its own folders
    assert resources.resource_dir("slurm") == REPO / "slurm"
    assert resources.checkout() == REPO
    (tmp_path / "_resources" / "slurm").mkdir(parents=True)
    monkeypatch.setattr(resources, "PACKAGED", tmp_path / "_resources")
    assert resources.resource_dir("slurm") == tmp_path / "_resources" / "slurm"
    monkeypatch.setattr(resources, "REPO", tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="configs/ folder is missing.*reinstall"):
        resources.resource_dir("configs")
    with pytest.raises(ValueError, match="unknown resource"):
        resources.resource_dir("docs")


def test_wandb_is_imported_only_when_a_run_enables_it(tmp_path):
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        import vchitect.cli, vchitect.train.trainer
        from vchitect.train.metrics import MetricWriter
        MetricWriter(Path(sys.argv[1]), True, False, "disabled", "p", {}).close()
        assert "wandb" not in sys.modules, "wandb imported without a run asking for it"
    """)
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("mode, level", [("auto", logging.INFO), ("offline", logging.WARNING)])
def test_a_run_without_the_wandb_extra_continues(tmp_path, monkeypatch, caplog, mode, level):
    from vchitect.train.metrics import _start_wandb

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb → ImportError
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    with caplog.at_level(logging.INFO, logger="vchitect.train"):
        assert _start_wandb(tmp_path, mode, "p", {}) is None
    (record,) = [r for r in caplog.records if "wandb is not installed" in r.getMessage()]
    assert record.levelno == level and "vchitect[wandb]" in record.getMessage()


def test_one_setuptools_floor_for_the_build_and_the_makefile():
    floor = re.search(r'requires = \["setuptools>=([\d.]+)"\]', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"setuptools>={floor}"' in (REPO / "Makefile").read_text()
    assert int(floor.split(".")[0]) >= 77  # the SPDX `license = "Apache-2.0"` string needs 77
