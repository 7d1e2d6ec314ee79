"""``vchitect export`` and ``vchitect sample``: the commands whose parsers :mod:`vchitect.cli` builds
(``add_export_parser`` / ``add_sample_parser`` live there, so ``vchitect --help`` imports neither
this package nor torch; they are re-exported here).

    vchitect export CKPT OUT [--ema] [--dtype bf16|fp16|fp32] [--base DIR] [--max-shard-size 5GB]
    vchitect sample (EXPORT_DIR | CKPT | CONFIG CKPT) --prompt … --out video.mp4|.gif [--preset P] [options]
                    [--task NAME --image PATH … --video PATH … --mask PATH --depth PATH --no-paste]

``sample`` under ``torchrun --nproc-per-node N`` (or any launcher setting WORLD_SIZE) splits the
video tokens over the N ranks with Ulysses sequence parallelism; rank 0 writes the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from vchitect.cli import add_export_parser, add_sample_parser, resolve_sample_args, user_error  # noqa: F401


def cmd_export(args) -> int:
    """The work of ``vchitect export``; :func:`vchitect.cli.cmd_export` has checked the arguments."""
    from .export import ExportError, export

    try:
        export(args.ckpt, args.out, ema=args.ema, dtype=args.dtype, base=args.base, max_shard_size=args.max_shard_size,
               overwrite=args.overwrite)
    except ExportError as exc:
        return user_error("export error", str(exc))
    return 0


# ------------------------------------------------------------------ sample
def write_video(frames: np.ndarray, path: str | Path, fps: float = 8.0) -> Path:
    """frames F×H×W×3 in [0, 1] → .gif (Pillow), .mp4 (PyAV, H.264) or, for one frame, .png."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    u8 = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if path.suffix.lower() == ".png":
        if len(u8) != 1:
            raise ValueError(f"--out {path}: a .png holds one frame, not {len(u8)}; write .mp4 or .gif")
        from PIL import Image

        Image.fromarray(u8[0]).save(path)
        return path
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in u8]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return path
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"--out {path}: write .mp4 or .gif")
    try:
        import av
    except ImportError:
        raise ImportError("writing mp4 needs PyAV: pip install 'vchitect[data]', or write a .gif") from None
    H, W = u8.shape[1:3]
    if H % 2 or W % 2:  # yuv420p needs even sides
        u8 = np.pad(u8, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=int(round(fps)))
        stream.width, stream.height = u8.shape[2], u8.shape[1]
        stream.pix_fmt = "yuv420p"
        for f in u8:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def load_pipeline(args):
    """An export folder, a checkpoint, or a config + checkpoint → VchitectPipeline."""
    from .export import pipeline_from_checkpoint
    from .pipeline import VchitectPipeline

    source = Path(args.source)
    if args.ckpt is None and (source / "model_index.json").is_file():
        pipe = VchitectPipeline.from_pretrained(source)
        if args.dtype is not None:  # e.g. --preset vchitect2-released on an fp32 export: the transformer in bf16
            import torch

            from .export import DTYPES

            torch.nn.Module.to(pipe.transformer, DTYPES[args.dtype])  # ModelMixin.to warns of fp32 modules: none
        return pipe
    dtype = args.dtype or "fp32"
    if args.ckpt is None:
        return pipeline_from_checkpoint(source, base=args.base, ema=args.ema, dtype=dtype)
    from vchitect.config import load_config, to_dict

    config = to_dict(load_config(source))
    return pipeline_from_checkpoint(args.ckpt, base=args.base, ema=args.ema, dtype=dtype, config=config)


