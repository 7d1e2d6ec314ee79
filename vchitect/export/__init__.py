"""DCP checkpoints → diffusers pipeline folders, and the ``VchitectPipeline`` that loads them.

Importing this package registers ``VchitectPipeline`` with diffusers, so that
``DiffusionPipeline.from_pretrained(folder)`` resolves it (see docs/export.md).
"""

from .export import ExportError, export, find_checkpoint, load_weights, read_meta
from .pipeline import VchitectPipeline, VchitectPipelineOutput

__all__ = ["ExportError", "VchitectPipeline", "VchitectPipelineOutput", "export", "find_checkpoint", "load_weights",
           "read_meta"]
