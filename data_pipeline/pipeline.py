"""Ray Data assembly of the curation stages, resume, and the final shard packing.

    sources ─► [task] probe → split → clip → cheap filters          (num_cpus=ray.video_task_cpus)
            ─► [actors] OCR / NSFW / aesthetic                       (ray.filters: actors, cpus, gpus)
            ─► [actors] VLM captions (when caption.vlm_path is set)  (ray.caption)
            ─► [actors] VAE / text-encoder latents (latents.enabled)  (ray.latents)
            ─► [actors] depth maps, depth.mp4 (depth.model_path)      (ray.depth)
            ─► driver: completion record per input
    all inputs recorded ─► global dedup ─► shards, index.json, stats.json, rejected.jsonl, _SUCCESS

One row is one input: its clips travel together, so an input is either fully recorded or redone.
Actor pools reserve fractional CPUs and the total they hold is checked against the cluster, so
video tasks (which feed them) always have a CPU left: on a 2-core machine two 0.5-CPU actors
leave one core for decoding.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import sys
import threading
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from typing import Iterator, Optional

from . import io as vio
from .config import CurateConfig, config_fingerprint, storage_options
from .sources import SourceItem, list_sources
from .stages.clip import InputResult, process_video
from .stages.depth import DepthEstimator, check_depth
from .stages.latents import LatentEncoder, actor_device, check_latents
from .stages.models import Captioner, ModelFilters, attach_source_captions
from .stages.probe import Rejected
from .writer import RecordError, finalize, finished_ids, remove_record, write_record

log = logging.getLogger("vchitect.curate")


# ----------------------------------------------------------------------------- per-input work


def run_video_stage(item: SourceItem, cfg: CurateConfig, options: dict) -> InputResult:
    """Fetch (if remote) and process one input; any failure becomes a rejection, never a crash."""
    try:
        with vio.local_copy(item.uri, options) as path:
            return process_video(path, item, cfg)
    except FileNotFoundError as exc:
        res = InputResult(source_id=item.source_id, uri=item.uri)
        res.reject("probe", Rejected("missing", f"{type(exc).__name__}: {exc}"))
        return res
    except (OSError, PermissionError) as exc:
        res = InputResult(source_id=item.source_id, uri=item.uri)
        res.reject("probe", Rejected("unreadable", f"{type(exc).__name__}: {exc}"))
        return res
    except Exception as exc:  # one odd file must not stop a million-video job
        log.exception("curate: %s failed", item.uri)
        res = InputResult(source_id=item.source_id, uri=item.uri)
        res.reject("decode", Rejected("error", f"{type(exc).__name__}: {exc}"))
        return res


# Rows between the Ray stages of one job carry an InputResult pickled into a bytes column. These
# bytes only ever live in Ray's object store, made by this job's own workers, and never touch
# storage; completion records on disk/S3 are JSON (writer.py), read by a strict schema.


def _pack(res: InputResult) -> dict:
    # in-memory Ray payload (never written to or read from storage)
    return {"source_id": res.source_id, "result": pickle.dumps(res, protocol=5)}


def _unpack_batch(batch) -> list[InputResult]:
    # in-memory Ray payload from _pack/_repack_batch of this job (never read from storage)
    return [pickle.loads(bytes(b)) for b in batch["result"]]


def _repack_batch(results: list[InputResult]) -> dict:
    # in-memory Ray payload (never written to or read from storage)
    return {"source_id": [r.source_id for r in results],
            "result": [pickle.dumps(r, protocol=5) for r in results]}


class _ModelFilterActor:
    def __init__(self, cfg):
        self.fn = ModelFilters(cfg)

    def __call__(self, batch):
        return _repack_batch(self.fn(_unpack_batch(batch)))


class _LatentActor:
    def __init__(self, cfg):
        self.fn = LatentEncoder(cfg)

    def __call__(self, batch):
        return _repack_batch(self.fn(_unpack_batch(batch)))


class _DepthActor:
    def __init__(self, cfg):
        self.fn = DepthEstimator(cfg)

    def __call__(self, batch):
        return _repack_batch(self.fn(_unpack_batch(batch)))


class _CaptionActor:
    def __init__(self, cfg):
        self.fn = Captioner(cfg, device=actor_device(cfg.ray.caption.gpus))

    def __call__(self, batch):
        return _repack_batch(self.fn(_unpack_batch(batch)))


# ----------------------------------------------------------------------------- progress


class Progress:
    """Per stage, how many inputs went through and how many clips were kept/rejected so far.

    ``display``: ``"rich"`` — a live display, one bar per stage (for a terminal); ``"plain"`` — one
    line of text at each tenth of the inputs and at least every ``every`` seconds, with the count,
    rate and ETA (for logs: Slurm, nohup, a pipe; never wider than one line); ``"off"`` — counting only.
    """

    STAGES = ("probe", "clip", "filter", "caption", "record")

    def __init__(self, total: int, display: str = "off", *, every: float = 30.0, echo=print,
                 clock=time.monotonic):
        self.total, self.display, self.every, self.echo, self.clock = total, display, every, echo, clock
        self.done = 0
        self.kept: Counter = Counter()
        self.rejected: Counter = Counter()
        self.p = None
        if display == "rich":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeElapsedColumn

            self.p = RichProgress(TextColumn("{task.description:<8}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("kept {task.fields[kept]:>5}  rejected {task.fields[rejected]:>5}"),
                                  TimeElapsedColumn())
            self.tasks = {s: self.p.add_task(s, total=total, kept=0, rejected=0) for s in self.STAGES}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None
        self.t0 = self._last_line = clock()
        self._tenths = 0

    def __enter__(self):
        self.t0 = self._last_line = self.clock()
        if self.p is not None:
            self.p.__enter__()
        elif self.display == "plain" and self.every > 0:
            self._heartbeat = threading.Thread(target=self._beat, name="curate-progress", daemon=True)
            self._heartbeat.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        if self.p is not None:
            self.p.__exit__(*exc)

    def add(self, res: InputResult) -> None:
        rej = Counter(r["stage"] for r in res.rejections)
        with self._lock:
            self.done += 1
            self.rejected.update({"probe": rej["probe"] + rej["decode"], "clip": rej["clip"],
                                  "filter": rej["filter"], "caption": rej["caption"]})
            if res.probe is not None and not rej["decode"]:
                self.kept["probe"] += 1
            self.kept["clip"] += res.entered.get("filter", 0)
            self.kept["filter"] += len(res.clips) + rej["caption"] + rej["latents"] + rej["depth"]
            self.kept["caption"] += len(res.clips) + rej["latents"] + rej["depth"]
            self.kept["record"] += len(res.clips)
            if self.p is not None:
                for s, t in self.tasks.items():
                    self.p.update(t, advance=1, kept=self.kept[s], rejected=self.rejected[s])
            elif self.display == "plain":
                tenths = self.done * 10 // max(1, self.total)
                if tenths > self._tenths:
                    self._tenths = tenths
                    self._emit()

    def line(self) -> str:
        """``curate: 4/7 inputs (57%), 0.213 inputs/s, elapsed 0:00:19, ETA 0:00:14 | probe kept 1 rejected 3 | …``"""
        elapsed = max(1e-9, self.clock() - self.t0)
        rate = self.done / elapsed
        eta = _hms((self.total - self.done) / rate) if self.done else "unknown"
        stages = " | ".join(f"{s} kept {self.kept[s]} rejected {self.rejected[s]}" for s in self.STAGES)
        return (f"curate: {self.done}/{self.total} inputs ({self.done / max(1, self.total):.0%}), "
                f"{rate:.3g} inputs/s, elapsed {_hms(elapsed)}, ETA {eta} | {stages}")

    def _emit(self) -> None:  # with self._lock held
        self._last_line = self.clock()
        self.echo(self.line())

    def beat(self) -> None:
        """A line if none came for ``every`` seconds (called by a thread while the run waits)."""
        with self._lock:
            if self.clock() - self._last_line >= self.every:
                self._emit()

    def _beat(self) -> None:
        while not self._stop.wait(min(self.every, 5.0)):
            self.beat()


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _print(msg: str) -> None:
    print(msg, flush=True)  # a log file (Slurm, nohup) gets each line when it happens


# ----------------------------------------------------------------------------- the run


def _start_ray(cfg: CurateConfig, address: Optional[str]) -> bool:
    """Connect to / start Ray; True when we started it (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, ignore_reinit_error=True, log_to_driver=True,
                  logging_level=logging.WARNING)
    addr = address or cfg.ray.address
    if addr:
        ray.init(address=addr, **kwargs)
    else:
        with _stdin_detached(), _quiet_logger(_RAY_AUTH_LOGGER):
            ray.init(num_cpus=cfg.ray.num_cpus or None, **kwargs)
    return True