# ------------------------------------------------------------------ task inputs
def read_image(path: str, flag: str = "--image", mode: str = "RGB") -> np.ndarray:
    """H×W×3 uint8 of an image file (anything Pillow opens; ``mode`` "L": H×W grey)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert(mode))
    except (OSError, UnidentifiedImageError) as exc:
        raise ValueError(f"{flag} {path}: cannot read it as an image ({type(exc).__name__}: {exc})") from None


def read_clip(path: str, flag: str) -> np.ndarray:
    """F×H×W×3 uint8 of a .gif or .mp4."""
    from vchitect.eval.cli import read_video

    if Path(path).suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"{flag} {path}: give a .mp4 or .gif")
    try:
        return read_video(path)
    except Exception as exc:  # PyAV / Pillow decode errors have many types
        raise ValueError(f"{flag} {path}: cannot decode it ({type(exc).__name__}: {exc})") from None


def read_mask(path: str) -> np.ndarray:
    """H×W (an image) or F×H×W (a .gif / .mp4) uint8 mask, 255 = known."""
    if Path(path).suffix.lower() in (".gif", ".mp4"):
        return np.rint(read_clip(path, "--mask").mean(-1)).astype(np.uint8)
    return read_image(path, "--mask", "L")


def task_inputs(args) -> dict:
    """The pipeline's task keywords from ``--task``, ``--image`` … (checked by vchitect.cli.sample_task_problem)."""
    if args.task is None:
        return {}
    images = [read_image(p) for p in args.image or []]
    videos = [read_clip(p, "--video") for p in args.video or []]
    one_or_pair = lambda items: None if not items else items[0] if len(items) == 1 else tuple(items)  # noqa: E731
    return dict(task=args.task, image=one_or_pair(images), video=one_or_pair(videos),
                mask=read_mask(args.mask) if args.mask else None,
                depth=read_clip(args.depth, "--depth") if args.depth else None,
                context_frames=args.context_frames, paste_known=not args.no_paste)


def _init_sequence_parallel(pipe, device):
    """Under a multi-rank launch, split the video tokens of ``pipe.transformer`` over all ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0
    import torch.distributed as dist

    from vchitect.diffusion.sampling import enable_sequence_parallel

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    enable_sequence_parallel(pipe.transformer)
    return dist.get_rank()


def cmd_sample(args) -> int:
    """The work of ``vchitect sample``; :func:`vchitect.cli.cmd_sample` has checked the arguments."""
    import torch

    from vchitect.diffusion.fastercache import FasterCacheConfig
    from vchitect.diffusion.freeinit import FreeInitConfig

    from .export import ExportError

    resolve_sample_args(args)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    try:
        task = task_inputs(args)
    except ValueError as exc:
        return user_error("sample error", str(exc))
    try:
        pipe = load_pipeline(args)
    except ExportError as exc:
        return user_error("sample error", str(exc))
    try:  # the task inputs, checked before the run (and --frames for a task whose clip is the output)
        inputs = {k: task[k] for k in ("image", "video", "mask", "depth")} if task else {}
        _, args.frames, _, _, _ = pipe.prepare_task(args.task, 1, args.frames, args.height, args.width,
                                                    task.get("context_frames"), **inputs)
    except ValueError as exc:
        return user_error("sample error", str(exc))
    pipe.to(device)
    rank = _init_sequence_parallel(pipe, device)
    fastercache = FasterCacheConfig() if args.fastercache else None
    freeinit = FreeInitConfig(reinits=args.freeinit, filter=args.freeinit_filter) if args.freeinit else None
    generator = torch.Generator().manual_seed(args.seed)
    if rank == 0:  # what the preset and flags resolved to, before the (possibly long) run
        size = f"{args.height}×{args.width}" if args.height and args.width else "the model's sample size"
        what = f"task {args.task}: " if args.task else ""
        print(f"{what}sampling {args.frames} frames at {size}: {args.steps} steps, guidance {args.guidance_scale:g} "
              f"({args.guidance_schedule}), timestep spacing {args.timestep_spacing}, transformer "
              f"{str(next(pipe.transformer.parameters()).dtype).removeprefix('torch.')}, seed {args.seed}",
              flush=True)
    try:
        video = pipe(args.prompt, negative_prompt=args.negative_prompt, num_frames=args.frames, height=args.height,
                     width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                     guidance_schedule=args.guidance_schedule, timestep_spacing=args.timestep_spacing,
                     generator=generator, output_type="np", fastercache=fastercache, freeinit=freeinit,
                     **task).frames
    except ValueError as exc:  # shapes, missing text encoder / VAE: the message says what to do
        return user_error("sample error", str(exc))
    if rank == 0:
        path = write_video(video[0], args.out, fps=args.fps)
        print(f"wrote {path} ({video.shape[1]} frames, {video.shape[2]}×{video.shape[3]})")
    return 0


__all__ = ["add_export_parser", "add_sample_parser", "cmd_export", "cmd_sample", "read_clip", "read_image", "read_mask",
           "task_inputs", "write_video"]
