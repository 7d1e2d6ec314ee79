"""Importing a config costs no torch: the section configs need only :mod:`vchitect.config_base` (no
cycle through :mod:`vchitect.config`), and the packages they live in import the rest on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_section_configs_import_without_the_run_config():
    """No cycle: every section config (and the curation config) needs only vchitect.config_base."""
    sections = ["vchitect.data.config", "vchitect.diffusion.config", "vchitect.parallel.config",
                "vchitect.train.config", "data_pipeline.config"]
    code = (f"import importlib, sys\nfor name in {sections!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(m for m in ('vchitect.config', 'torch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_lazy_exports_resolve_on_first_use_and_keep_functions_named_like_their_module(tmp_path, monkeypatch):
    """`vchitect.parallel.parallelize` is a function and a submodule: importing the submodule first
    must not leave the module where the package's function was (as the eager __init__ guaranteed)."""
    pkg = tmp_path / "lazy_demo_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from vchitect.lazy import lazy_exports\n"
                                     "lazy_exports(__name__, {'work': 'work', 'Thing': 'things'})\n")
    (pkg / "work.py").write_text("def work():\n    return 'done'\n")
    (pkg / "things.py").write_text("class Thing:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    package = importlib.import_module("lazy_demo_pkg")
    try:
        assert "lazy_demo_pkg.things" not in sys.modules and sorted(package.__all__) == ["Thing", "work"]
        importlib.import_module("lazy_demo_pkg.work")  # the submodule first, as `from pkg.work import x` would
        from lazy_demo_pkg import Thing, work

        assert work() == "done" and Thing.__module__ == "lazy_demo_pkg.things"
        with pytest.raises(ImportError):
            from lazy_demo_pkg import nothing  # noqa: F401
    finally:
        for name in [m for m in sys.modules if m.startswith("lazy_demo_pkg")]:
            del sys.modules[name]