# A new local cluster turns on token authentication when RAY_AUTH_MODE is unset, and says so with a
# warning on every start ("Token authentication is enabled … Set RAY_AUTH_MODE=disabled to opt
# out"). That is the setting we want, so the note is kept off the console while we start one.
# (Setting RAY_AUTH_MODE=token ourselves does not work once ray is imported: its config is cached.)
_RAY_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


@contextmanager
def _quiet_logger(name: str, level: int = logging.ERROR) -> Iterator[None]:
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)


@contextmanager
def _stdin_detached() -> Iterator[None]:
    """While a local Ray starts, file descriptor 0 is /dev/null, so none of Ray's processes reads the terminal.

    Every process ``ray.init`` starts (GCS, raylet, log monitor …) inherits the driver's fd 0, and the
    raylet hands it on to every worker it forks. The raylet also puts each worker into a process
    group of its own (to clean it up as a group), so in a terminal the workers are *background*
    jobs of the user's session whose stdin is the controlling terminal: the first ``tcsetattr``,
    ``read`` or other job-controlled call a library makes on it (the ffmpeg CLI's terminal set-up,
    ``tty.setraw``, ``input()``, curses …) stops the worker with SIGTTOU/SIGTTIN (state ``T``) and
    the run waits forever. With /dev/null as their stdin, no Ray process holds the terminal at all
    (their stdout/stderr are Ray's log files). The driver gets its own stdin back afterwards.
    """
    saved = None
    try:
        saved = os.dup(0)
    except OSError:  # no stdin at all: /dev/null becomes fd 0 below
        pass
    devnull = os.open(os.devnull, os.O_RDONLY)
    try:
        if devnull != 0:
            os.dup2(devnull, 0)
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 0)
            os.close(saved)
        if devnull != 0:
            os.close(devnull)


