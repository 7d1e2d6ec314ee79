"""`vchitect` command line: one entry point, one small function per subcommand.

    vchitect config show CONFIG [key=value …]     print the resolved config
    vchitect config describe                      every key, its type, default and meaning
    vchitect model-info CONFIG --frames F --height H --width W [key=value …]
                                                  parameter count and step FLOPs
    vchitect train CONFIG [key=value …] [--resume auto|none|DIR]
    vchitect launch --nproc N train CONFIG …      N local ranks (signals forwarded)
    vchitect export CKPT OUT [--ema] [--dtype …]  checkpoint → diffusers pipeline folder
    vchitect sample (CONFIG CKPT | EXPORT_DIR) --prompt … --out video.mp4 [--preset vchitect2-released]
                    [--task i2v --image first.png …]  a Many-for-Many task (docs/sampling.md)
    vchitect submit (train|curate) CONFIG --nodes N --gpus-per-node G [--dry-run]
    vchitect demo [--out demo_out] [--quick]      the whole pipeline on CPU (docs/demo.md); --smoke: one step;
                                                   --tasks [--base DEMO_OUT]: the multi-task learning proof
    vchitect eval VIDEOS_DIR                      VBench-style metrics and the prompt-following probe
    vchitect eval layers EXPORT_DIR … --prompt … --out DIR
                                                  RepVideo's per-layer diagnostic (attention maps, frames)
    vchitect --version

Start-up stays light: this module imports only the standard library, and each command imports what
it needs when it runs (``--help``, ``--version`` and ``config show|describe`` import no torch,
diffusers, ray, transformers or rich; ``tests/unit/test_cli_imports.py`` checks it).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

_console = None


def console():
    """The rich console of tables and error lines, created on first use (rich costs ~0.2 s to import)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console()
    return _console


def package_version() -> str:
    """The installed distribution's version (package metadata); a checkout that was never installed
    says so and reports ``vchitect.__version__``."""
    from importlib import metadata

    try:
        return metadata.version("vchitect")
    except metadata.PackageNotFoundError:
        from vchitect import __version__

        return f"{__version__} (not installed)"


