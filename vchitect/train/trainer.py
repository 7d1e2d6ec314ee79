"""The training loop: read it top to bottom.

    vchitect train CONFIG [overrides]                     (one process, or under torchrun)
    vchitect launch --nproc N train CONFIG [overrides]    (N local processes)

Set-up order: preflight of config and paths (no process group yet) → process group → model →
initial weights → trainable set → parallelize (TP → SP → AC → compile → FSDP) → optimizer,
schedule, EMA → data → resume. With meta init (``parallel.meta_init``) the model is built on the
meta device, the initial weights' keys are checked, and after parallelize only this rank's shards
are materialised and filled (from the checkpoint, or the constructor's init replayed). Each step: micro-batches (noise, timesteps and text dropout drawn
from a generator keyed on seed, data-parallel rank and step, so resumes repeat them exactly) →
gradient clip → skip if non-finite → optimizer, schedule, EMA → metrics → checkpoint → preemption.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from launch.local import free_port
from vchitect.config import Config, ConfigError, to_dict, to_yaml
from vchitect.diffusion.objective import (NullText, drop_text, rectified_flow_loss, sample_noise, sample_timesteps)
from vchitect.models import VchitectTransformer3DModel
from vchitect.models.flops import train_step_flops
from vchitect.parallel import (build_on_meta, clip_grad_norm_, generator_for_rank, manual_seed, materialize,
                               parallelize, total_grad_norm, use_meta_init)

from .checkpoint import CheckpointError, Checkpointer, read_meta, rng_state, set_rng_state
from .safe_dcp import UnsafeCheckpointError, read_metadata
from .ema import EMA
from .metrics import MetricWriter, TrainProgress, device_peak_flops, peak_memory_gib
from .optim import apply_trainable, build_optimizer, build_scheduler
from .preflight import init_from_error, preflight
from .signals import EXIT_PREEMPTED, PreemptionFlag

log = logging.getLogger("vchitect.train")


class NonFiniteLossError(RuntimeError):
    pass


def init_distributed(device_type: str) -> None:
    """Join the process group of torchrun / `vchitect launch` / Slurm, or make a 1-rank one."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no GPU is visible; use train.device=cpu or auto")
    return choice


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        tc = cfg.train
        # --- everything that can be wrong with the config or its paths fails here, before any process group
        self.dims = preflight(cfg, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        self.device_type = resolve_device(tc.device)

        init_distributed(self.device_type)
        self.rank = dist.get_rank()
        self.device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if self.device_type == "cuda"
                       else torch.device("cpu"))
        logging.basicConfig(level=logging.INFO if self.rank == 0 else logging.WARNING,
                            format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.out = Path(tc.output_dir)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(to_yaml(cfg))

        # --- model: identical initialisation on every rank, then sharded. With meta init it is built
        # on the meta device, sharded, and only this rank's shards are materialised and filled (the
        # same values, bitwise; docs/parallelism.md "Meta-device init")
        meta = use_meta_init(cfg.parallel.meta_init, self.dims, tc.init_from)
        torch.manual_seed(tc.seed)
        build = lambda: VchitectTransformer3DModel(**dataclasses.asdict(cfg.model))  # noqa: E731
        self.model, init_record = build_on_meta(build) if meta else (build(), None)
        weights = self._load_initial_weights(tc.init_from, stream=meta) if tc.init_from else None
        self.trainable = apply_trainable(self.model, tc.trainable)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # before sharding: whole tensors
        self.n_trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if not meta:
            self.model.to(self.device)
        self.model.train()
        parallelize(self.model, self.dims, cfg.parallel, device_type=self.device_type)
        if meta:
            materialize(self.model, init_record, torch.device("cpu") if cfg.parallel.cpu_offload else self.device,
                        seed=tc.seed, weights=weights)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.sp_group = self.dims.mesh("sp").get_group() if self.dims.sp_enabled else None

        self.optimizer = build_optimizer(self.model, tc, self.device_type)
        self.scheduler = build_scheduler(self.optimizer, tc)
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None

        # --- data
        from vchitect.data import build_loader

        self.loader = build_loader(cfg.data, dp_rank=self.dims.dp_rank, dp_size=self.dims.dp)
        self.vae, self.text_encoder = self._load_encoders()
        self.null_text = self._null_text()

        # --- checkpoints, metrics, signals
        self.checkpointer = Checkpointer(self.out / "checkpoints", tc.keep_checkpoints,
                                         async_save=tc.async_checkpoint and self.device_type == "cuda",
                                         simulate_crash=tc.simulate_crash, checksums=tc.checkpoint_checksums)
        self.step = 0
        # rank 0: a bar on a terminal, plain progress lines in a log; metric lines never wrapped
        self.progress = TrainProgress(tc.steps, bar=tc.progress and self.rank == 0)
        self.writer = MetricWriter(self.out, self.rank == 0, tc.tensorboard, tc.wandb.mode, tc.wandb.project,
                                   to_dict(cfg), printer=self.progress.print_metrics)
        self.peak_flops = device_peak_flops(tc.peak_flops, self.device_type)
        self.preemption = PreemptionFlag()
        self.nonfinite_total = 0
        self.nonfinite_run = 0
        self.resumed_from: Optional[Path] = None
        self._resume()
        if self.rank == 0:
            log.info("%s", self.banner())

    def banner(self) -> str:
        """The start-up summary rank 0 logs: world size, layout, parameters, output folder, resume point."""
        tc = self.cfg.train
        start = (f"resumed from {self.resumed_from} at step {self.step}" if self.resumed_from is not None
                 else "fresh start (no checkpoint to resume)")
        rows = [("world size", f"{dist.get_world_size()} × {self.device_type} ({dist.get_backend()})"),
                ("layout", self.dims.describe().removeprefix("layout ")),
                ("parameters", f"{_count(self.n_params)} ({_count(self.n_trainable)} trainable)"),
                ("output", str(self.out.resolve())),
                ("steps", f"{self.step} → {tc.steps}; {start}")]
        return "vchitect train\n" + "\n".join(f"  {k:<11} {v}" for k, v in rows)

    # ------------------------------------------------------------------ set-up helpers
    def _load_initial_weights(self, spec: str, stream: bool):
        """Load ``train.init_from`` into the model, or (``stream``, meta init) check its keys and shapes
        and return the checkpoint for :func:`materialize` to read shard by shard."""
        from vchitect.models.weights import WeightImportError, init_from_sd3, load_vchitect2, open_initial_weights

        kind, path = spec.split(":", 1)
        try:
            if stream:
                return open_initial_weights(kind, path, self.model)
            (load_vchitect2 if kind == "vchitect2" else init_from_sd3)(path, self.model)
        except WeightImportError as exc:  # keys or shapes that do not fit: the config's mistake
            raise init_from_error(spec, exc) from None
        return None

    def _load_encoders(self):
        from vchitect.data.encode import load_encoders

        mesh = self.dims.data_parallel_mesh() if self.cfg.data.encoders.shard and self.dims.world_size > 1 else None
        return load_encoders(self.cfg.data, self.device, shard_mesh=mesh)

    def _null_text(self) -> NullText:
        d = self.cfg.data.text
        if self.text_encoder is not None:
            text, mask, pooled = self.text_encoder.encode([""])
            return NullText(text[0].float().cpu(), mask[0].cpu(), pooled[0].float().cpu())
        return NullText.zeros(d.max_length, d.dim, d.pooled_dim)

    # ------------------------------------------------------------------ checkpoint state
    def _state(self) -> dict:
        """What a checkpoint holds. The data-loader and RNG states are single JSON strings, which DCP
        stores and restores whole, whatever the resuming run's loader holds at that moment."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd,
                 "lr_scheduler": self.scheduler.state_dict(), "step": self.step,
                 f"dataloader_dp{self.dims.dp_rank}": json.dumps(self.loader.state_dict()),
                 f"rng_rank{self.rank}": rng_state()}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def save_checkpoint(self) -> None:
        meta = {"step": self.step, "world_size": dist.get_world_size(), "layout": self.dims.describe(),
                "config": to_dict(self.cfg)}
        self.checkpointer.save(self.step, self._state(), meta)

    def _resume(self) -> None:
        path = self.checkpointer.resolve_resume(self.cfg.train.resume)  # ConfigError when it does not verify
        if path is None:
            return
        try:
            self._restore(path)
        except (CheckpointError, UnsafeCheckpointError) as exc:
            raise ConfigError(f"cannot resume from {path}: {exc}. Resume from another step-… folder "
                              f"(train.resume=PATH) or start fresh (train.resume=none)") from None
        self.resumed_from = path

    def _restore(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        present = set(read_metadata(path).state_dict_metadata)
        state = self._state()
        own_loader_key = f"dataloader_dp{self.dims.dp_rank}"
        # the loader state of a DP rank the saving run did not have: take rank 0's (restarts its epoch)
        loader_key = own_loader_key if own_loader_key in present else "dataloader_dp0"
        state[loader_key] = state.pop(own_loader_key)
        state = self.checkpointer.load(path, state, present)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.step = int(state["step"])
        meta = read_meta(path)
        if loader_key in present:
            try:
                loader_state = json.loads(state[loader_key])
            except (TypeError, json.JSONDecodeError) as exc:
                raise CheckpointError(f"its {loader_key} entry is not JSON ({exc})") from None
            self.loader.load_state_dict(loader_state)
        else:
            log.warning("%s has no data-loader state vchitect can read (saved by an older version?): the data "
                        "stream starts from the beginning", path)
        rng_key = f"rng_rank{self.rank}"
        if meta.get("world_size") == dist.get_world_size() and rng_key in present:
            set_rng_state(state[rng_key])
        log.info("resumed from %s at step %d (saved on %s ranks as %s)", path, self.step, meta.get("world_size"),
                 meta.get("layout"))

    def _without_condition(self, batch: dict) -> dict:
        """The data carries task conditions but the model has no condition adapter: train text-only."""
        if not getattr(self, "_warned_condition", False):
            log.warning("the batches carry a task condition (batch['condition']) but model.condition_channels=0, "
                        "so the model has no condition adapter and ignores it; set model.condition_channels=4 "
                        "(5 with depth) to train multi-task conditioning")
            self._warned_condition = True
        return {k: v for k, v in batch.items() if k != "condition"}

    # ------------------------------------------------------------------ one optimizer step
    def train_step(self, batches: list[dict]) -> dict:
        """Forward/backward over the micro-batches, clip, and step unless the result is non-finite."""
        from vchitect.data import encode_batch

        tc, accum = self.cfg.train, len(batches)
        loss_sum = torch.zeros((), device=self.device)
        flops = 0.0
        samples = tokens = 0
        manual_seed(tc.seed, self.dims, self.step)  # dropout: equal within an SP/TP group
        for micro, batch in enumerate(batches):
            batch = encode_batch(batch, self.vae, self.text_encoder, self.device, sp_group=self.sp_group)
            if batch.get("condition") is not None and not self.cfg.model.condition_channels:
                batch = self._without_condition(batch)
            g = generator_for_rank(tc.seed, self.dims, step=self.step * accum + micro)
            x0 = batch["latents"]
            B, _, Fr, H, W = x0.shape
            p = self.cfg.model.patch_size
            tok = Fr * (H // p) * (W // p)
            batch = drop_text(batch, self.null_text, self.cfg.diffusion.text_dropout, g)
            t = sample_timesteps(self.cfg.diffusion, B, tok, g)
            noise = sample_noise(x0.shape, g, self.device, x0.dtype)
            loss = rectified_flow_loss(self.model, batch, t, noise, self.cfg.diffusion) / accum
            loss.backward()
            loss_sum += loss.detach()
            flops += train_step_flops(self.cfg.model, B, Fr, H, W, batch["text"].shape[1])
            samples += B
            tokens += B * tok
        grad_norm = (clip_grad_norm_(self.params, tc.grad_clip) if tc.grad_clip > 0
                     else total_grad_norm(self.params))
        loss_avg = loss_sum.clone()
        if dist.get_world_size() > 1:
            dist.all_reduce(loss_avg)
            loss_avg /= dist.get_world_size()
        finite = bool(torch.isfinite(loss_avg).item()) and bool(torch.isfinite(grad_norm).item())
        if finite:
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update()
            self.nonfinite_run = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            log.warning("step %d: non-finite loss or gradient (loss %s, grad norm %s); step skipped (%d in a row)",
                        self.step, loss_avg.item(), float(grad_norm), self.nonfinite_run)
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite_run >= tc.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"{self.nonfinite_run} consecutive steps had a non-finite loss or gradient (last at step {self.step}); "
                f"lower train.lr, check the data, or resume from an earlier checkpoint")
        group = self.dims.sp * self.dims.tp  # ranks sharing one batch
        return {"loss": loss_avg.item(), "grad_norm": float(grad_norm), "skipped": not finite,
                "flops_per_device": flops / group, "samples": samples * self.dims.dp, "tokens": tokens * self.dims.dp}

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        tc = self.cfg.train
        data = iter(self.loader)
        progress = self.progress
        progress.start(self.step)
        window = {"time": 0.0, "wait": 0.0, "flops": 0.0, "samples": 0, "tokens": 0, "steps": 0}
        exit_code = 0
        try:
            while self.step < tc.steps:
                t0 = time.perf_counter()
                batches = [next(data) for _ in range(tc.grad_accum)]
                t1 = time.perf_counter()
                out = self.train_step(batches)
                if self.device_type == "cuda":
                    torch.cuda.synchronize()
                t2 = time.perf_counter()
                self.step += 1
                window["time"] += t2 - t0
                window["wait"] += t1 - t0
                window["flops"] += out["flops_per_device"]
                window["samples"] += out["samples"]
                window["tokens"] += out["tokens"]
                window["steps"] += 1
                progress.update(self.step, out["loss"])
                if self.step % tc.log_every == 0 or self.step == tc.steps:
                    self._log(out, window)
                    progress.logged(self.step)
                    window = dict.fromkeys(window, 0.0)
                if tc.validation.every and self.step % tc.validation.every == 0:
                    self._validate()
                if (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) or self.step == tc.steps:
                    self.save_checkpoint()
                self.checkpointer.crash_if("at_step", self.step)
                if self.preemption.agreed(self.device):
                    log.warning("preemption signal received: saving step %d and exiting with %d", self.step,
                                EXIT_PREEMPTED)
                    if not (tc.checkpoint_every and self.step % tc.checkpoint_every == 0) and self.step != tc.steps:
                        self.save_checkpoint()
                    exit_code = EXIT_PREEMPTED
                    break
            self.checkpointer.wait()
        finally:
            progress.stop()
            self.writer.close()
        return exit_code

    def _log(self, out: dict, window: dict) -> None:
        n = max(1, window["steps"])
        step_time = window["time"] / n
        metrics = {"loss": out["loss"], "grad_norm": out["grad_norm"], "lr": self.scheduler.get_last_lr()[0],
                   "samples_per_s": window["samples"] / window["time"], "tokens_per_s": window["tokens"] / window["time"],
                   "step_time": step_time, "data_wait": window["wait"] / window["time"],
                   "peak_mem_gib": peak_memory_gib(self.device_type), "nonfinite_steps": self.nonfinite_total}
        achieved = window["flops"] / window["time"]
        metrics["tflops"] = achieved / 1e12
        if self.peak_flops:
            metrics["mfu"] = achieved / self.peak_flops
        metrics.update(self.loader.metrics())
        self.writer.log(self.step, metrics)

    def _validate(self) -> None:
        from .validation import run_validation

        run_validation(self)


def _count(n: int) -> str:
    """A parameter count for people: 2.05B, 13.4M, 86.2K, 512."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def train(cfg: Config) -> int:
    trainer = Trainer(cfg)
    finished = False
    try:
        code = trainer.run()
        finished = True
        return code
    finally:
        if dist.is_initialized():
            if finished:
                # Leave together: a rank tearing down its group while another still talks to it can
                # abort at exit (seen once on a 2-node gloo job). Only after a clean finish — after a
                # rank-local error the others may never reach this barrier.
                dist.barrier()
            dist.destroy_process_group()