def actor_stages(cfg: CurateConfig, uses_models: bool, uses_vlm: bool) -> list[tuple[str, type]]:
    """(name under ray., actor class) of the model-backed stages this run uses, in pipeline order."""
    return [(name, actor) for name, actor, used in (("filters", _ModelFilterActor, uses_models),
                                                    ("caption", _CaptionActor, uses_vlm),
                                                    ("latents", _LatentActor, cfg.latents.enabled),
                                                    ("depth", _DepthActor, bool(cfg.depth.model_path))) if used]


def check_resources(cfg: CurateConfig, cpus: float, uses_models: bool, uses_vlm: bool,
                    gpus: float = 0.0) -> None:
    """Refuse a plan whose actor pools leave no CPU for the video tasks that feed them, or ask for
    more GPUs than the cluster has (the pool would wait for them forever)."""
    stages = [(name, getattr(cfg.ray, name)) for name, _ in actor_stages(cfg, uses_models, uses_vlm)]
    held = sum(r.actors * r.cpus for _, r in stages)
    if held + cfg.ray.video_task_cpus > cpus + 1e-9:
        raise RuntimeError(
            f"the actor pools would hold {held:g} of {cpus:g} CPUs, leaving less than "
            f"ray.video_task_cpus={cfg.ray.video_task_cpus:g} for the video tasks that feed them, "
            "which would stall the pipeline; lower " + " / ".join(f"ray.{n}.actors / ray.{n}.cpus" for n, _ in stages)
            + " or give Ray more CPUs (ray.num_cpus)")
    want = sum(r.actors * r.gpus for _, r in stages)
    if want > gpus + 1e-9:
        asked = ", ".join(f"ray.{n}: {r.actors} × {r.gpus:g}" for n, r in stages if r.gpus)
        raise RuntimeError(f"the actor pools ask for {want:g} GPUs ({asked}) but the Ray cluster has "
                           f"{gpus:g}; lower ray.<stage>.actors / ray.<stage>.gpus, or 0 GPUs to run on CPU")