class VersionAction(argparse.Action):
    """``--version``: print ``PROG VERSION`` and exit; the metadata is read only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print the version and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} {package_version()}")
        parser.exit()


def cmd_config_show(args) -> int:
    from .config import load_config, to_yaml

    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def cmd_config_describe(args) -> int:
    from .config import Config, reference_table

    sys.stdout.write(reference_table(Config))
    return 0


def cmd_model_info(args) -> int:
    from rich.table import Table

    from .config import ConfigError, load_config
    from .models.flops import count_parameters, model_flops

    cfg = load_config(args.config, args.overrides)
    m = cfg.model
    if args.height % args.vae_downsample or args.width % args.vae_downsample:
        raise ConfigError(f"--height {args.height} / --width {args.width} must be divisible by "
                          f"--vae-downsample {args.vae_downsample}")
    lh, lw = args.height // args.vae_downsample, args.width // args.vae_downsample
    lf = (args.frames - 1) // args.vae_temporal + 1 if args.vae_temporal > 1 else args.frames
    if lh % m.patch_size or lw % m.patch_size:
        raise ConfigError(f"latent {lh}×{lw} is not divisible by model.patch_size={m.patch_size}")
    if max(lh, lw) // m.patch_size > m.pos_embed_max_size:
        raise ConfigError(f"a {lh}×{lw} latent exceeds model.pos_embed_max_size={m.pos_embed_max_size} patches")
    params = count_parameters(m)
    fc = model_flops(m, args.batch, lf, lh, lw, args.text_len)
    tokens = args.batch * lf * (lh // m.patch_size) * (lw // m.patch_size)

    table = Table(title=f"{args.config}", show_header=False)
    table.add_row("parameters", f"{params:,}")
    table.add_row("width × layers × heads", f"{m.num_attention_heads * m.attention_head_dim} × {m.num_layers} × "
                  f"{m.num_attention_heads} (head dim {m.attention_head_dim})")
    table.add_row("input (pixels)", f"{args.batch} × {args.frames} frames × {args.height} × {args.width}")
    table.add_row("latent", f"{m.in_channels} × {lf} × {lh} × {lw} (VAE ÷{args.vae_downsample} spatial, "
                  f"÷{args.vae_temporal} temporal)")
    table.add_row("video tokens", f"{tokens:,} (+ {args.text_len} text tokens per frame)")
    table.add_row("forward FLOPs", f"{fc.forward_total:.4e}")
    table.add_row("train-step FLOPs (fwd+bwd)", f"{fc.train_step:.4e}")
    console().print(table)
    breakdown = Table(title="forward FLOPs by component")
    breakdown.add_column("component")
    breakdown.add_column("FLOPs", justify="right")
    breakdown.add_column("share", justify="right")
    for name, value in sorted(fc.forward.items(), key=lambda kv: -kv[1]):
        breakdown.add_row(name, f"{value:.3e}", f"{100 * value / fc.forward_total:.1f}%")
    console().print(breakdown)
    # Plain lines for scripts.
    print(f"parameters: {params}")
    print(f"train_step_flops: {fc.train_step:.6e}")
    return 0


def load_train_config(args):
    """The run config of `train CONFIG [overrides] [--resume …]`."""
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.resume is not None:
        cfg.train.resume = args.resume
    return cfg


def leave_if_rank(code: int) -> None:
    """In a launched worker (LOCAL_RANK set: torchrun, `vchitect launch`, or a run whose process
    group is up), exit with ``code`` now, skipping the interpreter's teardown. Destructors of C++
    threads at exit have aborted finished gloo runs ("terminate called without an active
    exception", SIGABRT), which turned a completed job into a failed one (seen in 2-rank and 2-node
    runs under load), and an exit code chosen here must be the one the launcher sees."""
    if os.environ.get("LOCAL_RANK") is None:
        return
    import logging

    from launch.local import release_orphaned_folder

    release_orphaned_folder()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_train(args) -> int:
    from .train.trainer import train

    code = train(load_train_config(args))
    leave_if_rank(code)  # the run has finished: metrics, checkpoints and the process group are closed
    return code


def cmd_launch(args) -> int:
    from launch.local import launch

    from .config_base import ConfigError

    if not args.command_argv or args.nproc < 1:
        raise ConfigError("vchitect launch: give --nproc N (N >= 1) and the command to run, e.g. "
                          "`vchitect launch --nproc 2 train CONFIG`")
    if args.command_argv[0] == "train":  # config and paths are checked once, here, before any rank starts
        from .train.preflight import preflight

        preflight(load_train_config(build_parser().parse_args(args.command_argv)), world_size=args.nproc)
    return launch(args.nproc, args.command_argv)


def cmd_submit(args) -> int:
    from launch.slurm import submit

    return submit(args)


def cmd_demo(args) -> int:
    if args.smoke:
        from .demo.smoke import run_smoke

        return run_smoke(args.config, args.overrides)
    if args.tasks:
        from .demo.tasks_demo import TasksSettings, run_tasks_demo

        out = Path(args.out if args.out != "demo_out" else "demo_tasks_out")
        base = Path(args.base) if args.base else None
        t = (TasksSettings.quick_settings(out, base, args.overrides) if args.quick
             else TasksSettings(out=out, base=base, overrides=args.overrides))
        if args.steps is not None:
            t.steps = args.steps
        run_tasks_demo(t)
        return 0
    if args.base:
        raise SystemExit("vchitect demo: --base goes with --tasks (the T2V demo output to fine-tune)")
    from .demo import DemoSettings, run_demo

    out = Path(args.out)
    s = DemoSettings.quick_settings(out, args.overrides) if args.quick else DemoSettings(out=out,
                                                                                       overrides=args.overrides)
    if args.steps is not None:
        s.steps = args.steps
    if args.videos is not None:
        s.videos = args.videos
    run_demo(s)
    return 0


def cmd_eval(args) -> int:
    from .eval.cli import run_eval

    return run_eval(args.videos_dir, subject=args.subject_features, background=args.background_features,
                    json_out=args.json)


def cmd_eval_layers(args) -> int:
    if args.frames < 2:
        return user_error("eval error", f"--frames {args.frames}: the adjacent-frame similarity needs 2 frames or more")
    if args.labels and len(args.labels) != len(args.exports):
        return user_error("eval error", f"--labels gives {len(args.labels)} names for {len(args.exports)} export "
                          f"folders; give one per folder")
    missing = [d for d in args.exports if not (Path(d) / "model_index.json").is_file()]
    if missing:
        return user_error("eval error", f"{missing[0]} is not an export folder (no model_index.json); make one with "
                          f"`vchitect export CKPT OUT`")
    from .eval.layers import run_layers

    try:
        res = run_layers(args.exports, args.prompt, args.out, labels=args.labels, frames=args.frames,
                         height=args.height, width=args.width, steps=args.steps, seed=args.seed,
                         guidance=args.guidance_scale)
    except ValueError as exc:  # shapes, a missing text encoder: the message says what to do
        return user_error("eval error", str(exc))
    for m in res["models"]:
        attn = " ".join(f"{v:.3f}" for v in m["attention_similarity"])
        frames = " ".join(f"{v:.3f}" for v in m["frame_similarity"])
        print(f"{m['label']}: attention maps, block l vs l−1 (l = 1…): {attn}; adjacent frames per block: {frames}")
    print(f"wrote {Path(args.out) / 'layers.json'} and {Path(args.out) / 'layers.png'}")
    return 0


def cmd_export(args) -> int:
    """Arguments checked here, in a second, before vchitect.export.cli imports torch and diffusers."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*[KMGT]B\s*", args.max_shard_size, re.IGNORECASE):
        return user_error("export error", f"--max-shard-size {args.max_shard_size!r}: give a size such as 5GB or "
                          f"500MB (units KB, MB, GB, TB)")
    from .export.cli import cmd_export

    return cmd_export(args)


