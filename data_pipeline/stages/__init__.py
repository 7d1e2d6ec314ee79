"""Curation stages: plain functions and classes, usable without Ray (``pipeline.py`` schedules them)."""

from .probe import ProbeResult, Rejected, probe

__all__ = ["probe", "ProbeResult", "Rejected"]
