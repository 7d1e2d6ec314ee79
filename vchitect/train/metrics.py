"""Metrics of a training run and where they go: one stdout line, metrics.jsonl, TensorBoard, wandb.

Only rank 0 writes. wandb is an optional extra (``vchitect[wandb]``), imported only when a run enables
it; it runs offline unless ``WANDB_API_KEY`` is set (or mode is online); any wandb failure disables
it with one warning instead of stopping the run. On a terminal, rank 0 shows a rich progress bar;
in a log (Slurm, nohup, a pipe, wandb's output.log) it prints plain progress lines instead, and
metric lines are never wrapped (:class:`TrainProgress`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Callable, Optional

import torch

log = logging.getLogger("vchitect.train")

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = [("H200", 989e12), ("H100", 989e12), ("H800", 989e12), ("H20", 148e12), ("GH200", 989e12),
                   ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("A10", 125e12)]


def device_peak_flops(configured: float, device_type: str) -> Optional[float]:
    """The configured peak, else the table entry for this GPU; None on CPU (report FLOP/s instead)."""
    if configured > 0:
        return configured
    if device_type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS:
        if key in name:
            return peak
    log.warning("unknown GPU %r: set train.peak_flops to report MFU", name)
    return None


def peak_memory_gib(device_type: str) -> float:
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB → GiB (Linux)
    except Exception:  # pragma: no cover - non-Linux
        return 0.0


class MetricWriter:
    """Fans one metrics dict out to stdout, JSONL, TensorBoard and wandb (rank 0 only)."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, wandb_mode: str, wandb_project: str,
                 config: dict, printer=print):
        self.enabled = enabled
        self.printer = printer
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(output_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(output_dir / "tb"))
            _log_config(self.tb, config)
        self.wandb = _start_wandb(output_dir, wandb_mode, wandb_project, config)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(tb_tag(k), v, step)
        if self.wandb is not None:
            try:
                self.wandb.log(record, step=step)
            except Exception as exc:  # never let logging stop training
                log.warning("wandb logging failed (%s); disabling wandb", exc)
                self.wandb = None
        self.printer(format_line(step, record))

    def log_video(self, step: int, name: str, video: torch.Tensor, fps: int = 8) -> None:
        """``video`` F×3×H×W in [0, 1]."""
        if not self.enabled:
            return
        if self.tb is not None:
            self.tb.add_video(name, video[None], step, fps=fps)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:
                pass


def tb_tag(key: str) -> str:
    """TensorBoard tag of a metric: the trainer's own under ``train/``, grouped ones (``data/…``) as they are."""
    return key if "/" in key else f"train/{key}"


def flatten_config(config: dict, prefix: str = "") -> dict:
    """``{"train.lr": 1e-4, …}``: numbers, strings and booleans kept, anything else (lists, None) as its JSON."""
    out = {}
    for k, v in config.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, name + "."))
        else:
            out[name] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def _log_config(tb, config: dict) -> None:
    """The run's config in TensorBoard: every leaf as an hparam (HPARAMS tab) and the whole as text."""
    from torch.utils.tensorboard.summary import hparams

    flat = flatten_config(config)
    for summary in hparams(flat, {"train/loss": 0.0}):  # experiment, session start, session end
        tb.file_writer.add_summary(summary)
    tb.add_text("config", "\n".join(f"    {k}: {v}" for k, v in flat.items()))  # indented: a code block


def _start_wandb(output_dir: Path, mode: str, project: str, config: dict):
    if mode == "disabled":
        return None
    asked = mode != "auto" or bool(os.environ.get("WANDB_API_KEY"))
    if mode == "auto":
        mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
    try:
        import wandb
    except ImportError:
        # the default (auto, no key) makes no noise about an extra nobody asked for; a mode or a key does
        (log.warning if asked else log.info)(
            "wandb is not installed (pip install 'vchitect[wandb]'); metrics go to metrics.jsonl and TensorBoard only")
        return None
    try:
        return wandb.init(project=project, dir=str(output_dir), mode=mode, config=config, resume="allow",
                          settings=wandb.Settings(silent=True, init_timeout=60))
    except Exception as exc:
        log.warning("wandb could not start (%s); continuing without it", exc)
        return None