def sample_source_problem(source: Path) -> str | None:
    """Why ``vchitect sample SOURCE`` (no CKPT) has nothing to load at ``source``, or None when it is
    an export folder or may hold a checkpoint (then the checkpoint loader has the last word)."""
    if (source / "model_index.json").is_file() or source.name.startswith("step-"):
        return None
    if source.is_dir() and (any(source.glob("step-*")) or any(source.glob("checkpoints/step-*"))):
        return None
    if not source.exists():
        why = "it does not exist"
    elif source.is_file():
        why = "it is a file; a config YAML needs the checkpoint after it: `vchitect sample CONFIG CKPT …`"
    else:
        why = "the folder has no model_index.json and no step-… folder"
    return (f"neither an export folder nor a checkpoint was found at {source} ({why}). An export folder, written "
            f"by `vchitect export CKPT OUT`, holds model_index.json, transformer/ and scheduler/; a checkpoint is "
            f"a step-… folder written by `vchitect train`, or the run or checkpoints/ folder holding them")


# `vchitect sample --task`: the flag of each pipeline input of vchitect.data.tasks.Task.given
TASK_FLAGS = {"image": "--image", "video": "--video", "mask": "--mask", "depth": "--depth"}


def sample_task_problem(args) -> str | None:
    """What is wrong with the task flags of ``vchitect sample`` (an unknown task, missing or unexpected
    inputs, input files that are not there), or None. Imports vchitect.data.tasks (numpy) only with a task."""
    given = {"image": list(args.image or []), "video": list(args.video or []),
             "mask": [args.mask] if args.mask else [], "depth": [args.depth] if args.depth else []}
    passed = [TASK_FLAGS[k] for k, v in given.items() if v]
    if args.task is None:
        if passed or args.context_frames is not None or args.no_paste:
            extra = passed + (["--context-frames"] if args.context_frames is not None else []) + \
                (["--no-paste"] if args.no_paste else [])
            verb = "needs" if len(extra) == 1 else "need"
            return f"{', '.join(extra)} {verb} --task (e.g. --task i2v --image first.png; docs/sampling.md, Tasks)"
        return None
    from vchitect.data.tasks import TASKS

    task = TASKS.get(args.task)
    if task is None:
        return f"--task {args.task}: not a task; choose one of {', '.join(TASKS)} (docs/tasks.md)"
    for kind, flag in TASK_FLAGS.items():
        need, got = task.given.count(kind), len(given[kind])
        if need != got:
            takes = ", ".join(f"{TASK_FLAGS[k]} PATH" + (" twice" if task.given.count(k) == 2 else "")
                              for k in dict.fromkeys(task.given)) or "no --image, --video, --mask or --depth"
            return f"--task {args.task} ({task.prompt}) takes {takes}; got {got} {flag}"
    if args.context_frames is not None and args.task not in ("vexd", "vtrans"):
        return f"--context-frames is for --task vexd and vtrans, not {args.task}"
    for kind, paths in given.items():
        for path in paths:
            if not Path(path).is_file():
                return f"{TASK_FLAGS[kind]} {path}: no such file"
    return None


