"""The Vchitect-2.0 transformer, its FLOP/parameter accounting and weight import."""

from .transformer import MultimodalDiffusionBlock, VchitectTransformer3DModel

__all__ = ["MultimodalDiffusionBlock", "VchitectTransformer3DModel"]
