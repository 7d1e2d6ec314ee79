"""Rectified-flow objective (training) and samplers (inference)."""

import vchitect.config  # noqa: F401  first: it imports .objective back for Config.diffusion