def cmd_sample(args) -> int:
    """Arguments checked here, before vchitect.export.cli imports torch and diffusers (and before
    minutes of sampling)."""
    resolve_sample_args(args)
    suffix = Path(args.out).suffix.lower()
    if suffix not in (".mp4", ".gif", ".png"):
        return user_error("sample error", f"--out {args.out}: write .mp4 or .gif (or .png for one frame)")
    if suffix == ".png" and args.frames != 1:
        frames = "the clip's frames" if args.frames is None else f"{args.frames} frames"
        return user_error("sample error", f"--out {args.out}: a .png holds one frame, and this samples {frames}; "
                          f"write .mp4 or .gif, or pass --frames 1 (or an image task)")
    problem = sample_source_problem(Path(args.source)) if args.ckpt is None else None
    problem = problem or sample_task_problem(args)
    if problem:
        return user_error("sample error", problem)
    from .export.cli import cmd_sample

    return cmd_sample(args)


def add_export_parser(subparsers) -> None:
    p = subparsers.add_parser("export", help="turn a DCP training checkpoint into a diffusers pipeline folder")
    p.add_argument("ckpt", help="a step-… checkpoint folder, or a run / checkpoints folder (newest complete step)")
    p.add_argument("out", help="output pipeline folder (written to a temporary name, then renamed)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw model weights")
    p.add_argument("--dtype", default="fp32", help="weight dtype: bf16, fp16 or fp32 (default fp32)")
    p.add_argument("--base", default=None, help="diffusers folder supplying vae/, text_encoder/, tokenizer/ "
                   "(default: the local paths in the run config)")
    p.add_argument("--max-shard-size", default="5GB", help="split transformer weights above this size (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)

# `vchitect sample`: the defaults of the flags a preset may set, and the presets. A flag given on the
# command line wins over the preset, the preset over the default (resolve_sample_args).
SAMPLE_DEFAULTS = dict(frames=16, height=None, width=None, steps=50, guidance_scale=6.0,
                       guidance_schedule="constant", timestep_spacing="uniform", negative_prompt=None, dtype=None,
                       seed=0, fps=8.0)
SAMPLE_PRESETS = {
    # The released Vchitect-2.0 inference.py / VchitectXLPipeline (docs/sampling.md, "The released settings"):
    # 40 frames at 432×768, 100 steps of the scheduler's own spacing, its guidance formula with s = 7.5,
    # the empty negative prompt, the transformer in bf16, seed 0 (its first of five), 8 fps.
    "vchitect2-released": dict(frames=40, height=432, width=768, steps=100, guidance_scale=7.5,
                               guidance_schedule="released", timestep_spacing="released", negative_prompt="",
                               dtype="bf16", seed=0, fps=8.0),
}


# tasks whose output is one frame, and those whose --video / --depth is the whole output (vchitect.data.tasks)
IMAGE_TASKS = ("t2i", "iinp", "ioutp", "isr", "icolor")
WHOLE_CLIP_TASKS = ("vinp", "voutp", "vsr", "vcolor", "vedit", "depth")


def resolve_sample_args(args):
    """Fill the preset-able flags of ``vchitect sample`` the command line left out: from ``--preset``,
    else from :data:`SAMPLE_DEFAULTS` (idempotent; returns ``args``). Without ``--frames`` an image task
    makes 1 frame and a task whose clip is the output as many as its clip (None: the pipeline counts)."""
    task = getattr(args, "task", None)
    if not hasattr(args, "frames") and task in IMAGE_TASKS + WHOLE_CLIP_TASKS:
        args.frames = 1 if task in IMAGE_TASKS else None
    preset = SAMPLE_PRESETS[args.preset] if getattr(args, "preset", None) else {}
    for key, default in SAMPLE_DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, preset.get(key, default))
    return args