def _plain(v):
    if isinstance(v, torch.Tensor):
        return v.item()
    return v


def format_line(step: int, m: dict) -> str:
    parts = [f"step {step}"]
    for key, fmt in (("loss", "{:.4f}"), ("grad_norm", "{:.3f}"), ("lr", "{:.2e}"), ("samples_per_s", "{:.1f}"),
                     ("tokens_per_s", "{:.0f}"), ("mfu", "{:.1%}"), ("tflops", "{:.2f}"), ("peak_mem_gib", "{:.2f}"),
                     ("data_wait", "{:.0%}")):
        if key in m and m[key] is not None:
            label = {"samples_per_s": "samples/s", "tokens_per_s": "tokens/s", "tflops": "TFLOP/s",
                     "peak_mem_gib": "mem GiB", "data_wait": "data wait"}.get(key, key)
            parts.append(f"{label} {fmt.format(m[key])}")
    return " | ".join(parts)


def _plain_print(line: str) -> None:
    print(line, flush=True)  # a log file gets each line when it happens


class TrainProgress:
    """Rank 0's progress. ``terminal``: a rich bar (step/total, loss, time left), metric lines printed
    above it (soft-wrapped by the terminal, not broken by rich). Otherwise no live display and no
    rich at all: metric lines go out as they are, one line each however long, and a plain line
    ``train: step 40/100 (40%), 2.31 steps/s, elapsed 0:00:17, ETA 0:00:26`` follows the first
    logged step, then at most one every ``every`` seconds, and the last step.
    """

    def __init__(self, total: int, step: int = 0, *, terminal: Optional[bool] = None, bar: bool = True,
                 every: float = 30.0, console=None, echo: Callable[[str], None] = _plain_print,
                 clock=time.monotonic):
        self.total, self.start_step, self.every, self.echo, self.clock = total, step, every, echo, clock
        self.terminal = sys.stdout.isatty() if terminal is None else terminal
        self.bar = bar
        self.console = console
        self.rich = None
        self.t0 = clock()
        self._last_line: Optional[float] = None
        if self.terminal and bar:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self.console = console or Console()
            self.rich = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(),
                                 console=self.console, transient=False)
            self._task = self.rich.add_task("train", total=total, completed=step, loss=float("nan"))

    def start(self, step: int) -> None:
        """The loop starts at ``step`` (after a resume: rate and ETA are this run's)."""
        self.start_step, self.t0 = step, self.clock()
        if self.rich is not None:
            self.rich.update(self._task, completed=step)
            self.rich.start()

    def stop(self) -> None:
        if self.rich is not None:
            self.rich.stop()

    def print_metrics(self, line: str) -> None:
        """One metric line: above the bar on a terminal, as it is in a log."""
        if self.rich is not None:
            self.console.print(line, soft_wrap=True)
        else:
            self.echo(line)

    def update(self, step: int, loss: float) -> None:
        if self.rich is not None:
            self.rich.update(self._task, completed=step, loss=loss)

    def logged(self, step: int) -> None:
        """After the metric line of ``step``: the plain progress line, when one is due."""
        if self.terminal or not self.bar:
            return
        now = self.clock()
        if self._last_line is None or now - self._last_line >= self.every or step >= self.total:
            self._last_line = now
            self.echo(self.line(step))

    def line(self, step: int) -> str:
        elapsed = max(1e-9, self.clock() - self.t0)
        rate = (step - self.start_step) / elapsed
        eta = str(timedelta(seconds=round((self.total - step) / rate))) if rate > 0 else "unknown"
        return (f"train: step {step}/{self.total} ({step / max(1, self.total):.0%}), {rate:.3g} steps/s, "
                f"elapsed {timedelta(seconds=round(elapsed))}, ETA {eta}")
