"""The per-worker sample stream: shard assignment, epochs, source mixing, bucket buffers, cursor state.

Every loader worker of every DP rank is one *stream*, numbered ``g = dp_rank × workers + worker``
out of ``G = dp_size × workers``. For each source and epoch the shards are permuted with
``(seed, source, epoch)`` and stream ``g`` reads shards ``g, g+G, g+2G, …`` of that permutation;
with fewer shards than streams, the streams that share a shard take every k-th sample of it. So the
streams of one epoch are disjoint and together cover every sample exactly once, and everything
depends only on the seed and ``G``.

Samples go into one buffer per (kind, bucket); a full buffer is a batch. The stream's *state* after a
batch is small and JSON-like: per source (epoch, shard position, next sample index), the number of
source draws, and for every sample still waiting in a buffer its (shard, index, epoch). Restoring it
re-reads just those waiting samples and carries on, so a resumed stream continues exactly.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from typing import Iterator, Optional

import numpy as np

from .buckets import batch_size
from .config import DataConfig
from .decode import BadSample
from .samples import Sample, SampleDecoder, collate
from .sources import read_shard

log = logging.getLogger("vchitect.data")


def stream_units(shards: list[str], seed: int, source: int, epoch: int, g: int, G: int
                 ) -> list[tuple[str, int, int]]:
    """(shard url, sample stride, sample offset) that stream ``g`` of ``G`` reads in ``epoch``."""
    n = len(shards)
    perm = np.random.default_rng([seed, source, epoch]).permutation(n)
    if n >= G:
        return [(shards[perm[j]], 1, 0) for j in range(g, n, G)]
    s = g % n  # several streams share shard s: each takes every k-th sample
    return [(shards[perm[s]], len(range(s, G, n)), g // n)]


def fresh_state(num_sources: int, epoch: int = 0) -> dict:
    return {"sources": [{"epoch": epoch, "unit": 0, "index": 0} for _ in range(num_sources)],
            "draws": 0, "pending": [], "samples": 0, "batches": 0, "bytes": 0,
            "skipped": {}, "shards_failed": 0, "failed_shards": []}


class WorkerStream:
    """Endless iterator of batches for stream ``g`` of ``G``, resumable from :meth:`state`."""

    def __init__(self, cfg: DataConfig, shards: list[list[str]], g: int, G: int,
                 state: Optional[dict] = None):
        self.cfg, self.shards, self.g, self.G = cfg, shards, g, G
        self.decoder = SampleDecoder(cfg)
        self.st = copy.deepcopy(state) if state else fresh_state(len(shards))
        w = np.array([s.weight for s in cfg.sources] or [1.0], dtype=np.float64)
        self.weights = w / w.sum()
        self.logged: set = set()
        self.buffers: dict = defaultdict(list)  # (kind, bucket) → [(Sample, pending entry)]

    # -- raw samples ------------------------------------------------------------------------
    def _on_failed(self, url: str, reason: str) -> None:
        self.st["shards_failed"] += 1
        if len(self.st["failed_shards"]) < 100:
            self.st["failed_shards"].append(url)

    def _source_iter(self, s: int) -> Iterator[tuple[str, int, str, dict, int]]:
        """(url, index, key, members, epoch) of source ``s``, advancing its cursor; endless."""
        cur = self.st["sources"][s]
        empty_epochs = 0
        while True:
            units = stream_units(self.shards[s], self.cfg.seed, s, cur["epoch"], self.g, self.G)
            got_any = False
            while cur["unit"] < len(units):
                url, stride, offset = units[cur["unit"]]
                for i, key, members, nbytes in read_shard(
                        url, self.cfg.s3, cur["index"], stride, offset, self.cfg.shard_retries,
                        self.cfg.retry_backoff, self._on_failed):
                    cur["index"] = i + 1
                    self.st["bytes"] += nbytes
                    got_any = True
                    yield url, i, key, members, cur["epoch"]
                cur["unit"], cur["index"] = cur["unit"] + 1, 0
            cur["epoch"], cur["unit"], cur["index"] = cur["epoch"] + 1, 0, 0
            empty_epochs = 0 if got_any else empty_epochs + 1
            if empty_epochs >= 2:
                raise RuntimeError(
                    f"data source {self.cfg.sources[s].uri if self.cfg.sources else s}: stream {self.g} "
                    f"of {self.G} read no sample in two whole epochs; its shards are empty or unreadable "
                    f"(see the errors above). Fix or remove the source.")

    def _pick_source(self) -> int:
        if len(self.weights) == 1:
            return 0
        k = self.st["draws"]
        self.st["draws"] += 1
        return int(np.random.default_rng([self.cfg.seed, 1, self.g, k]).choice(len(self.weights),
                                                                                p=self.weights))

    # -- samples → batches --------------------------------------------------------------------
    def _process(self, url: str, index: int, key: str, members: dict, epoch: int) -> Optional[Sample]:
        try:
            return self.decoder(key, members, epoch)
        except BadSample as exc:
            self.st["skipped"][exc.reason] = self.st["skipped"].get(exc.reason, 0) + 1
            if (url, key) not in self.logged:
                self.logged.add((url, key))
                log.warning("skipping sample %s in shard %s: %s", key, url, exc)
            return None

    def _batch_size(self, bucket) -> int:
        c = self.cfg
        return batch_size(bucket, c.token_budget, c.max_batch_size, c.vae_spatial_factor,
                          c.vae_temporal_factor, c.patch_size)

    def _restore_pending(self) -> None:
        """Re-read the samples that were waiting in buffers when the state was taken."""
        by_url, back = defaultdict(dict), []
        for e in self.st["pending"]:
            by_url[e["url"]][e["index"]] = e
        for url, wanted in by_url.items():
            for i, key, members, _ in read_shard(url, self.cfg.s3, min(wanted), 1, 0,
                                                 self.cfg.shard_retries, self.cfg.retry_backoff):
                if i in wanted:
                    e = wanted.pop(i)
                    sample = self.decoder(key, members, e["epoch"])  # was good before
                    back.append((sample, e))
                if not wanted:
                    break
            if wanted:
                log.error("shard %s: %d buffered samples could not be re-read on resume",
                          url, len(wanted))
        for sample, e in sorted(back, key=lambda se: se[1]["seq"]):  # original arrival order
            self.buffers[(sample.kind, sample.bucket)].append((sample, e))

    def state(self) -> dict:
        st = copy.deepcopy(self.st)
        st["pending"] = sorted((e for buf in self.buffers.values() for _, e in buf),
                               key=lambda e: e["seq"])
        return st

    def __iter__(self) -> Iterator[dict]:
        self._restore_pending()
        iters = [self._source_iter(s) for s in range(len(self.shards))]
        while True:
            s = self._pick_source()
            url, index, key, members, epoch = next(iters[s])
            sample = self._process(url, index, key, members, epoch)
            if sample is None:
                continue
            self.st["arrivals"] = seq = self.st.get("arrivals", 0) + 1
            buf = self.buffers[(sample.kind, sample.bucket)]
            buf.append((sample, {"url": url, "index": index, "epoch": epoch, "seq": seq}))
            if len(buf) >= self._batch_size(sample.bucket):
                batch = collate([x for x, _ in buf])
                del buf[:]
                self.st["samples"] += len(batch["keys"])
                self.st["batches"] += 1
                batch["epoch"] = min(c["epoch"] for c in self.st["sources"])
                batch["_loader"] = {"g": self.g, "state": self.state()}
                yield batch
