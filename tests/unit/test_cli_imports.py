"""The light commands stay light: `vchitect --help`, `--version`, `config show|describe`, a `sample` of a
path that holds nothing, and the same `vchitect-curate` commands import none of torch, diffusers, ray,
transformers (nor numpy, which torch needs, nor rich, except for the coloured error line of `sample`),
and still do their job.

Each command runs in a fresh interpreter under ``-X importtime``, which lists every module imported,
start-up included. Timings are in benchmarks/RESULTS.md ("CLI start-up"), not asserted here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "diffusers", "ray", "transformers", "numpy", "rich"}

LIGHT_COMMANDS = {
    "vchitect --help": (["vchitect.cli", "--help"], 0, "usage: vchitect"),
    "vchitect --version": (["vchitect.cli", "--version"], 0, "vchitect "),
    "vchitect config show": (["vchitect.cli", "config", "show", "configs/model/tiny.yaml", "model.num_layers=3"], 0,
                             "num_layers: 3"),
    "vchitect config describe": (["vchitect.cli", "config", "describe"], 0, "| `model.num_layers` |"),
    "vchitect sample (nothing there)": (["vchitect.cli", "sample", "no/such/export", "--prompt", "a cat",
                                         "--out", "never.gif"], 2, "neither an export folder nor a checkpoint"),
    "vchitect-curate --help": (["data_pipeline.cli", "--help"], 0, "usage: vchitect-curate"),
    "vchitect-curate --version": (["data_pipeline.cli", "--version"], 0, "vchitect-curate "),
    "vchitect-curate config show": (["data_pipeline.cli", "config", "show", "configs/curate/default.yaml"], 0,
                                    "samples_per_shard: 1000"),
    "vchitect-curate config describe": (["data_pipeline.cli", "config", "describe"], 0, "| `clip.crf` |"),
}


def imported_modules(stderr: str) -> set[str]:
    """Top-level package names of every module in ``-X importtime`` output."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("name", list(LIGHT_COMMANDS))
def test_light_command_imports_nothing_heavy(name):
    argv, code, expected = LIGHT_COMMANDS[name]
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", *argv], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    output = r.stdout + r.stderr
    assert r.returncode == code, output[-3000:]
    assert expected in output
    modules = imported_modules(r.stderr)
    assert "argparse" in modules  # the importtime listing was read
    heavy = modules & (HEAVY - {"rich"} if code else HEAVY)  # a user error is printed with rich
    assert not heavy, f"`{name}` imported {sorted(heavy)}"


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