def add_sample_parser(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate a video from an export folder or a training checkpoint",
                              argument_default=argparse.SUPPRESS)  # absent flags: resolve_sample_args
    p.add_argument("source", help="export folder (model_index.json), checkpoint folder, or a config YAML followed "
                   "by a checkpoint")
    p.add_argument("ckpt", nargs="?", default=None, help="checkpoint, when SOURCE is a config")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--out", required=True, help="output .mp4 or .gif")
    p.add_argument("--preset", default=None, choices=sorted(SAMPLE_PRESETS),
                   help="defaults for the flags below; flags given explicitly still win. vchitect2-released: the "
                   "released Vchitect-2.0 settings (40 frames, 432×768, 100 steps, guidance 7.5 with the released "
                   "schedule and timestep spacing, bf16; docs/sampling.md)")
    p.add_argument("--negative-prompt", help="negative prompt (default: the empty prompt)")
    p.add_argument("--frames", type=int, help="video frames (default 16)")
    p.add_argument("--height", type=int, help="pixels (default: the model's sample size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's sample size)")
    p.add_argument("--steps", type=int, help="Euler steps (default 50)")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance s (default 6; 1 = off "
                   "with the constant schedule)")
    p.add_argument("--guidance-schedule", choices=["constant", "released", "smooth"],
                   help="g per step: constant (g = s, the default), released (the released Vchitect-2.0 formula, "
                   "quirks included), smooth (the ramp 1 → 1+s it evidently meant); docs/sampling.md")
    p.add_argument("--timestep-spacing", choices=["uniform", "released"],
                   help="uniform (the default: shift of linspace(1, 0, steps+1)) or released (the scheduler's own "
                   "set_timesteps, as the released pipeline)")
    p.add_argument("--seed", type=int, help="noise seed (default 0)")
    p.add_argument("--fps", type=float, help="frame rate of the written file (default 8)")
    p.add_argument("--fastercache", action="store_true", default=False, help="FasterCache with its default "
                   "schedule (see docs/sampling.md)")
    p.add_argument("--freeinit", type=int, default=0, metavar="N", help="FreeInit re-initialisations (0 = off)")
    p.add_argument("--freeinit-filter", default="butterworth", choices=["butterworth", "gaussian", "ideal"])
    p.add_argument("--ema", action="store_true", default=False, help="checkpoint sources: use the EMA weights")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "bfloat16", "float16", "float32"],
                   help="transformer weights: checkpoint sources load in it (default fp32), export folders are "
                   "cast to it (default: as exported)")
    p.add_argument("--base", default=None, help="checkpoint sources: folder with vae/, text_encoder/, tokenizer/")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t = p.add_argument_group("Many-for-Many tasks (a model trained with model.condition_channels=4; "
                             "docs/sampling.md, \"Tasks\")")
    t.add_argument("--task", default=None, metavar="NAME", help="t2v, i2v, vexd, itrans, vtrans, vinp, voutp, vsr, "
                   "vcolor, vedit, depth, t2i, iinp, ioutp, isr, icolor; the prompt gets the task's #task: suffix")
    t.add_argument("--image", action="append", default=None, metavar="PATH", help="an image (png, jpg, …): i2v's "
                   "first frame, the picture of iinp / ioutp / isr / icolor; itrans takes two (first, last)")
    t.add_argument("--video", action="append", default=None, metavar="PATH", help="a clip (.mp4 or .gif): vexd's "
                   "start, the clip of vinp / voutp / vsr / vcolor, vedit's source; vtrans takes two (head, tail)")
    t.add_argument("--mask", default=None, metavar="PATH", help="inpainting / outpainting: white = known, black = "
                   "to generate (.png for every frame, or .gif / .mp4 per frame)")
    t.add_argument("--depth", default=None, metavar="PATH", help="depth: the depth clip (.mp4 or .gif)")
    t.add_argument("--context-frames", type=int, default=None, metavar="K", help="vexd / vtrans: use K frames of "
                   "the given clip(s) (default: all of them)")
    t.add_argument("--no-paste", action="store_true", default=False, help="write the model's output as it is "
                   "(default: the given pixels are pasted back where the task knows them)")
    p.set_defaults(func=cmd_sample)


