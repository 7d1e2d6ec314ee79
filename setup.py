"""Build hooks only; the project's metadata is in pyproject.toml.

They ship ``vchitect_diffusers_hook.pth`` at the top of site-packages, in wheels (``build_py`` writes
it into the build tree) and in PEP 660 editable installs (``editable_wheel`` adds it to the editable
wheel next to setuptools' own ``__editable__`` files). Its one line imports ``_vchitect_diffusers_hook``
at interpreter start-up, which makes ``DiffusionPipeline.from_pretrained(folder)`` resolve
``VchitectPipeline`` without ``import vchitect`` (see that module and docs/export.md).

For wheels, ``build_py`` also copies the repository's ``configs/*/*.yaml`` and ``slurm/*.sbatch`` into
the build as package data under ``vchitect/_resources/`` (vchitect/resources.py finds them there, or
in the checkout for editable installs); MANIFEST.in puts them into sdists.
"""

import glob
import os
import shutil
import warnings

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH_NAME = "vchitect_diffusers_hook.pth"
# site.py executes .pth lines that start with "import"; a missing or broken module must stay silent.
PTH_LINE = "import sys; exec('try: import _vchitect_diffusers_hook\\nexcept Exception: pass')\n"


HERE = os.path.dirname(os.path.abspath(__file__))
RESOURCES = ("configs/**/*.yaml", "slurm/*.sbatch")  # → vchitect/_resources/configs/…, …/slurm/…


def _resources():
    return sorted(os.path.relpath(f, HERE) for pattern in RESOURCES
                  for f in glob.glob(os.path.join(HERE, pattern), recursive=True))


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        if not self.editable_mode:
            os.makedirs(self.build_lib, exist_ok=True)
            with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="ascii") as f:
                f.write(PTH_LINE)
            for rel in _resources():
                target = os.path.join(self.build_lib, "vchitect", "_resources", rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                shutil.copyfile(os.path.join(HERE, rel), target)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        if not self.editable_mode:
            outputs.append(os.path.join(self.build_lib, PTH_NAME))
            outputs += [os.path.join(self.build_lib, "vchitect", "_resources", rel) for rel in _resources()]
        return outputs


class _StrategyWithPth:
    """Wraps setuptools' editable strategy (static .pth, meta-path finder or link tree)."""

    def __init__(self, strategy):
        self.strategy = strategy

    def __call__(self, wheel, files, mapping):
        self.strategy(wheel, files, mapping)
        wheel.writestr(PTH_NAME, PTH_LINE.encode("ascii"))

    def __enter__(self):
        self.strategy.__enter__()
        return self

    def __exit__(self, *exc):
        return self.strategy.__exit__(*exc)


class editable_wheel_with_pth(editable_wheel):
    def _select_strategy(self, *args, **kwargs):
        return _StrategyWithPth(super()._select_strategy(*args, **kwargs))


if not hasattr(editable_wheel, "_select_strategy"):
    warnings.warn(f"this setuptools has no editable_wheel._select_strategy: editable installs lack {PTH_NAME}; "
                  "load exported pipelines after `import vchitect.export`", stacklevel=1)

setup(cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
