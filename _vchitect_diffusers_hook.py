"""Start-up hook that lets ``DiffusionPipeline.from_pretrained`` load vchitect exports with the installed vchitect.

Installed with the vchitect distribution (wheel and editable installs alike) together with
``vchitect_diffusers_hook.pth`` in site-packages, whose one line imports this module when the
interpreter starts. It puts a finder at the front of ``sys.meta_path`` that does nothing until one of
two diffusers modules is imported, and then patches it:

* ``diffusers``: a module-level ``__getattr__`` that imports ``vchitect.export.pipeline`` the first
  time ``diffusers.VchitectPipeline`` is asked for. diffusers 0.42 resolves a string
  ``"_class_name": "VchitectPipeline"`` (exports made before they carried code) as
  ``getattr(diffusers, "VchitectPipeline")``; importing that module also imports
  ``vchitect.models.transformer``, which resolves their ``transformer`` component.
* ``diffusers.pipelines.pipeline_loading_utils``: its ``get_class_from_dynamic_module``, through
  which diffusers loads the pipeline and component code an export folder carries
  (``vchitect_pipeline.py``, ``transformer/vchitect_transformer.py``), is wrapped: asked for one of
  those entry files *without* ``trust_remote_code``, it returns the installed vchitect's class
  (``vchitect.export.remote_code.installed_class``) instead of refusing, and the folder's code does not
  run. With ``trust_remote_code=True``, and for every other file, diffusers' own function runs.

Cost at start-up: this file, which imports nothing (``sys`` is already loaded); torch, diffusers and
vchitect are not imported. Every error is swallowed at start-up: the hook may only ever do nothing.
See docs/export.md ("Loading it").
"""

import sys

_TARGET = "diffusers"
_LOADING_UTILS = "diffusers.pipelines.pipeline_loading_utils"
_ATTR = "VchitectPipeline"
_ENTRY_PREFIX = "vchitect_"  # the export's entry files (vchitect.export.remote_code.ENTRY_POINTS)


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


def _installed_class(args, kwargs):
    """The installed class for a diffusers request to load an export's entry file without
    ``trust_remote_code`` (``get_class_from_dynamic_module(folder, module_file, …, class_name=…)``), else None."""
    if kwargs.get("trust_remote_code"):
        return None
    module_file = kwargs.get("module_file", args[1] if len(args) > 1 else None)
    if not isinstance(module_file, str) or not module_file.replace("\\", "/").rsplit("/", 1)[-1].startswith(
            _ENTRY_PREFIX):
        return None
    try:
        from vchitect.export.remote_code import installed_class
    except ImportError:  # vchitect removed or broken: diffusers refuses the folder's code as usual
        return None
    return installed_class(module_file, kwargs.get("class_name", args[3] if len(args) > 3 else None))


def _wrap_dynamic_loader(original):
    def get_class_from_dynamic_module(*args, **kwargs):
        found = _installed_class(args, kwargs)
        return found if found is not None else original(*args, **kwargs)

    get_class_from_dynamic_module._vchitect_hook = True
    get_class_from_dynamic_module.__wrapped__ = original
    get_class_from_dynamic_module.__doc__ = original.__doc__
    return get_class_from_dynamic_module


def patch_loading_utils(module) -> None:
    """Wrap ``module.get_class_from_dynamic_module`` (``diffusers.pipelines.pipeline_loading_utils``, which
    looks the name up in its own globals when it loads a pipeline's or a component's code)."""
    original = getattr(module, "get_class_from_dynamic_module", None)
    if original is None or getattr(original, "_vchitect_hook", False):
        return
    module.get_class_from_dynamic_module = _wrap_dynamic_loader(original)


_PATCHES = {_TARGET: patch, _LOADING_UTILS: patch_loading_utils}


class _Loader:
    """Wraps diffusers' own loader: runs it, patches the result and puts the original loader back."""

    def __init__(self, loader, name):
        self._loader, self._name = loader, name

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
            _PATCHES[self._name](sys.modules.get(self._name, module))  # diffusers replaces itself with a _LazyModule
        except Exception:  # noqa: BLE001 - never break `import diffusers`
            pass


class _Finder:
    """Meta-path finder that only looks at the two diffusers modules: the real spec, with a wrapping loader."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in _PATCHES:
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
                spec.loader = _Loader(spec.loader, fullname)
            return spec
        except Exception:  # noqa: BLE001 - let the normal machinery import diffusers
            return None

    @classmethod
    def invalidate_caches(cls):
        pass


def install() -> None:
    """Patch the diffusers modules already imported (idempotent) and watch for the others."""
    for name, apply in _PATCHES.items():
        if name in sys.modules:
            apply(sys.modules[name])
    if not any(getattr(f, "__name__", None) == "_Finder" and getattr(f, "__module__", None) == __name__
               for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder)


try:
    install()
except Exception:  # noqa: BLE001 - a start-up hook must never break the interpreter
    pass
