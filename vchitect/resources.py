"""The files vchitect reads at run time besides its code: the YAML configs and the sbatch templates.

Their home is the repository (``configs/``, ``slurm/``); a checkout (editable install or ``PYTHONPATH``)
reads them there. A wheel carries copies as package data under ``vchitect/_resources/`` (written
into the build by ``setup.py``), so ``pip install .`` / a built wheel finds them too. Importing this
module imports nothing else (``launch.slurm`` uses it and stays torch-free).
"""

from __future__ import annotations

from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "_resources"  # in a wheel install
REPO = Path(__file__).resolve().parent.parent  # in a checkout
NAMES = ("configs", "slurm")


def resource_dir(name: str) -> Path:
    """``configs`` or ``slurm``: the wheel's copy when there is one, else the checkout's folder."""
    if name not in NAMES:
        raise ValueError(f"unknown resource folder {name!r}; one of {', '.join(NAMES)}")
    for base in (PACKAGED, REPO):
        if (base / name).is_dir():
            return base / name
    raise FileNotFoundError(f"vchitect's {name}/ folder is missing: neither {PACKAGED / name} (a wheel install) "
                            f"nor {REPO / name} (a checkout) exists; reinstall vchitect")


def checkout() -> Path | None:
    """The repository root when vchitect runs from a checkout, else None."""
    return REPO if (REPO / "pyproject.toml").is_file() and (REPO / "vchitect").is_dir() else None


__all__ = ["NAMES", "checkout", "resource_dir"]
