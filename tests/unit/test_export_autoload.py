"""The start-up hook installed with vchitect (vchitect_diffusers_hook.pth → _vchitect_diffusers_hook):
present in every interpreter, imports neither torch, diffusers nor vchitect at start-up, makes
``diffusers.VchitectPipeline`` resolve lazily once diffusers is imported, and answers diffusers' loader
for an export's entry files with the installed classes when ``trust_remote_code`` is not given."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PTH = "vchitect_diffusers_hook.pth"


@pytest.fixture(params=["dev-install", "wheel"])
def fresh(request):
    """Runs code in a fresh interpreter where only what is installed counts (cwd outside the repository,
    no PYTHONPATH): the one running the tests (``make setup``'s editable install) and one holding a
    wheel of this checkout (tests/envs.py)."""
    if request.param == "wheel":
        env = request.getfixturevalue("env_with_vchitect_wheel")
        return lambda code: env.run(["python", "-c", textwrap.dedent(code)], timeout=300)

    def run(code: str) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=Path(sys.prefix).parent,
                              capture_output=True, text=True, timeout=300)

    return run


def test_pth_is_installed():
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    assert any((Path(d) / PTH).is_file() for d in dirs), f"{PTH} missing from {dirs}: reinstall (make setup)"


def test_hook_is_lazy_at_startup(fresh):
    proc = fresh("""
        import sys
        assert "_vchitect_diffusers_hook" in sys.modules, "start-up hook not loaded"
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "vchitect", "transformers")]
        assert not heavy, heavy
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_diffusers_resolves_vchitect_lazily(fresh):
    """``diffusers.VchitectPipeline`` (exports with a string _class_name) and diffusers' loader of a folder's
    code (newer exports): both answered by the installed vchitect, imported only when asked for."""
    proc = fresh("""
        import sys
        import diffusers
        assert "vchitect" not in sys.modules, "import diffusers imported vchitect"
        assert not hasattr(diffusers, "NoSuchPipeline")
        assert diffusers.StableDiffusionPipeline.__name__ == "StableDiffusionPipeline"
        import diffusers.pipelines.pipeline_loading_utils as plu
        assert "vchitect" not in sys.modules, "importing diffusers' loader imported vchitect"
        for module in (diffusers, plu):  # diffusers' own loaders restored
            assert type(module.__spec__.loader).__module__ != "_vchitect_diffusers_hook", module.__spec__.loader
        load = plu.get_class_from_dynamic_module
        assert getattr(load, "_vchitect_hook", False), load
        # the entry files of an export, without trust_remote_code: nothing is read, the installed vchitect answers
        cls = load("/nowhere", module_file="vchitect_pipeline.py", class_name="VchitectPipeline")
        assert cls.__module__ == "vchitect.export.pipeline", cls
        cls = load("/nowhere/transformer", module_file="vchitect_transformer.py", class_name="VchitectTransformer3DModel")
        assert cls.__module__ == "vchitect.models.transformer", cls
        for kwargs in ({"module_file": "pipeline.py", "class_name": "VchitectPipeline"},  # not ours: diffusers refuses
                       {"module_file": "vchitect_pipeline.py", "class_name": "VchitectPipeline",
                        "trust_remote_code": True}):  # trusted: diffusers loads the folder's code (none here)
            try:
                load("/nowhere", **kwargs)
            except Exception:
                pass
            else:
                raise AssertionError(kwargs)
        from vchitect.export.pipeline import VchitectPipeline
        assert diffusers.VchitectPipeline is VchitectPipeline
        assert "vchitect.models.transformer" in sys.modules  # the transformer component's library
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
