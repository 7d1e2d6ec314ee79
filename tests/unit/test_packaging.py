"""Packaging rules checked in this interpreter: one setuptools floor."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_one_setuptools_floor_for_the_build_and_the_makefile():
    floor = re.search(r'requires = \["setuptools>=([\d.]+)"\]', (REPO / "pyproject.toml").read_text()).group(1)
    assert f'"setuptools>={floor}"' in (REPO / "Makefile").read_text()
    assert int(floor.split(".")[0]) >= 77  # the SPDX `license = "Apache-2.0"` string needs 77
