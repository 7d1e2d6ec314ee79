"""The training loader: an endless, resumable iterator of batches for one data-parallel rank.

    loader = build_loader(cfg.data, dp_rank=mesh["dp"].get_local_rank(), dp_size=dp)
    for batch in loader: ...                  # dict: latents | pixels, text, text_mask, pooled, …
    ckpt["data"] = loader.state_dict()        # per DP rank; all SP/TP ranks of a group hold the same
    loader.load_state_dict(ckpt["data"])      # then iterate again: continues exactly

SP/TP ranks pass their group's ``dp_rank`` and therefore receive identical batches. Iterate one
iterator at a time: each ``iter(loader)`` starts worker processes from the state of the batches
delivered so far. A fatal data error in a worker (:class:`~vchitect.data.provenance.EncoderMismatch`:
a precomputed shard made with other encoders) reaches the main process as one more item holding its
message, and is raised there as the same error with the same message (no worker traceback in it).
"""

from __future__ import annotations

import logging
import time
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .provenance import EncoderMismatch
from .sources import list_shards, local_source_problem, source_error
from .stream import WorkerStream, fresh_state

log = logging.getLogger("vchitect.data")
STATE_VERSION = 1
FATAL = "_fatal"  # the item a worker sends instead of a batch when it stops on a fatal data error


def _as_is(batch: dict) -> dict:  # batches are collated in the worker; keep tuples as tuples
    return batch


class _Streams(IterableDataset):
    """Runs one :class:`WorkerStream` per loader worker; worker ids are rotated on resume so the
    round-robin order of the DataLoader picks up with the stream that was due next."""

    def __init__(self, cfg, shards, dp_rank, dp_size, workers, states, rotation):
        self.cfg, self.shards, self.dp_rank, self.dp_size = cfg, shards, dp_rank, dp_size
        self.workers, self.states, self.rotation = workers, states, rotation

    def __iter__(self):
        info = get_worker_info()
        w = ((info.id if info else 0) + self.rotation) % self.workers
        g = self.dp_rank * self.workers + w
        try:
            yield from WorkerStream(self.cfg, self.shards, g, self.dp_size * self.workers, self.states.get(w))
        except EncoderMismatch as exc:  # DataLoader would re-raise it wrapped in the worker's traceback
            yield {FATAL: str(exc)}


class ShardLoader:
    """Batches from WebDataset shards for DP rank ``dp_rank`` of ``dp_size``."""

    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.workers = max(1, cfg.num_workers)
        self.shards = []
        for i, src in enumerate(cfg.sources):
            problem = None if src.uri.startswith("s3://") else local_source_problem(src.uri)
            found = [] if problem else list_shards(src.uri, cfg.s3)
            if not found:
                raise source_error(i, src.uri, problem or "no *.tar objects under this prefix")
            self.shards.append(found)
        self._states: dict[int, dict] = {}  # stream (logical worker) → state after its last batch
        self._consumed = 0
        self._t0 = None
        self._samples = 0

    def __iter__(self) -> Iterator[dict]:
        ds = _Streams(self.cfg, self.shards, self.dp_rank, self.dp_size, self.workers,
                      dict(self._states), self._consumed % self.workers)
        nw = self.cfg.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=nw, collate_fn=_as_is,
                        prefetch_factor=self.cfg.prefetch_factor if nw else None,
                        pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                        # fork: workers inherit the imported package and the shard lists at no cost
                        multiprocessing_context="fork" if nw else None)
        self._t0 = self._t0 or time.perf_counter()
        for batch in dl:
            if FATAL in batch:
                raise EncoderMismatch(batch[FATAL])
            meta = batch.pop("_loader")
            self._states[meta["g"] - self.dp_rank * self.workers] = meta["state"]
            self._consumed += 1
            self._samples += len(batch["keys"])
            yield batch

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "workers": self.workers, "seed": self.cfg.seed,
                "sources": [s.uri for s in self.cfg.sources], "consumed": self._consumed,
                "streams": {str(k): v for k, v in self._states.items()}}

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly when the world (dp_size, workers, seed, sources) is unchanged; otherwise
        restart at the beginning of the oldest epoch any saved stream was in, with the new split."""
        same = (sd.get("version") == STATE_VERSION and sd["dp_size"] == self.dp_size
                and sd["workers"] == self.workers and sd["seed"] == self.cfg.seed
                and sd["sources"] == [s.uri for s in self.cfg.sources])
        streams = {int(k): v for k, v in sd.get("streams", {}).items()}
        if same:
            if sd["dp_rank"] != self.dp_rank:
                raise ValueError(f"this data-loader state belongs to DP rank {sd['dp_rank']}, not "
                                 f"{self.dp_rank}; save and load one state per DP rank "
                                 f"(e.g. under data/dp{{rank}}) so each rank resumes its own stream")
            self._states, self._consumed = streams, sd["consumed"]
            return
        epoch = min((c["epoch"] for st in streams.values() for c in st["sources"]), default=0)
        log.warning("data loader state was saved with dp_size=%s, workers=%s (now %s, %s) or other "
                    "sources/seed: restarting epoch %d from its beginning with the new split",
                    sd.get("dp_size"), sd.get("workers"), self.dp_size, self.workers, epoch)
        self._states = {w: fresh_state(len(self.shards), epoch) for w in range(self.workers)}
        self._consumed = 0

    # -- metrics --------------------------------------------------------------------------------
    def metrics(self) -> dict:
        """Flat numbers for the trainer's logger (cumulative since this loader was built/resumed)."""
        elapsed = max(1e-9, time.perf_counter() - self._t0) if self._t0 else 0.0
        out = {"data/samples": sum(s["samples"] for s in self._states.values()),
               "data/batches": sum(s["batches"] for s in self._states.values()),
               "data/bytes": sum(s["bytes"] for s in self._states.values()),
               "data/shards_failed": sum(s["shards_failed"] for s in self._states.values()),
               "data/epoch": min((c["epoch"] for s in self._states.values() for c in s["sources"]),
                                 default=0)}
        skipped: dict[str, int] = {}
        for s in self._states.values():
            for reason, n in s["skipped"].items():
                skipped[reason] = skipped.get(reason, 0) + n
        out["data/skipped"] = sum(skipped.values())
        out.update({f"data/skipped/{r}": n for r, n in sorted(skipped.items())})
        out["data/delivered_per_s"] = self._samples / elapsed if elapsed else 0.0
        out["data/mb_per_s"] = out["data/bytes"] / 1e6 / elapsed if elapsed else 0.0
        return out

    def failed_shards(self) -> list[str]:
        return sorted({u for s in self._states.values() for u in s["failed_shards"]})


def build_loader(cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1):
    """The loader ``cfg.source`` asks for: :class:`ShardLoader` or :class:`SyntheticLoader`."""
    if cfg.source == "synthetic":
        from .synthetic import SyntheticLoader

        return SyntheticLoader(cfg, dp_rank, dp_size)
    return ShardLoader(cfg, dp_rank, dp_size)
