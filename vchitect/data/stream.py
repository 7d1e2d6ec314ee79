"""The per-worker sample stream: shard assignment, epochs, source mixing, bucket buffers, cursor state.

Every loader worker of every DP rank is one *stream*, numbered ``g = dp_rank × workers + worker``
out of ``G = dp_size × workers``. For each source and epoch the shards are permuted with
``(seed, source, epoch)`` and stream ``g`` reads shards ``g, g+G, g+2G, …`` of that permutation;
with fewer shards than streams, the streams that share a shard take every k-th sample of it. So the
streams of one epoch are disjoint and together cover every sample exactly once, and everything
depends only on the seed and ``G``.

Raw samples pass a shuffle buffer (``shuffle_buffer`` samples, picked with a counter-seeded RNG),
then go into one buffer per (kind, bucket); a full buffer is a batch. The stream's *state* after a
batch is small and JSON-like: per source (epoch, shard position, next sample index), the draw and
pick counters, and for every sample still in the shuffle or a bucket buffer its (shard, index,
epoch). Restoring it re-reads just those samples and carries on, so a resumed stream continues
exactly.
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
            "draws": 0, "picks": 0, "arrivals": 0, "pending": [], "shuffle": [],
            "samples": 0, "batches": 0, "bytes": 0, "skipped": {}, "shards_failed": 0, "failed_shards": []}


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
        self.buffers: dict = defaultdict(list)  # (kind, bucket) → [(Sample, entry)]
        self.shuffle: list = [[] for _ in shards]  # per source: [(entry, key, members)], arrival order

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
    def _process(self, url: str, index: int, key: str, members: dict, epoch: int,
                 source: int = 0) -> Optional[Sample]:
        try:
            return self.decoder(key, members, epoch, shard=url, source=source)
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

    def _restore(self) -> None:
        """Re-read the samples that were in the shuffle buffer or waiting in bucket buffers when the
        state was taken (one pass per shard), and put them back in their original order."""
        wanted_by_url = defaultdict(dict)
        for e in self.st["pending"] + self.st["shuffle"]:
            wanted_by_url[e["url"]][e["index"]] = e
        raw = {}
        for url, wanted in wanted_by_url.items():
            left = set(wanted)
            for i, key, members, _ in read_shard(url, self.cfg.s3, min(wanted), 1, 0,
                                                 self.cfg.shard_retries, self.cfg.retry_backoff):
                if i in left:
                    raw[(url, i)] = (key, members)
                    left.discard(i)
                if not left:
                    break
            if left:
                log.error("shard %s: %d buffered samples could not be re-read on resume", url, len(left))
        for e in sorted(self.st["pending"], key=lambda e: e["seq"]):  # bucket buffers, arrival order
            if (e["url"], e["index"]) in raw:
                key, members = raw[(e["url"], e["index"])]
                sample = self._process(e["url"], e["index"], key, members, e["epoch"], e["source"])
                if sample is not None:  # it was good when it was first read
                    self.buffers[(sample.kind, sample.bucket)].append((sample, e))
        for e in self.st["shuffle"]:
            if (e["url"], e["index"]) in raw:
                self.shuffle[e["source"]].append((e, *raw[(e["url"], e["index"])]))

    def state(self) -> dict:
        st = copy.deepcopy(self.st)
        st["pending"] = sorted((e for buf in self.buffers.values() for _, e in buf),
                               key=lambda e: e["seq"])
        st["shuffle"] = [dict(e) for buf in self.shuffle for e, _, _ in buf]
        return st

    def _next_raw(self, iters) -> tuple[dict, str, dict]:
        """The next raw sample, (entry, key, members), through the source's shuffle buffer.

        The buffer only mixes samples of one shard read (same source, shard, epoch): it stops filling
        when a sample of the next shard arrives and picks among the oldest shard's samples only, so
        epochs never mix and a resumed epoch is the same set of samples.
        """
        s = self._pick_source()
        buf, size = self.shuffle[s], max(1, self.cfg.shuffle_buffer)
        group = lambda e: (e["url"], e["epoch"])  # noqa: E731
        while len(buf) < size and (not buf or group(buf[-1][0]) == group(buf[0][0])):
            url, index, key, members, epoch = next(iters[s])
            buf.append(({"source": s, "url": url, "index": index, "epoch": epoch}, key, members))
        n = next((i for i, (e, _, _) in enumerate(buf) if group(e) != group(buf[0][0])), len(buf))
        k = self.st["picks"]
        self.st["picks"] += 1
        j = int(np.random.default_rng([self.cfg.seed, 2, self.g, k]).integers(n)) if n > 1 else 0
        return buf.pop(j)

    def __iter__(self) -> Iterator[dict]:
        self._restore()
        iters = [self._source_iter(s) for s in range(len(self.shards))]
        while True:
            entry, key, members = self._next_raw(iters)
            sample = self._process(entry["url"], entry["index"], key, members, entry["epoch"], entry["source"])
            if sample is None:
                continue
            self.st["arrivals"] += 1
            entry["seq"] = self.st["arrivals"]
            buf = self.buffers[(sample.kind, sample.bucket)]
            buf.append((sample, entry))
            if len(buf) >= self._batch_size(sample.bucket):
                batch = collate([x for x, _ in buf])
                batch["epochs"] = [e["epoch"] for _, e in buf]  # per sample
                batch["epoch"] = min(batch["epochs"])
                del buf[:]
                self.st["samples"] += len(batch["keys"])
                self.st["batches"] += 1
                batch["_loader"] = {"g": self.g, "state": self.state()}
                yield batch
