"""Start-up hook that lets ``DiffusionPipeline.from_pretrained`` find ``VchitectPipeline`` without an import.

Installed with the vchitect distribution (wheel and editable installs alike) together with
``vchitect_diffusers_hook.pth`` in site-packages, whose one line imports this module when the
interpreter starts. diffusers 0.42 resolves a folder's ``model_index.json`` ``"_class_name":
"VchitectPipeline"`` as ``getattr(diffusers, "VchitectPipeline")`` and offers no plugin or entry-point
mechanism (the alternatives, ``custom_pipeline=`` or code in the folder, need an argument from the
caller or ``trust_remote_code=True``). So this module puts a finder at the front of ``sys.meta_path``
that does nothing until ``diffusers`` itself is imported; then it adds a module-level ``__getattr__``
to ``diffusers`` that imports ``vchitect.export.pipeline`` the first time ``diffusers.VchitectPipeline``
is asked for. Importing that module also imports ``vchitect.models.transformer``, which diffusers
needs in ``sys.modules`` to resolve the folder's ``transformer`` component.

Cost at start-up: this file, which imports nothing (``sys`` is already loaded); torch, diffusers and
vchitect are not imported. Every error is swallowed at start-up: the hook may only ever do nothing.
See docs/export.md ("Loading it").
"""

import sys

_TARGET = "diffusers"
_ATTR = "VchitectPipeline"


def _vchitect_getattr(previous):
    def __getattr__(name):
        if name == _ATTR:
            try:
                from vchitect.export.pipeline import VchitectPipeline
            except ImportError as exc:  # vchitect removed or broken: behave as if the name did not exist
                raise AttributeError(f"module 'diffusers' has no attribute {name!r} ({exc})") from exc
            return VchitectPipeline
        if previous is not None:
            return previous(name)
        raise AttributeError(f"module 'diffusers' has no attribute {name!r}")

    __getattr__._vchitect_hook = True
    return __getattr__


def patch(module) -> None:
    """Give ``module`` (``diffusers``) a ``__getattr__`` that resolves ``VchitectPipeline`` lazily.

    A ``__getattr__`` in a module's ``__dict__`` (PEP 562) is consulted before the ``__getattr__``
    of a module subclass (diffusers' ``_LazyModule``), and any earlier module-level one is chained."""
    namespace = getattr(module, "__dict__", None)
    if namespace is None:
        return
    previous = namespace.get("__getattr__")
    if getattr(previous, "_vchitect_hook", False):
        return
    namespace["__getattr__"] = _vchitect_getattr(previous)


class _Loader:
    """Wraps diffusers' own loader: runs it, patches the result and puts the original loader back."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        try:
            self._loader.exec_module(module)
        finally:
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.loader is self:
                spec.loader = self._loader
            if getattr(module, "__loader__", None) is self:
                module.__loader__ = self._loader
        try:
            patch(sys.modules.get(_TARGET, module))  # diffusers replaces itself with a _LazyModule
        except Exception:  # noqa: BLE001 - never break `import diffusers`
            pass


class _Finder:
    """Meta-path finder that only looks at ``diffusers``: the real spec, with a wrapping loader."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != _TARGET:
            return None
        try:
            for finder in sys.meta_path:
                if finder is cls:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader)
            return spec
        except Exception:  # noqa: BLE001 - let the normal machinery import diffusers
            return None

    @classmethod
    def invalidate_caches(cls):
        pass


def install() -> None:
    if any(getattr(f, "__name__", None) == "_Finder" and getattr(f, "__module__", None) == __name__
           for f in sys.meta_path):
        return
    if _TARGET in sys.modules:
        patch(sys.modules[_TARGET])
    sys.meta_path.insert(0, _Finder)


try:
    install()
except Exception:  # noqa: BLE001 - a start-up hook must never break the interpreter
    pass