class CurationStopped(SystemExit):
    """SIGTERM or SIGINT during a run: unwinds it (Ray is shut down on the way) and exits with 128 + signal."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name


class _StopOnSignal:
    """SIGTERM/SIGINT raise :class:`CurationStopped` in the main thread for the length of a run.

    ``ray.init`` installs its own handlers: a Python one and, in the core worker, a C++ failure
    handler that prints a stack dump for SIGTERM. :meth:`arm` after ``ray.init`` replaces both, so a
    ``kill``/``scancel``/Ctrl-C ends the run with one line of ours, not a dump.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.active = threading.current_thread() is threading.main_thread()
        self.previous: dict = {}

    def __enter__(self):
        if self.active:
            self.previous = {s: signal.getsignal(s) for s in self.SIGNALS}
            self.arm()
        return self

    def arm(self) -> None:
        if self.active:
            for s in self.SIGNALS:
                signal.signal(s, self._raise)

    @staticmethod
    def _raise(signum, frame):
        raise CurationStopped(signum)

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


def run(cfg: CurateConfig, *, address: Optional[str] = None, progress: bool = True,
        echo=_print) -> dict:
    """Curate ``cfg.input.path`` into ``cfg.output.path``; returns the stats (also in stats.json).

    ``progress``: a live display when stdout is a terminal, plain progress lines through ``echo``
    otherwise (see :class:`Progress`); False: neither."""
    with _StopOnSignal() as stop:
        try:
            return _run(cfg, address, progress, echo, stop)
        except CurationStopped as exc:
            echo(f"curate: stopped by {exc.signal_name}; finished inputs are recorded in "
                 f"{vio.join(cfg.output.path, '_work')}: rerun the same command to continue")
            raise


def _run(cfg: CurateConfig, address: Optional[str], progress: bool, echo, stop: _StopOnSignal) -> dict:
    t0 = time.time()
    check_latents(cfg)
    check_depth(cfg)
    options = storage_options(cfg)
    out = cfg.output.path
    items = list_sources(cfg.input.path, cfg.input.extensions, options, cfg.input.limit)
    by_id = {it.source_id: it for it in items}
    fingerprint = config_fingerprint(cfg)
    _claim_output(out, fingerprint, options)
    f = cfg.filters
    if not f.aesthetic_clip_path:
        echo("curate: aesthetic filter off (filters.aesthetic_clip_path / aesthetic_head_path not set)")
    uses_models = bool(f.ocr or f.nsfw or f.aesthetic_clip_path)
    uses_vlm = bool(cfg.caption.vlm_path and cfg.caption.mode != "source")

    def warn(msg: str) -> None:
        echo(f"curate: warning: {msg}")

    done = finished_ids(out, options, warn=warn) & set(by_id)
    resumed, processed = set(done), set()
    for attempt in range(3):  # again only when packing finds a record unusable after all
        todo = [it for it in items if it.source_id not in done]
        echo(f"curate: {len(items)} inputs, {len(done)} already finished, {len(todo)} to process")
        if todo:
            started = _start_ray(cfg, address)
            stop.arm()
            try:
                display = "off" if not progress else "rich" if sys.stdout.isatty() else "plain"
                recorded = _run_ray(cfg, todo, options, uses_models, uses_vlm, display, echo)
            finally:
                if started:
                    import ray

                    ray.shutdown()
            done |= recorded
            processed |= recorded
        missing = sorted(set(by_id) - done)
        if missing:
            raise RuntimeError(f"{len(missing)} inputs have no completion record (e.g. {missing[0]}); "
                               "rerun the same command to finish them")
        echo("curate: packing shards")
        try:
            stats = finalize(out, cfg, by_id, fingerprint=fingerprint, options=options,
                             run_info={"processed_inputs": len(processed), "resumed_inputs": len(resumed),
                                       "seconds": round(time.time() - t0, 2)})
            break
        except RecordError as exc:  # e.g. a data file that no longer matches its record
            if attempt == 2:
                raise
            warn(f"{exc}; processing that input again")
            remove_record(out, exc.source_id, options)
            done.discard(exc.source_id)
            resumed.discard(exc.source_id)
    c = stats["counts"]
    echo(f"curate: {c.get('clips_written', 0)} clips in {c.get('shards', 0)} shards; "
         f"rejected: {json_compact(stats['rejected_by_reason'])}")
    return stats


