"""Helpers for the curation fault tests (tests/unit/test_curate_reliability.py, tests/e2e)."""

from __future__ import annotations

import pickle


class OpenOnUnpickle:
    """Unpickling an instance calls ``open(marker, "w")``: the file appears iff someone unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_pickle(marker) -> bytes:
    """The bytes an attacker would plant as a completion record (only ever written, never loaded)."""
    return pickle.dumps(OpenOnUnpickle(str(marker)))
