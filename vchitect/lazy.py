"""Packages whose public names are imported on first use, so that importing one light submodule
(``vchitect.data.config``, ``vchitect.parallel.config``) does not import torch with the rest.

    # vchitect/data/__init__.py
    from vchitect.lazy import lazy_exports
    lazy_exports(__name__, {"build_loader": "loader", "DataConfig": "config", …})

``from vchitect.data import build_loader`` and ``vchitect.data.build_loader`` keep working: the
first access imports ``vchitect.data.loader`` (PEP 562 module ``__getattr__``) and keeps the value
on the package.
"""

from __future__ import annotations

import importlib
import sys
import types


class _Package(types.ModuleType):
    """A package with lazy exports. When a submodule is imported, the import system binds it on the
    package under its own name; for a submodule named like the function it exports
    (``vchitect.parallel.parallelize``) the package keeps the function, as an eager
    ``from .parallelize import parallelize`` in ``__init__`` did."""

    def __setattr__(self, name, value):
        exports = self.__dict__.get("_lazy_exports", {})
        if isinstance(value, types.ModuleType) and exports.get(name) == name and \
                value.__name__ == f"{self.__name__}.{name}" and hasattr(value, name):
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, str]) -> None:
    """Give ``package`` (its ``__name__``) the attributes ``exports`` maps to their submodules,
    imported when first used; sets ``__all__`` to the exported names."""
    module = sys.modules[package]

    def __getattr__(name: str):
        sub = exports.get(name)
        if sub is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{sub}"), name)
        setattr(module, name, value)
        return value

    def __dir__():
        return sorted(set(module.__dict__) | set(exports))

    module.__class__ = _Package
    module._lazy_exports = dict(exports)
    module.__getattr__ = __getattr__
    module.__dir__ = __dir__
    module.__all__ = list(exports)
