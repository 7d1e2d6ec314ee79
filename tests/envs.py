"""Fresh Python environments for the tests that need another interpreter than the one running pytest.

``env_without_vchitect``: a virtual environment with torch, diffusers, transformers (everything the
running interpreter has) but **no vchitect**: no package, no start-up hook, no editable finder — where
an export folder must load from its own code (``trust_remote_code=True``).

``env_with_vchitect_wheel``: a virtual environment holding a **wheel** of this checkout, installed
non-editably (built from the files git tracks, plus untracked ones it does not ignore, copied out of
the tree so that nothing the checkout has beside them can leak in) — for the packaging checks.

Both are built once per test session and cheaply (≈ 0.1 s for the first, ≈ 3–6 s for the wheel): a
``python -m venv --without-pip`` and one ``.pth`` file that adds the running interpreter's
site-packages as a *plain path*. ``site`` processes ``.pth`` files only in the site directories it
adds itself, not in a directory a ``.pth`` line appends, so the running environment's own ``.pth``
files — setuptools' editable finder for vchitect and ``vchitect_diffusers_hook.pth`` — stay inactive
there, while its installed distributions (torch and the rest) are importable; the wheel goes into the
new environment's own site-packages (``--no-deps``), ahead of that path. Its pip is the running one,
so nothing is downloaded. Each fixture checks what it promises (``import vchitect`` fails in the
first; in the second it comes from the wheel) before any test uses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pytest

REPO = Path(__file__).resolve().parents[1]
IGNORED_DIRS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache"}


@dataclass
class Env:
    """A virtual environment under ``root`` and how to run things in it (cwd ``root/work`` by default:
    outside the repository, so that nothing of the checkout is importable by accident)."""

    root: Path
    build_seconds: float = 0.0
    wheel: Optional[Path] = None
    info: dict = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        return Path(self.probe("import sysconfig; print(sysconfig.get_paths()['purelib'])"))

    def environ(self, extra: Optional[dict] = None) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_MODULES_CACHE=str(self.root / "hf_modules"), PATH=f"{self.root / 'bin'}:{env.get('PATH', '')}")
        env.update(extra or {})
        return env

    def run(self, argv: list[str], cwd: Optional[Path] = None, env: Optional[dict] = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """Run ``argv`` in this environment; ``argv[0]`` is ``python`` or one of its console scripts."""
        exe = self.python if argv[0] == "python" else self.root / "bin" / argv[0]
        work = cwd or self.root / "work"
        work.mkdir(parents=True, exist_ok=True)
        return subprocess.run([str(exe), *argv[1:]], cwd=work, env=self.environ(env), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def probe(self, code: str) -> str:
        r = self.run(["python", "-c", code], timeout=120)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()


def _dependency_dirs() -> list[str]:
    """Where the running interpreter finds its packages: its site-packages and, should they live elsewhere
    (pytest run from an environment built like these), the folders of pip, setuptools, torch and diffusers."""
    import importlib.util

    dirs = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for name in ("pip", "setuptools", "torch", "diffusers", "transformers"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            dirs.append(str(Path(spec.origin).parent.parent))
    return list(dict.fromkeys(dirs))


def _new_env(root: Path) -> Env:
    """A venv whose only addition is the running interpreter's site-packages as plain sys.path entries."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    env = Env(root)
    own = Path(env.probe("import sysconfig; print(sysconfig.get_paths()['purelib'])"))
    (own / "_vchitect_test_dependencies.pth").write_text("".join(f"{d}\n" for d in _dependency_dirs()))
    return env


def _checkout_files(repo: Path) -> list[str]:
    """The files a build of the checkout may see: git's tracked and not-ignored ones (or, outside git,
    everything but virtual environments, build output and caches)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=repo,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        return [f for f in out.split("\0") if f and (repo / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirs, names in os.walk(repo):
            dirs[:] = [d for d in dirs if d not in IGNORED_DIRS and not d.endswith(".egg-info")]
            files += [os.path.relpath(os.path.join(dirpath, n), repo) for n in names]
        return files


def build_wheel(repo: Path, out: Path) -> tuple[Path, str]:
    """A wheel of ``repo`` built by the running interpreter's pip from a copy of the checkout's files,
    and the build's output (pip -v: the build backend's warnings included)."""
    src = out / "src"
    for rel in _checkout_files(repo):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / rel, src / rel)
    wheels = out / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                        "-v", "-c", str(repo / "constraints.txt"), "-w", str(wheels), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (wheel,) = wheels.glob("vchitect-*.whl")
    return wheel, r.stdout + r.stderr


@pytest.fixture(scope="session")
def env_without_vchitect(tmp_path_factory) -> Env:
    t0 = time.perf_counter()
    env = _new_env(tmp_path_factory.mktemp("env_without_vchitect"))
    found = env.probe("import importlib.util as u; print([m for m in ('vchitect', '_vchitect_diffusers_hook', "
                      "'data_pipeline', 'launch') if u.find_spec(m)], u.find_spec('diffusers') is not None)")
    assert found == "[] True", f"the environment without vchitect is not one: {found}"
    env.build_seconds = time.perf_counter() - t0
    return env


@pytest.fixture(scope="session")
def env_with_vchitect_wheel(tmp_path_factory) -> Env:
    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("env_with_vchitect_wheel")
    wheel, log = build_wheel(REPO, root / "build")
    env = _new_env(root / "venv")
    r = env.run(["python", "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
                 "-c", str(REPO / "constraints.txt"), str(wheel)], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    site = env.site_packages
    where = env.probe("import sys; at_start = '_vchitect_diffusers_hook' in sys.modules; "
                      "import vchitect, launch, data_pipeline, _vchitect_diffusers_hook as h; "
                      "print(vchitect.__file__, launch.__file__, data_pipeline.__file__, h.__file__, at_start)")
    *files, hook_at_startup = where.split()
    assert all(Path(f).is_relative_to(site) for f in files), f"not the wheel's copy: {files} (expected under {site})"
    assert hook_at_startup == "True", "the wheel's vchitect_diffusers_hook.pth did not run at start-up"
    env.wheel, env.info["build_log"], env.build_seconds = wheel, log, time.perf_counter() - t0
    return env
