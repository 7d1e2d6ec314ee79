"""DCP checkpoints → diffusers pipeline folders, and the ``VchitectPipeline`` that loads them.

``DiffusionPipeline.from_pretrained(folder)`` resolves ``VchitectPipeline`` without this import
wherever vchitect is installed (the start-up hook ``_vchitect_diffusers_hook``); importing this
package does the same for interpreters without the hook (``python -S``, vchitect only on
``PYTHONPATH``): :func:`register_with_diffusers` runs on import (see docs/export.md, "Loading it").
"""

from .export import ExportError, export, find_checkpoint, load_weights, read_meta
from .pipeline import VchitectPipeline, VchitectPipelineOutput


def register_with_diffusers() -> None:
    """Make diffusers resolve exports to the installed vchitect without ``trust_remote_code``: sets
    ``diffusers.VchitectPipeline`` (the name older exports give in model_index.json) and lets the
    start-up hook answer diffusers' loader for the entry files newer exports carry."""
    import diffusers

    if getattr(diffusers, "VchitectPipeline", None) is not VchitectPipeline:
        setattr(diffusers, "VchitectPipeline", VchitectPipeline)
    try:
        import _vchitect_diffusers_hook
    except ImportError:  # vchitect on PYTHONPATH without the repository root: only the attribute above
        return
    _vchitect_diffusers_hook.install()


register_with_diffusers()

__all__ = ["ExportError", "VchitectPipeline", "VchitectPipelineOutput", "export", "find_checkpoint", "load_weights",
           "read_meta", "register_with_diffusers"]
