"""Typed configuration of a curation run (``vchitect-curate run CONFIG [section.key=value …]``).

Loaded with the project's generic loader (:mod:`vchitect.config_base`, which imports neither the
training config nor torch): unknown keys, wrong types and out-of-range values raise
:class:`vchitect.config_base.ConfigError` naming the key. ``vchitect-curate config describe`` prints
every key (the reference table in docs/curation.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from vchitect.config_base import ConfigError, load_config, setting, to_dict
from vchitect.data.config import BucketConfig, EncoderConfig, S3Config, TextShapeConfig

__all__ = ["CurateConfig", "ConfigError", "load_curate_config", "config_fingerprint"]


@dataclass
class InputConfig:
    """Where the raw videos come from."""

    path: str = setting("", help="a local directory (searched recursively), an s3://bucket/prefix, "
                        "or a manifest file (.csv, .jsonl, .parquet; local or s3://) with a `uri` "
                        "column and optional `id`, `caption` and `segments` columns")
    extensions: list[str] = setting(default_factory=lambda: [".mp4", ".mov", ".mkv", ".webm", ".avi"],
                                    help="file suffixes picked up when listing a directory or prefix")
    limit: int = setting(0, min=0, help="process only the first N inputs in sorted order (0 = all)")


@dataclass
class OutputConfig:
    """Where the shards go."""

    path: str = setting("", help="output folder, local or s3://bucket/prefix")
    prefix: str = setting("shard", help="shard file prefix: {prefix}-{index:06d}.tar")
    samples_per_shard: int = setting(1000, min=1, help="maximum samples in one shard")
    max_shard_bytes: int = setting(1 << 30, min=1, help="a shard is closed before it would pass this size")


@dataclass
class StageResources:
    """What each actor of one model-backed stage (an actor pool) reserves and receives."""

    actors: int = setting(1, min=1, help="actors in the pool; each loads the stage's models once")
    cpus: float = setting(0.5, min=0.0, help="CPUs reserved by each actor; fractional by default so "
                          "a small machine keeps room for the video tasks that feed the pools")
    gpus: float = setting(0.0, min=0.0, help="GPUs per actor: 0 = none, the actor runs on CPU; > 0 = Ray "
                          "places each actor on a GPU (CUDA_VISIBLE_DEVICES) and the captioner / latent "
                          "encoders / depth model run on it (the model filters always run on CPU)")
    batch_size: int = setting(4, min=1, help="inputs (videos, with all their clips) per batch sent "
                              "to an actor")


_MOVED_TO_STAGES = "ray.filters.{0}, ray.caption.{0} and ray.latents.{0} (one per stage)"


@dataclass
class RayConfig:
    """How Ray is started and how much each stage may use."""

    RENAMED: ClassVar[dict] = {
        "model_actors": "ray.filters.actors", "model_actor_cpus": _MOVED_TO_STAGES.format("cpus"),
        "caption_actors": "ray.caption.actors", "caption_gpus": "ray.caption.gpus",
        "latents_actors": "ray.latents.actors", "latents_gpus": "ray.latents.gpus",
        "batch_size": _MOVED_TO_STAGES.format("batch_size")}

    address: Optional[str] = setting(None, help="join an existing cluster (e.g. 'auto' or "
                                     "'ray://head:10001'); null = start a local Ray")
    num_cpus: int = setting(0, min=0, help="CPUs for a local Ray (0 = all of this machine's)")
    video_task_cpus: float = setting(1.0, min=0.05, help="CPUs reserved by each probe/split/clip/filter task")
    filters: StageResources = setting(default_factory=StageResources, help="the OCR / NSFW / aesthetic "
                                      "model-filter actors (their models run on CPU)")
    caption: StageResources = setting(default_factory=StageResources, help="the VLM captioner actors")
    latents: StageResources = setting(default_factory=StageResources, help="the VAE / text-encoder "
                                      "latent actors (latents.enabled)")
    depth: StageResources = setting(default_factory=StageResources, help="the depth-estimation actors "
                                    "(depth.model_path)")
    progress_every: float = setting(30.0, min=0.0, help="when stdout is not a terminal (Slurm, nohup, a "
                                    "pipe): seconds between plain progress lines, besides one at each "
                                    "tenth of the inputs (0 = only those)")


@dataclass
class ProbeConfig:
    """Container probe (PyAV, no frame decoding)."""

    max_width: int = setting(8192, min=1, help="reject sources wider than this (from metadata)")
    max_height: int = setting(8192, min=1, help="reject sources taller than this (from metadata)")
    max_duration: float = setting(4 * 3600.0, min=0.0, help="reject sources longer than this (s)")


@dataclass
class SplitConfig:
    """Shot-boundary detection."""

    detector: str = setting("content", choices=["content", "content_fast", "adaptive", "transnetv2", "none"],
                            help="PySceneDetect content/adaptive detector; content_fast: the content "
                            "detector's score and minimum-scene rule recomputed with OpenCV (same cuts, "
                            "~5x less CPU per frame); TransNetV2 (needs the `transnetv2` package); or "
                            "none (the whole video is one shot)")
    threshold: float = setting(27.0, min=0.0, help="content detector threshold (mean HSV change)")
    adaptive_threshold: float = setting(3.0, min=0.0, help="adaptive detector threshold")
    min_scene_frames: int = setting(8, min=1, help="minimum frames between two cuts")
    transnet_threshold: float = setting(0.5, min=0.0, max=1.0, help="TransNetV2 cut probability")
    analysis_size: int = setting(256, min=32, help="long side (px) of the frames decoded for "
                                 "detection and the cheap filters")


@dataclass
class ClipConfig:
    """Cutting shots into clips and transcoding them."""

    min_duration: float = setting(1.0, min=0.0, help="shots shorter than this (after margins) are dropped (s)")
    max_duration: float = setting(10.0, min=0.1, help="longer shots are cut greedily into windows of "
                                  "this length (s); a last piece shorter than min_duration is dropped")
    margin: float = setting(0.1, min=0.0, help="trimmed at each cut (s)")
    max_size: int = setting(1920, min=16, help="long side cap (px) of the written clip; 1920 keeps sources "
                            "up to 1080p at their size, so their clips can be stream-copied")
    fps: Optional[float] = setting(None, min=1.0, help="output fps; null = keep the source fps")
    codec: str = setting("auto", choices=["auto", "libx264", "libopenh264"],
                         help="H.264 encoder; auto = the first available in the PyAV build")
    crf: int = setting(23, min=0, max=51, help="libx264 constant rate factor")
    bitrate: int = setting(2_000_000, min=10_000, help="target bitrate for libopenh264 (bit/s)")
    preset: str = setting("superfast", help="libx264 preset: superfast costs about half of veryfast "
                          "for ~25% larger files at the same crf; veryfast/medium for final data")
    scaler: str = setting("area", choices=["area", "bilinear", "bicubic", "lanczos"],
                          help="swscale filter that scales frames down to clip.max_size (area: a "
                          "box filter, right for downscaling and ~2x cheaper than bicubic)")
    stream_copy: str = setting("auto", choices=["auto", "never"],
                               help="auto: a window of an H.264 (yuv420p, mp4-style) source that needs "
                               "no resize (source within clip.max_size) nor fps change and starts on an "
                               "IDR keyframe is copied packet for packet instead of re-encoded; cuts "
                               "that fall exactly on an IDR keyframe are then not trimmed by "
                               "clip.margin, and long shots are split on keyframes (docs/curation.md). never: "
                               "re-encode every clip")


@dataclass
class FilterConfig:
    """Thresholds of every filter; a filter rejects a clip when its score is outside the range."""

    min_duration: float = setting(1.0, min=0.0, help="rules: minimum clip duration (s)")
    max_duration: float = setting(60.0, min=0.0, help="rules: maximum clip duration (s)")
    min_width: int = setting(64, min=1, help="rules: minimum source width")
    min_height: int = setting(64, min=1, help="rules: minimum source height")
    min_fps: float = setting(8.0, min=0.0, help="rules: minimum fps")
    max_fps: float = setting(120.0, min=0.0, help="rules: maximum fps")
    min_aspect: float = setting(0.4, min=0.0, help="rules: minimum width/height")
    max_aspect: float = setting(2.5, min=0.0, help="rules: maximum width/height")
    blur: bool = setting(True, help="variance-of-Laplacian blur filter")
    min_sharpness: float = setting(500.0, min=0.0, help="blur: minimum variance of the Laplacian "
                                   "over edge pixels of contrast-stretched analysis-size frames")
    motion: bool = setting(True, help="optical-flow motion filter (Farneback)")
    min_motion: float = setting(0.01, min=0.0, help="motion: minimum mean flow magnitude "
                                "(fraction of the frame's long side per second)")
    max_motion: float = setting(3.0, min=0.0, help="motion: maximum mean flow magnitude (shake)")
    motion_frames: int = setting(6, min=2, help="motion: frame pairs sampled per clip")
    ocr: bool = setting(True, help="on-screen text filter (rapidocr-onnxruntime)")
    max_text_area: float = setting(0.05, min=0.0, max=1.0, help="ocr: maximum fraction of the "
                                   "frame covered by text boxes")
    nsfw: bool = setting(True, help="NSFW filter (nudenet)")
    max_nsfw: float = setting(0.6, min=0.0, max=1.0, help="nsfw: maximum detector confidence of an "
                              "exposed class")
    aesthetic_clip_path: Optional[str] = setting(None, help="aesthetic: local path of a CLIP model "
                                                 "(transformers format); null = filter off")
    aesthetic_head_path: Optional[str] = setting(None, help="aesthetic: local .safetensors/.pt/.npz "
                                                 "linear or MLP head on the CLIP image embedding")
    min_aesthetic: float = setting(4.5, help="aesthetic: minimum score")
    frames_per_clip: int = setting(3, min=1, help="frames sampled per clip for OCR/NSFW/aesthetic/"
                                   "caption/dedup")


@dataclass
class DedupConfig:
    """Near-duplicate removal across the whole run."""

    enabled: bool = setting(True, help="drop clips whose perceptual hashes match an earlier clip")
    max_distance: int = setting(6, min=0, max=64, help="Hamming distance (of 64 bits) per sampled "
                                "frame under which two clips are duplicates")


@dataclass
class CaptionConfig:
    """Which caption a clip is trained with."""

    mode: str = setting("source_or_vlm", choices=["source", "vlm", "source_or_vlm"],
                        help="source: only source captions (clips without one are rejected); vlm: "
                        "always the VLM; source_or_vlm: the source caption when present")
    vlm_path: Optional[str] = setting(None, help="local path of a transformers image-text-to-text "
                                      "model and its processor")
    prompt: str = setting("Describe this video in one sentence.", help="instruction given to the VLM")
    max_new_tokens: int = setting(48, min=1, help="VLM generation length")
    dtype: str = setting("float32", choices=["float32", "bfloat16", "float16"], help="VLM weights dtype")
    template: Optional[str] = setting(None, help="optional format string appended from metadata, e.g. "
                                      "'{caption} Camera motion: {camera_motion}. Aesthetic {aesthetic:.1f}.'")


@dataclass
class LatentsConfig:
    """Optional latent precomputation, with the training config's encoders and shapes: copy its
    ``data.encoders``, ``data.text``, ``data.buckets``, ``data.fps`` and ``data.seed`` here."""

    RENAMED: ClassVar[dict] = {"vae_path": "latents.encoders.vae_path",
                               "text_encoder_path": "latents.encoders.text_encoder_path",
                               "max_text_length": "latents.text.max_length", "dtype": "latents.encoders.dtype"}

    enabled: bool = setting(False, help="write latent.npy / text.npy / text_mask.npy / pooled.npy per "
                            "sample, and what they were made with under `latents` in its json")
    encoders: EncoderConfig = setting(default_factory=EncoderConfig, help="the VAE and text encoder, as "
                                      "data.encoders of the training config (both paths required)")
    text: TextShapeConfig = setting(default_factory=TextShapeConfig, help="text shapes, as data.text of "
                                    "the training config (L tokens; D and P are checked)")
    buckets: list[BucketConfig] = setting(
        default_factory=lambda: [BucketConfig(256, 256, 17), BucketConfig(256, 256, 1)],
        help="(height, width, frames) targets, as data.buckets of the training config: each clip is "
        "encoded at the bucket and frames decode mode would pick (docs/curation.md, Latents)")
    fps: float = setting(8.0, min=0.1, help="frames are sampled at this rate, as data.fps")
    seed: int = setting(0, min=0, help="as data.seed: the frame window is the one decode mode draws "
                        "for the sample in epoch 0 of a run with this seed")
    frames_per_batch: int = setting(16, min=1, help="frames per VAE forward (image VAEs, applied per frame)")


@dataclass
class DepthConfig:
    """Optional per-frame depth maps (a ``depth.mp4`` member) from a local depth-estimation model, for the
    Many-for-Many ``depth`` task (docs/tasks.md)."""

    model_path: Optional[str] = setting(None, help="local folder of a transformers depth-estimation model and "
                                        "its image processor (AutoModelForDepthEstimation + AutoImageProcessor, "
                                        "e.g. a Depth-Anything checkpoint); null = no depth stage")
    output: str = setting("auto", choices=["auto", "disparity", "depth"],
                          help="what the model predicts: disparity (relative inverse depth, larger = nearer: "
                          "Depth-Anything relative, DPT) or depth (larger = farther: metric heads); auto = depth "
                          "for a Depth-Anything config with depth_estimation_type metric and for ZoeDepth / GLPN, "
                          "else disparity. Either way depth.mp4 has near = bright")
    frames_per_batch: int = setting(8, min=1, help="frames per model forward")
    dtype: str = setting("float32", choices=["float32", "bfloat16", "float16"], help="model weights dtype")


@dataclass
class CurateConfig:
    """A whole curation run."""

    input: InputConfig = setting(default_factory=InputConfig, help="raw videos")
    output: OutputConfig = setting(default_factory=OutputConfig, help="shards")
    s3: S3Config = setting(default_factory=S3Config, help="S3 access for s3:// inputs and outputs (the "
                           "keys of a training config's data.s3)")
    storage: Optional[dict] = setting(None, help="removed: the storage section is now `s3` (see "
                                      "docs/curation.md); setting it is an error that names the new keys")
    ray: RayConfig = setting(default_factory=RayConfig, help="Ray resources")
    probe: ProbeConfig = setting(default_factory=ProbeConfig, help="probe")
    split: SplitConfig = setting(default_factory=SplitConfig, help="shot split")
    clip: ClipConfig = setting(default_factory=ClipConfig, help="clip")
    filters: FilterConfig = setting(default_factory=FilterConfig, help="filters")
    dedup: DedupConfig = setting(default_factory=DedupConfig, help="dedup")
    caption: CaptionConfig = setting(default_factory=CaptionConfig, help="caption")
    latents: LatentsConfig = setting(default_factory=LatentsConfig, help="latents")
    depth: DepthConfig = setting(default_factory=DepthConfig, help="depth maps (depth.mp4)")

    def validate(self) -> None:
        if self.storage is not None:
            raise ConfigError(renamed_storage_keys(self.storage))
        if self.clip.min_duration > self.clip.max_duration:
            raise ConfigError(f"clip.min_duration={self.clip.min_duration} is larger than "
                              f"clip.max_duration={self.clip.max_duration}")
        if self.caption.mode in ("vlm",) and not self.caption.vlm_path:
            raise ConfigError("caption.mode='vlm' needs caption.vlm_path (a local model folder)")
        if bool(self.filters.aesthetic_clip_path) != bool(self.filters.aesthetic_head_path):
            raise ConfigError("filters.aesthetic_clip_path and filters.aesthetic_head_path must be "
                              "set together (or both null to turn the aesthetic filter off)")
        from vchitect.data.config import text_encoder_configured

        e = self.latents.encoders
        if self.latents.enabled and not (e.vae_path and text_encoder_configured(self.latents)):
            raise ConfigError("latents.enabled=true needs latents.encoders.vae_path and "
                              "latents.encoders.text_encoder_path (for kind sd3: or clip_l_path, clip_g_path "
                              "and t5_path) — copy data.encoders of the training config")
        if self.latents.enabled and not self.latents.buckets:
            raise ConfigError("latents.buckets is empty; copy data.buckets of the training config")

    def missing_paths(self) -> dict[str, str]:
        """The required paths still empty, each with what it must be (the presets in configs/curate/
        leave both to the command line)."""
        required = {"input.path": (self.input.path, "a directory, an s3:// prefix or a manifest file"),
                    "output.path": (self.output.path, "a local folder or s3://bucket/prefix")}
        return {key: what for key, (value, what) in required.items() if not value}


def load_curate_config(path=None, overrides=None, *, require_paths: bool = True) -> CurateConfig:
    """Read and validate a curation config. A run needs ``input.path`` and ``output.path``;
    ``require_paths=False`` (``vchitect-curate config show``) accepts them empty."""
    cfg = load_config(path, overrides, schema=CurateConfig)
    missing = cfg.missing_paths() if require_paths else {}
    if missing:
        key, what = next(iter(missing.items()))
        raise ConfigError(f"{key} is required: {what}")
    return cfg


# Fields that do not change what is written (where, how fast, with which credentials).
_NOT_CONTENT = {"output": {"path"}, "s3": None, "storage": None, "ray": None, "input": {"path"}}


def config_fingerprint(cfg: CurateConfig) -> str:
    """A hash of every setting that changes shard contents; stored in stats.json."""
    d = to_dict(cfg)
    if not cfg.depth.model_path:  # depth off: its options write nothing (and outputs made before it existed resume)
        d.pop("depth", None)
    for section, keys in _NOT_CONTENT.items():
        if keys is None:
            d.pop(section, None)
        else:
            for k in keys:
                d[section].pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def storage_options(cfg: CurateConfig) -> dict[str, Any]:
    """fsspec options for s3:// paths."""
    return cfg.s3.storage_options()


def renamed_storage_keys(storage: Any) -> str:
    """The error for an old curation-only ``storage:`` section: each key it sets and the key of the
    shared S3Config (``s3.*``) that replaced it."""
    moves = []
    for key, value in (storage.items() if isinstance(storage, dict) else []):
        if key == "options" and isinstance(value, dict):  # credentials went there; now fields of s3
            fields = S3Config.__dataclass_fields__
            moves += [f"storage.options.{k} → {'s3.' + k if k in fields else 's3.options.' + k}" for k in value]
        else:  # endpoint_url, region (and options that is not a mapping): the same name under s3
            moves.append(f"storage.{key} → s3.{key}")
    return ("the `storage` section was renamed `s3`, with the keys of a training config's data.s3 (endpoint_url, "
            "region, profile, key, secret, anon, options): " + ("; ".join(moves) or "rename storage to s3"))
