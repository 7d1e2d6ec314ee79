"""Rectified-flow objective (training) and samplers (inference)."""
