"""The start-up hook installed with vchitect (vchitect_diffusers_hook.pth → _vchitect_diffusers_hook):
present in every interpreter, imports neither torch, diffusers nor vchitect at start-up, and makes
``diffusers.VchitectPipeline`` resolve lazily once diffusers is imported."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

PTH = "vchitect_diffusers_hook.pth"


def fresh(code: str) -> subprocess.CompletedProcess:
    # cwd outside the repository and no PYTHONPATH: only what is installed in the interpreter counts
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=Path(sys.prefix).parent,
                          capture_output=True, text=True, timeout=300)


def test_pth_is_installed():
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    assert any((Path(d) / PTH).is_file() for d in dirs), f"{PTH} missing from {dirs}: reinstall (make setup)"


def test_hook_is_lazy_at_startup():
    proc = fresh("""
        import sys
        assert "_vchitect_diffusers_hook" in sys.modules, "start-up hook not loaded"
        heavy = [m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "vchitect", "transformers")]
        assert not heavy, heavy
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_diffusers_resolves_vchitect_pipeline_lazily():
    proc = fresh("""
        import sys
        import diffusers
        assert "vchitect" not in sys.modules, "import diffusers imported vchitect"
        assert not hasattr(diffusers, "NoSuchPipeline")
        assert diffusers.StableDiffusionPipeline.__name__ == "StableDiffusionPipeline"
        assert "vchitect" not in sys.modules
        from vchitect.export.pipeline import VchitectPipeline
        assert diffusers.VchitectPipeline is VchitectPipeline
        assert "vchitect.models.transformer" in sys.modules  # the transformer component's library
        loader = diffusers.__spec__.loader
        assert type(loader).__module__ != "_vchitect_diffusers_hook", loader  # diffusers' own loader restored
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
