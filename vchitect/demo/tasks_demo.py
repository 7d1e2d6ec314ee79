"""``vchitect demo --tasks``: the Many-for-Many learning proof on the demo world (docs/demo.md, "Multi-task").

    1 base     the T2V demo model: ``--base DIR`` (the output folder of a ``vchitect demo`` run: its
               export/ and shards/), else the T2V demo is run first into OUT/base
    2 shards   motion clips that start anywhere (task_world.py) and removal pairs (removal.py)
    3 train    `vchitect launch --nproc 2 train configs/train/demo-tasks.yaml`: the base weights plus
               the zero-initialised condition adapter, five tasks at once
    4 probe    i2v, itrans, vinp, removal and t2v on conditions never seen in training, measured from
               the pixels of the raw output (nothing pasted), for the fine-tuned and the base model
    5 write    OUT/tasks_summary.json, OUT/tasks_sheet.png (condition | output per probe), a table

The probes (vchitect.eval.probe): i2v — frame-0 centroid within 1.5 px of the given frame's (16-px
frames), colour kept, direction of the prompt; itrans — middle-frame centroid within 2 px of the straight
path between the given first and last frames; vinp — inside a box that hides the object's path in the
middle frames, the centroid within 2 px of the truth; removal — the named object's colour absent from
every frame and the other object where the source has it; t2v — colour and direction of the prompt.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .run import CONFIGS, _run, console, eval_prompts, quiet_offline, stage_clock, text_encoder_path

FRAMES, SIZE, FPS = 8, 16, 4.5   # the demo bucket and sampling rate (configs/train/demo.yaml)
PROBE_SEED = 7_000_000          # probe conditions are drawn from seeds far from the training ones
TARGETS = {"i2v": "centroid ≤ 1.5 px & colour ≥ 90 % & direction ≥ 80 %", "itrans": "≤ 2 px in ≥ 80 %",
           "vinp": "≤ 2 px in ≥ 80 %", "removal": "≥ 80 %", "t2v": "within 5 points of the base"}


@dataclass
class TasksSettings:
    out: Path
    base: Path | None = None       # a `vchitect demo` output folder (export/ + shards/); None: run it first
    motion_clips: int = 1200
    removal_pairs: int = 300
    removal_radius: float = 0.21   # of the frame side (the pairs' default 0.17 is 2.7 px at 16 px: lost in noise)
    steps: int = 3000
    sample_steps: int = 25
    guidance: float = 4.0
    probes: int = 40               # conditions per conditional task
    seed: int = 0
    quick: bool = False
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick_settings(cls, out: Path, base: Path | None = None, overrides=None) -> "TasksSettings":
        return cls(out=out, base=base, motion_clips=24, removal_pairs=8, steps=4, sample_steps=3, probes=3,
                   quick=True, overrides=list(overrides or []))


# ------------------------------------------------------------------ probe conditions
def _decode(mp4: bytes, rng_seed: int, indices=None) -> tuple[np.ndarray, list[int]]:
    """``mp4`` through the loader's decoder at the demo bucket: F×H×W×3 uint8 and the source frames."""
    from ..data.buckets import Bucket
    from ..data.decode import decode_video

    px, _, frames = decode_video(mp4, lambda info: Bucket(SIZE, SIZE, FRAMES), FPS,
                                 np.random.default_rng(rng_seed), indices=indices)
    return np.ascontiguousarray(px.transpose(1, 2, 3, 0)), frames


@dataclass
class Probe:
    task: str
    prompt: str                 # without the #task: suffix
    condition: np.ndarray       # F×H×W×3 uint8, unknown pixels 0
    mask: np.ndarray            # F×H×W uint8, 1 = known
    truth: np.ndarray           # F×H×W×3 uint8: the clip the condition was made from (removal: the source)
    meta: dict