def _claim_output(out: str, fingerprint: str, options: dict) -> None:
    """Completion records are only reusable by the same settings: refuse to mix two configs."""
    path = vio.join(out, "_work", "config.json")
    if vio.exists(path, options):
        old = json.loads(vio.read_bytes(path, options)).get("config_fingerprint")
        if old != fingerprint:
            raise RuntimeError(
                f"{out} holds work from a run with different settings (config fingerprint {old}, "
                f"this run {fingerprint}); use a new output.path, or delete {out} to start over")
        return
    vio.write_bytes(path, json.dumps({"config_fingerprint": fingerprint}).encode(), options)


def json_compact(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "none"


# Ray Data creates its pool actors with max_restarts=-1 (and retries their tasks forever) and always
# passes the actor constructor its context and transform as object refs (ray.put), however small
# our own arguments are; for every such actor Ray's core worker prints an error-level line to the
# driver's stderr ("… has constructor arguments in the object store and max_restarts > 0",
# ray-project/ray#53727: restarting it may fail). Our actors are not restarted: one that dies (OOM,
# segfault, lost node) stops the run with Ray's error and the rerun resumes from the completion
# records; a batch that kills its actor every time cannot loop forever either. Ray Data has no named
# parameter for this yet (its catch-all remote-args keyword is deprecated, hence the filter).
_NO_RESTARTS = {"max_restarts": 0}


@contextmanager
def _no_remote_args_deprecation() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        yield


def _quiet_ray_data_console() -> None:
    """Ray Data's INFO lines ("execution finished …") and its note that progress bars are off stay
    in its log file (session logs/ray-data/); the console shows its warnings and errors only."""
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(max(handler.level, logging.WARNING))
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


def _add_actor_stages(ds, cfg, uses_models: bool, uses_vlm: bool):
    """The actor pools after the video tasks: model filters, VLM captions, latents, depth (those in use)."""
    import ray

    for name, actor in actor_stages(cfg, uses_models, uses_vlm):
        r = getattr(cfg.ray, name)
        ds = ds.map_batches(actor, fn_constructor_kwargs={"cfg": cfg}, batch_size=r.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=r.actors), num_cpus=r.cpus,
                            batch_format="numpy", **({"num_gpus": r.gpus} if r.gpus else {}), **_NO_RESTARTS)
    return ds


def _run_ray(cfg, todo, options, uses_models, uses_vlm, display: str, echo) -> set[str]:
    """Process ``todo`` on Ray, writing a completion record per input; the ids recorded."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours are in Progress
    ctx.verbose_progress = False
    if hasattr(ctx, "print_on_execution_start"):
        ctx.print_on_execution_start = False
    _quiet_ray_data_console()
    total = ray.cluster_resources()
    check_resources(cfg, float(total.get("CPU", 0)), uses_models, uses_vlm, float(total.get("GPU", 0)))

    def video_stage(row: dict) -> dict:
        item = SourceItem.from_row(row)
        res = run_video_stage(item, cfg, options)
        attach_source_captions(res, item, cfg.caption.mode)
        if not uses_vlm:  # no model needed: captions are final here
            Captioner(cfg)([res])
        return _pack(res)

    # One input per block (up to 10k blocks): records stream back, and so resume, per input.
    ds = ray.data.from_items([it.to_row() for it in todo], override_num_blocks=min(len(todo), 10_000))
    ds = ds.map(video_stage, num_cpus=cfg.ray.video_task_cpus)
    with _no_remote_args_deprecation():
        ds = _add_actor_stages(ds, cfg, uses_models, uses_vlm)
    recorded = set()
    with Progress(len(todo), display, every=cfg.ray.progress_every, echo=echo) as prog:
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=0):
            for res in _unpack_batch(batch):
                write_record(cfg.output.path, res, options)
                recorded.add(res.source_id)
                prog.add(res)
    return recorded
