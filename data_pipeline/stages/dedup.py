"""Near-duplicate removal across the whole run, from per-frame 64-bit perceptual hashes.

Each clip carries a list of 64-bit hashes (one per colour channel of each sampled frame). Two
clips are duplicates when every pair of corresponding hashes is within ``max_distance`` bits. Candidates come from banding the middle hash into 8 bytes: two
hashes within fewer than 8 differing bits share at least one byte, so no pair is missed; larger
distances fall back to comparing every pair. The first clip in key order is kept.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

Key = tuple[str, int]  # (source_id, clip)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def _same(a: Sequence[int], b: Sequence[int], max_distance: int) -> bool:
    return len(a) == len(b) and len(a) > 0 and all(hamming(x, y) <= max_distance for x, y in zip(a, b))


def find_duplicates(hashes: dict[Key, Sequence[int]], max_distance: int) -> dict[Key, Key]:
    """duplicate key → the earlier key it duplicates (keys visited in sorted order)."""
    dup: dict[Key, Key] = {}
    kept: list[Key] = []
    bands: dict[tuple[int, int], list[Key]] = defaultdict(list)
    brute = max_distance >= 8
    for key in sorted(hashes):
        hs = hashes[key]
        if not hs:
            continue
        mid = hs[len(hs) // 2]
        cands = kept if brute else {c for b in range(8) for c in bands[(b, (mid >> (8 * b)) & 0xFF)]}
        match = min((c for c in cands if _same(hashes[c], hs, max_distance)), default=None)
        if match is not None:
            dup[key] = match
            continue
        kept.append(key)
        for b in range(8):
            bands[(b, (mid >> (8 * b)) & 0xFF)].append(key)
    return dup