def motion_probes(task: str, n: int, seed: int = PROBE_SEED) -> list[Probe]:
    """``n`` held-out conditions of ``task`` (i2v, itrans, vinp) from motion clips, each one whose
    geometry the probe can judge (the object wholly inside the given frames; for vinp, the hole
    covering the object wholly in some frame where it is inside)."""
    from data_pipeline.synthetic import caption_for

    from ..eval.probe import object_mask, object_track
    from .task_world import clip_members, render_motion_clip

    out: list[Probe] = []
    k = 0
    while len(out) < n:
        clip = render_motion_clip(seed + k)
        k += 1
        truth, _ = _decode(clip_members(clip, "probe")["mp4"], seed + k)
        _, inside = object_track(truth, clip.color)
        mask = np.zeros(truth.shape[:3], np.uint8)
        if task == "i2v":
            if not inside[0]:
                continue
            mask[0] = 1
        elif task == "itrans":
            if not (inside[0] and inside[-1]):
                continue
            mask[[0, -1]] = 1
        elif task == "vinp":
            mid = list(range(FRAMES // 4, FRAMES - FRAMES // 4))      # frames 2–5 of 8
            obj = object_mask(truth, clip.color)
            if not any(inside[f] for f in mid) or not obj[mid].any():
                continue
            ys, xs = np.nonzero(obj[mid].any(0))
            t, b = max(0, ys.min() - 2), min(SIZE, ys.max() + 3)
            l, r = max(0, xs.min() - 2), min(SIZE, xs.max() + 3)
            mask[:] = 1
            mask[mid, t:b, l:r] = 0
        else:
            raise ValueError(f"motion_probes: task {task!r} is not i2v, itrans or vinp")
        cond = truth * mask[..., None]
        out.append(Probe(task, caption_for(clip.color, clip.shape, clip.direction), cond, mask, truth,
                         {"color": clip.color, "direction": clip.direction, "seed": clip.seed}))
    return out


def removal_probes(n: int, seed: int = PROBE_SEED, radius: float | None = None) -> list[Probe]:
    """``n`` held-out removal pairs at the demo bucket: the source as the condition (all known)."""
    from .removal import pair_members, render_removal_pair

    out = []
    for i in range(n):
        pair = render_removal_pair(seed + i, **({} if radius is None else {"radius": radius}))
        members = pair_members(pair, "probe")
        target, frames = _decode(members["mp4"], seed + i)
        source, _ = _decode(members["src.mp4"], seed + i, indices=frames)
        out.append(Probe("vedit", pair.instruction, source, np.ones(source.shape[:3], np.uint8), source,
                         {"removed": pair.removed["color"], "kept": pair.kept["color"], "target": target,
                          "seed": pair.seed}))
    return out


# ------------------------------------------------------------------ sampling and judging
PIPE_INPUTS = {  # how each probe's condition is given to VchitectPipeline (docs/sampling.md, "Tasks")
    "i2v": lambda p: {"image": p.truth[0]},
    "itrans": lambda p: {"image": (p.truth[0], p.truth[-1])},
    "vinp": lambda p: {"video": p.truth, "mask": p.mask},
    "vedit": lambda p: {"video": p.truth},
}


def sample_probes(pipe, probes: list[Probe], seed: int, steps: int, guidance: float, tasks: bool,
                  batch: int = 64) -> np.ndarray:
    """The raw output (N×F×H×W×3 uint8, ``paste_known=False``) of the pipeline for each probe, all of
    one task. ``tasks``: the model has the condition adapter and gets the task and its inputs (the
    pipeline adds the #task: suffix); else (the base model) the bare prompt."""
    import torch

    from .run import _to_uint8

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(probes), batch):
        chunk = probes[i:i + batch]
        kw = {}
        if tasks:
            given = [PIPE_INPUTS[p.task](p) for p in chunk]
            kw = {"task": chunk[0].task, "paste_known": False, **{k: [x[k] for x in given] for k in given[0]}}
        video = pipe([p.prompt for p in chunk], num_frames=FRAMES, height=SIZE, width=SIZE,
                     num_inference_steps=steps, guidance_scale=guidance, generator=g, output_type="np", **kw).frames
        out.append(_to_uint8(video))
    return np.concatenate(out)


def probe_condition(pipe, p: Probe) -> tuple[np.ndarray, np.ndarray]:
    """The (condition, mask) the pipeline builds for probe ``p`` (F×H×W×3, F×H×W uint8): what the
    sheet shows, and what tests compare with the probe's own."""
    _, _, _, _, built = pipe.prepare_task(p.task, 1, FRAMES, SIZE, SIZE, **PIPE_INPUTS[p.task](p))
    cond, mask = built
    return np.asarray(cond[0]).transpose(1, 2, 3, 0), np.asarray(mask[0, 0])


def judge(task: str, probes: list[Probe], videos: np.ndarray) -> dict:
    """Per-task figures of the probes (see the module docstring) and the per-probe records."""
    from ..eval.probe import object_track, probe_i2v, probe_inpaint, probe_itrans, probe_removal

    rows = []
    for p, v in zip(probes, videos):
        if task == "i2v":
            r = probe_i2v(v, p.truth[0], p.meta["color"]).as_dict()
            r["direction_ok"] = r["direction"] == p.meta["direction"]
        elif task == "itrans":
            r = probe_itrans(v, p.truth[0], p.truth[-1], p.meta["color"]).as_dict()
            # stricter: the distance from where the truth has it at that frame (speed matters too)
            xy, _ = object_track(v, p.meta["color"])
            ref, _ = object_track(p.truth, p.meta["color"])
            m = FRAMES // 2
            d = float(np.linalg.norm(xy[m] - ref[m]))
            r["truth_error"] = d if np.isfinite(d) else float("inf")
        elif task == "vinp":
            r = probe_inpaint(v, p.truth, p.mask == 0, p.meta["color"]).as_dict()
        elif task == "vedit":
            rm = probe_removal(v, p.truth, p.meta["removed"], p.meta["kept"])
            r = dict(rm.__dict__, ok=rm.ok)
        else:
            raise ValueError(task)
        r["seed"] = p.meta["seed"]
        rows.append(r)
    n = len(rows)
    figs = {"n": n, "ok": sum(r["ok"] for r in rows) / n}
    if task == "i2v":
        figs.update(color=sum(r["color_kept"] for r in rows) / n,
                    direction=sum(r["direction_ok"] for r in rows) / n,
                    median_error_px=float(np.median([r["error"] for r in rows])))
    elif task in ("itrans", "vinp"):
        figs["median_error_px"] = float(np.median([r["error"] for r in rows]))
    if task == "itrans":
        figs["truth_ok"] = sum(r["truth_error"] <= r["max_error"] for r in rows) / n
    return {"figures": figs, "rows": rows}


def t2v_probe(pipe, seed: int, steps: int, guidance: float, tasks: bool, quick: bool = False) -> dict:
    """Colour and direction accuracy of text-to-video on every colour × shape × direction prompt."""
    from ..data.tasks import TASKS, task_caption
    from ..eval.probe import probe_video, score
    from .corpus import HELD_OUT
    from .run import generate

    prompts = eval_prompts()[:4] if quick else eval_prompts()
    shown = [task_caption(p, TASKS["t2v"]) for p in prompts] if tasks else prompts
    videos = generate(pipe, shown, seed, steps, guidance, FRAMES, SIZE)
    acc = score(prompts, [probe_video(v) for v in videos], held_out=HELD_OUT)
    return {"figures": acc, "videos": videos}


def probe_sets(s: TasksSettings) -> dict[str, list[Probe]]:
    """The held-out conditions of every conditional task (rendered, encoded and decoded once; every
    model is judged on the same ones)."""
    sets = {t: motion_probes(t, s.probes) for t in ("i2v", "itrans", "vinp")}
    sets["vedit"] = removal_probes(s.probes, radius=s.removal_radius)
    return sets


def probe_model(pipe, s: TasksSettings, sets: dict[str, list[Probe]], tasks: bool) -> dict:
    """Every probe (``sets``: :func:`probe_sets`) on one model: {task: {figures, rows}}, plus the videos
    for the sheet."""
    out, videos = {}, {}
    for k, (task, probes) in enumerate(sets.items()):
        v = sample_probes(pipe, probes, 5000 + k, s.sample_steps, s.guidance, tasks)
        out[task] = judge(task, probes, v)
        videos[task] = (probes, v)
    t2v = t2v_probe(pipe, 1000, s.sample_steps, s.guidance, tasks, s.quick)
    out["t2v"] = {"figures": t2v["figures"]}
    return {"results": out, "videos": videos}


def task_sheet(path: Path, videos: dict, per_task: int = 4, scale: int = 6) -> Path:
    """Rows of (condition frames, unknown pixels as a magenta checker | generated frames) for the first
    ``per_task`` probes of each task."""
    from PIL import Image, ImageDraw

    rows = [(t, p, v) for t, (probes, vids) in videos.items() for p, v in list(zip(probes, vids))[:per_task]]
    F, H, W = FRAMES, SIZE, SIZE
    cell, pad, label_w = W * scale, 2, 200
    sheet = Image.new("RGB", (label_w + 2 * F * (cell + pad) + 12, len(rows) * (cell + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (task, p, v) in enumerate(rows):
        y = i * (cell + pad)
        draw.text((4, y + cell // 2 - 12), f"{task}: {p.prompt}"[:32], fill=(0, 0, 0))
        checker = np.where((np.indices((H, W)).sum(0) % 2)[..., None] > 0, (255, 0, 255), (0, 0, 0))
        cond = np.where(p.mask[..., None] > 0, p.condition, checker).astype(np.uint8)  # unknown: a checker
        for f in range(F):
            for j, frames in enumerate((cond, v)):
                img = Image.fromarray(frames[f]).resize((cell, cell), Image.NEAREST)
                sheet.paste(img, (label_w + j * (F * (cell + pad) + 12) + f * (cell + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


# ------------------------------------------------------------------ steps
def write_task_shards(out: Path, s: TasksSettings) -> dict:
    from .removal import write_removal_shards
    from .task_world import write_motion_shards

    def written(folder: Path, n: int, **kw) -> bool:  # a finished folder of the same draw: keep it
        try:
            stats = json.loads((folder / "stats.json").read_text())
        except (OSError, ValueError):
            return False
        return ((folder / "_SUCCESS").exists() and stats["counts"]["clips_written"] == n
                and all(stats["this_run"].get(k) == v for k, v in dict(kw, seed=s.seed).items()))

    t0 = time.time()
    for folder, n, write, kw in ((out / "motion", s.motion_clips, write_motion_shards, {}),
                                 (out / "removal", s.removal_pairs, write_removal_shards,
                                  {"radius": s.removal_radius})):
        if not written(folder, n, **kw):
            write(str(folder), n, seed=s.seed, **kw)
    return {"motion_clips": s.motion_clips, "removal_pairs": s.removal_pairs, "seconds": time.time() - t0}


def ensure_base(s: TasksSettings) -> Path:
    """The T2V base folder: ``--base`` (checked), else run the T2V demo into OUT/base."""
    if s.base is not None:
        base = Path(s.base).resolve()
        missing = [n for n in ("export/model_index.json", "shards/_SUCCESS") if not (base / n).exists()]
        if missing:
            raise SystemExit(f"--base {base}: not a finished `vchitect demo` output folder (missing "
                             f"{', '.join(missing)}); run `vchitect demo --out {base}` first, or drop --base")
        return base
    from .run import DemoSettings, run_demo

    base = s.out / "base"
    ds = DemoSettings.quick_settings(base) if s.quick else DemoSettings(out=base)
    run_demo(ds)
    return base


def train_overrides(s: TasksSettings, base: Path) -> list[str]:
    import yaml

    # the recipe's sources (weights, per-source tasks) with this run's folders: T2V clips, motion, removal
    sources = yaml.safe_load((CONFIGS / "train/demo-tasks.yaml").read_text())["data"]["sources"]
    for src, uri in zip(sources, (base / "shards", s.out / "motion", s.out / "removal")):
        src["uri"] = str(uri)
    ov = [f"data.sources={json.dumps(sources)}",
          f"train.output_dir={s.out / 'run'}", f"train.init_from=vchitect2:{base / 'export'}",
          f"train.steps={s.steps}", "train.resume=none", f"train.seed={s.seed}", "train.wandb.mode=disabled",
          f"data.encoders.text_encoder_path={text_encoder_path()}"]
    if s.quick:
        ov += ["train.log_every=1", "train.warmup_steps=1"]
    return ov + list(s.overrides)


def step_train(s: TasksSettings, base: Path) -> dict:
    run = s.out / "run"
    if run.exists():
        shutil.rmtree(run)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    t0 = time.time()
    _run([sys.executable, "-m", "vchitect.cli", "launch", "--nproc", "2", "train",
          str(CONFIGS / "train/demo-tasks.yaml"), *train_overrides(s, base)], s.out / "logs" / "train.log", env=env)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r for r in records if "loss" in r]
    return {"seconds": time.time() - t0, "steps": losses[-1]["step"] if losses else 0,
            "first_loss": float(np.mean([r["loss"] for r in losses[:5]])) if losses else float("nan"),
            "final_loss": float(np.mean([r["loss"] for r in losses[-5:]])) if losses else float("nan"),
            "step_time": float(np.median([r["step_time"] for r in losses])) if losses else float("nan")}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def describe(res: dict) -> dict[str, str]:
    r = {t: res[t]["figures"] for t in res}
    i, t2v = r["i2v"], r["t2v"]
    return {
        "i2v": f"centroid ok {_pct(i['ok'])} (median {i['median_error_px']:.2f} px) · colour {_pct(i['color'])} · "
               f"direction {_pct(i['direction'])} (n={i['n']})",
        "itrans": f"{_pct(r['itrans']['ok'])} within 2 px of the path (median {r['itrans']['median_error_px']:.2f} px); "
                  f"{_pct(r['itrans']['truth_ok'])} within 2 px of the truth (n={r['itrans']['n']})",
        "vinp": f"{_pct(r['vinp']['ok'])} within 2 px (median {r['vinp']['median_error_px']:.2f} px; n={r['vinp']['n']})",
        "removal": f"{_pct(r['vedit']['ok'])} removed and kept (n={r['vedit']['n']})",
        "t2v": f"colour {_pct(t2v['train']['color'])} · direction {_pct(t2v['train']['direction'])} (training combos); "
               f"held-out {_pct(t2v['held_out']['color'])} · {_pct(t2v['held_out']['direction'])}"}


def run_tasks_demo(s: TasksSettings) -> dict:
    from rich.table import Table

    from ..export.export import pipeline_from_checkpoint

    quiet_offline()
    s.out = Path(s.out).resolve()
    s.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_start = time.time()
    stage = stage_clock("tasks ", 5)

    t = stage(1, "the T2V base model")
    base = ensure_base(s)
    seconds["base"] = time.time() - t
    t = stage(2, "motion clips and removal pairs")
    shards = write_task_shards(s.out, s)
    seconds["shards"] = time.time() - t
    console.print(f"  {shards['motion_clips']} motion clips, {shards['removal_pairs']} removal pairs")
    t = stage(3, f"multi-task fine-tuning on CPU, 2 processes, {s.steps} steps")
    train = step_train(s, base)
    seconds["train"] = time.time() - t
    t = stage(4, "probes: the fine-tuned model, then the base model")
    import torch
    from diffusers import DiffusionPipeline

    import vchitect.export  # noqa: F401  (registers VchitectPipeline)

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    tuned = pipeline_from_checkpoint(s.out / "run" / "checkpoints", ema=True)
    tuned.set_progress_bar_config(disable=True)
    sets = probe_sets(s)
    got = probe_model(tuned, s, sets, tasks=True)
    base_pipe = DiffusionPipeline.from_pretrained(str(base / "export"))
    base_pipe.set_progress_bar_config(disable=True)
    ref = probe_model(base_pipe, s, sets, tasks=False)
    seconds["probe"] = time.time() - t
    t = stage(5, f"writing {s.out}")
    task_sheet(s.out / "tasks_sheet.png", got["videos"])
    task_sheet(s.out / "tasks_sheet_base.png", ref["videos"])
    seconds["total"] = time.time() - t_start
    summary = {"out": str(s.out), "base": str(base), "shards": shards, "train": train,
               "tuned": got["results"], "base_model": ref["results"], "targets": TARGETS, "seconds": seconds,
               "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in s.__dict__.items()}}
    (s.out / "tasks_summary.json").write_text(json.dumps(summary, indent=1, default=float))
    table = Table(title="vchitect demo --tasks", header_style="bold")
    for col in ("probe", "fine-tuned (raw output)", "base T2V model", "target"):
        table.add_column(col)
    a, b = describe(got["results"]), describe(ref["results"])
    for k in a:
        table.add_row(k, a[k], b[k], TARGETS[k])
    table.add_row("training", f"{train['steps']} steps, loss {train['first_loss']:.3f} → {train['final_loss']:.3f}, "
                  f"{train['step_time']:.2f} s/step", "", "")
    table.add_row("wall time", " · ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), "", "")
    console.print(table)
    return summary


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m vchitect.demo.tasks_demo")
    p.add_argument("--write-shards", metavar="OUT", help="only write OUT/motion and OUT/removal")
    a = p.parse_args(argv)
    if a.write_shards:
        print(write_task_shards(Path(a.write_shards), TasksSettings(out=Path(a.write_shards))))
        return 0
    p.error("use `vchitect demo --tasks` (this entry only writes the shards)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