class RoutingParser(argparse.ArgumentParser):
    """A parser whose first argument may name a sub-command (``routes``) that takes over, while any other first
    argument is its own positional: ``vchitect eval VIDEOS_DIR`` and ``vchitect eval layers EXPORT_DIR …``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routes: dict[str, argparse.ArgumentParser] = {}

    def parse_known_args(self, args=None, namespace=None):
        if args and args[0] in self.routes:
            return self.routes[args[0]].parse_known_args(args[1:], namespace)
        return super().parse_known_args(args, namespace)


def add_eval_layers_parser() -> argparse.ArgumentParser:
    p = RoutingParser(prog="vchitect eval layers", description="RepVideo's layer diagnostic: while sampling a prompt, "
                      "the cosine similarity of each block's spatial attention maps with the previous block's, and of "
                      "each block's output between adjacent frames; OUT/layers.json and OUT/layers.png, one curve per "
                      "export (docs/model.md, RepVideo)")
    p.add_argument("exports", nargs="+", metavar="EXPORT_DIR", help="export folder(s) (`vchitect export`); several "
                   "are overlaid, e.g. a model trained without and one with model.repvideo")
    p.add_argument("--prompt", required=True, help="the prompt sampled")
    p.add_argument("--out", required=True, metavar="DIR", help="where layers.json and layers.png go")
    p.add_argument("--labels", nargs="+", default=None, help="one name per export folder (default: the folder names)")
    p.add_argument("--frames", type=int, default=16, help="video frames (default 16; the demo trains on 8)")
    p.add_argument("--height", type=int, default=None, help="pixels (default: the model's sample size)")
    p.add_argument("--width", type=int, default=None, help="pixels (default: the model's sample size)")
    p.add_argument("--steps", type=int, default=4, help="Euler steps recorded and averaged over (default 4)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (default 1: only the "
                   "conditional pass runs, so only it is measured)")
    p.set_defaults(func=cmd_eval_layers)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vchitect", description="Pretrain video diffusion transformers.")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=RoutingParser)

    p_config = sub.add_parser("config", help="inspect configs")
    config_sub = p_config.add_subparsers(dest="config_command", required=True)
    p_show = config_sub.add_parser("show", help="print the resolved config (file + overrides)")
    p_show.add_argument("config", help="YAML config file")
    p_show.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    p_show.set_defaults(func=cmd_config_show)

    p_desc = config_sub.add_parser("describe", help="print every config key with type, default and meaning (Markdown)")
    p_desc.set_defaults(func=cmd_config_describe)

    p_info = sub.add_parser("model-info", help="parameter count and FLOPs of one training step")
    p_info.add_argument("config", help="YAML config with a model section (e.g. configs/model/vchitect-2b.yaml)")
    p_info.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.num_layers=4")
    p_info.add_argument("--frames", type=int, required=True, help="video frames")
    p_info.add_argument("--height", type=int, required=True, help="video height in pixels")
    p_info.add_argument("--width", type=int, required=True, help="video width in pixels")
    p_info.add_argument("--batch", type=int, default=1, help="videos per step (default 1)")
    p_info.add_argument("--text-len", type=int, default=333,
                        help="text tokens (default 333 = 77 CLIP + 256 T5, as in Vchitect-2.0)")
    p_info.add_argument("--vae-downsample", type=int, default=8,
                        help="spatial VAE compression (default 8; 1 for pixel-space models)")
    p_info.add_argument("--vae-temporal", type=int, default=1,
                        help="temporal VAE compression (default 1: Vchitect-2.0 encodes frames one by one)")
    p_info.set_defaults(func=cmd_model_info)

    p_train = sub.add_parser("train", help="train (one process, or one rank under torchrun / vchitect launch)")
    p_train.add_argument("config", help="run config, e.g. configs/train/demo.yaml")
    p_train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=20 parallel.sp=2")
    p_train.add_argument("--resume", default=None,
                         help="auto (default: newest complete checkpoint), none, or a step-… folder")
    p_train.set_defaults(func=cmd_train)

    p_launch = sub.add_parser("launch", help="run a vchitect command as N local ranks (CPU or GPUs)")
    p_launch.add_argument("--nproc", type=int, required=True, help="number of ranks (processes)")
    p_launch.add_argument("command_argv", nargs=argparse.REMAINDER, help="the command, e.g. train CONFIG …")
    p_launch.set_defaults(func=cmd_launch)

    add_export_parser(sub)
    add_sample_parser(sub)

    p_submit = sub.add_parser("submit", help="render a Slurm batch script from a config and sbatch it")
    p_submit.add_argument("kind", choices=["train", "curate"], help="what the job runs")
    p_submit.add_argument("config", help="run config (train) or curation config (curate)")
    p_submit.add_argument("overrides", nargs="*", help="dotted overrides passed to the job")
    p_submit.add_argument("--nodes", type=int, required=True, help="nodes (one task per node)")
    p_submit.add_argument("--gpus-per-node", type=int, required=True, help="GPUs (ranks) per node; 0 = CPU job")
    p_submit.add_argument("--cpus-per-node", type=int, default=None,
                          help="CPUs of each node's one task: all of a node's cores for a full-node job (default for "
                          "train: one per rank and per data-loader worker; required for curate)")
    p_submit.add_argument("--partition", default=None, help="Slurm partition")
    p_submit.add_argument("--time", default=None, help="time limit, e.g. 48:00:00")
    p_submit.add_argument("--account", default=None, help="Slurm account")
    p_submit.add_argument("--qos", default=None, help="Slurm QOS")
    p_submit.add_argument("--job-name", default=None, help="job name (default vchitect-<kind>)")
    p_submit.add_argument("--signal-seconds", type=int, default=300,
                          help="seconds before the time limit at which Slurm sends USR1 (checkpoint + requeue)")
    p_submit.add_argument("--log-dir", default=None, help="where job logs go (default: train → <train.output_dir>/slurm; curate → ./slurm-logs)")
    p_submit.add_argument("--sbatch-arg", action="append", default=[], help="extra #SBATCH line, repeatable")
    p_submit.add_argument("--dry-run", action="store_true", help="print the script instead of submitting it")
    p_submit.set_defaults(func=cmd_submit)

    p_demo = sub.add_parser("demo", help="the whole pipeline on CPU: synthetic corpus → curation → training on "
                            "2 processes → sampling → diffusers export → probe and metrics (docs/demo.md)")
    p_demo.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    p_demo.add_argument("--quick", action="store_true", help="a few steps on a tiny corpus: checks every stage "
                        "and output in about two minutes (the model does not learn)")
    p_demo.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's budget)")
    p_demo.add_argument("--videos", type=int, default=None, help="clean raw videos of 3 shots (default 48)")
    p_demo.add_argument("--smoke", action="store_true", help="only one forward + backward of the demo model")
    p_demo.add_argument("--tasks", action="store_true", help="the Many-for-Many learning proof: fine-tune the T2V "
                        "demo model on i2v, itrans, vinp, removal and t2v, then probe both (default --out "
                        "demo_tasks_out; docs/demo.md)")
    p_demo.add_argument("--base", default=None, help="--tasks: the output folder of a finished `vchitect demo` "
                        "(its export/ and shards/); without it the T2V demo runs first into OUT/base")
    p_demo.add_argument("--config", default=None, help="--smoke: model config (default: configs/model/demo.yaml)")
    p_demo.add_argument("overrides", nargs="*", help="dotted overrides of the training config "
                        "(with --smoke: of the model config)")
    p_demo.set_defaults(func=cmd_demo)

    p_eval = sub.add_parser("eval", help="VBench-style metrics (and the prompt-following probe when prompts are "
                            "known) of the videos in a folder; `eval layers`: RepVideo's per-layer diagnostic",
                            usage="vchitect eval [-h] [options] VIDEOS_DIR\n"
                            "       vchitect eval layers [-h] EXPORT_DIR [EXPORT_DIR ...] --prompt PROMPT --out DIR",
                            epilog="vchitect eval layers --help: the per-layer diagnostic of export folders")
    p_eval.routes["layers"] = add_eval_layers_parser()
    p_eval.add_argument("videos_dir", help="folder of .gif / .mp4 videos; prompts from prompts.json "
                        "({file stem: prompt}) or a .txt beside each video")
    p_eval.add_argument("--subject-features", default=None, help="pixels (default), dino:PATH or clip:PATH")
    p_eval.add_argument("--background-features", default=None, help="pixels (default), dino:PATH or clip:PATH")
    p_eval.add_argument("--json", default=None, help="also write the results to this JSON file")
    p_eval.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    from launch.local import watch_launcher

    watch_launcher()  # a rank of `vchitect launch` stops when its launcher dies; elsewhere a no-op
    args = build_parser().parse_args(argv)
    from .config_base import ConfigError
    from .parallel.dims import ParallelLayoutError

    try:
        return args.func(args) or 0
    except (ConfigError, ParallelLayoutError) as exc:
        return user_error("config error", str(exc))


def user_error(kind: str, message: str) -> int:
    """Report a mistake the user can fix as one line ``KIND: message`` and return exit code 2.
    A rank of `vchitect launch` hands the line to the launcher, which prints each distinct line once."""
    from launch.local import report_user_error

    if not report_user_error(f"{kind}: {message}"):
        from rich.markup import escape

        # soft_wrap: one line however long (rich would otherwise wrap at the terminal's or 80 columns)
        console().print(f"[bold red]{kind}:[/] {escape(message)}", highlight=False, soft_wrap=True)
    leave_if_rank(2)
    return 2


if __name__ == "__main__":
    sys.exit(main())
