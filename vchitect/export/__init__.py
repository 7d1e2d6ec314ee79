"""DCP checkpoints → diffusers pipeline folders, and the ``VchitectPipeline`` that loads them.

``DiffusionPipeline.from_pretrained(folder)`` resolves ``VchitectPipeline`` without this import
wherever vchitect is installed (the start-up hook ``_vchitect_diffusers_hook``); importing this
package also sets ``diffusers.VchitectPipeline`` eagerly, for interpreters without the hook
(see docs/export.md, "Loading it").
"""

from .export import ExportError, export, find_checkpoint, load_weights, read_meta
from .pipeline import VchitectPipeline, VchitectPipelineOutput

__all__ = ["ExportError", "VchitectPipeline", "VchitectPipelineOutput", "export", "find_checkpoint", "load_weights",
           "read_meta"]
