"""Turn one raw shard sample (``{ext: bytes}``) into a training sample, or raise :class:`BadSample`.

Decode mode: ``mp4`` (or ``jpg``/``png``/``webp``) + ``txt`` → uint8 pixels 3×F×H×W of a bucket.
Precomputed mode: ``latent.npy`` (C×F'×H'×W'), ``text.npy`` (L×D), ``text_mask.npy`` (L),
``pooled.npy`` (P) + ``txt`` → float tensors; a sample whose json records other encoders than
``data.encoders`` names raises :class:`~vchitect.data.provenance.EncoderMismatch` (fatal, not
skipped). Auto mode picks per sample (latent.npy present or not).

With ``data.tasks`` (decode mode only) each sample also draws its task (:mod:`vchitect.data.tasks`)
from its own generator, after its frames: ``condition`` (uint8 3×F×H×W) and ``condition_mask``
(uint8 1×F×H×W) join its arrays, the task name is ``Sample.task`` and the caption ends in
``#task: <full name>``. ``vedit`` reads the sample's ``src.mp4`` at the same source frames and size.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .buckets import Bucket, choose_bucket, latent_shape
from .config import DataConfig
from .decode import BadSample, decode_image, decode_video
from .provenance import check_record, configured_encoders, sample_meta
from .tasks import draw_task, task_caption

SRC_MEMBER = "src.mp4"  # the source video of an edit / removal pair (the sample's mp4 is the target)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


@dataclass
class Sample:
    key: str
    caption: str
    bucket: Bucket
    kind: str  # "pixels" | "latents"
    arrays: dict = field(default_factory=dict)  # pixels | latents, text, text_mask, pooled
    frames: Optional[list] = None  # decode mode, video: the source frame index of each frame
    task: Optional[str] = None  # data.tasks set: the task drawn for this sample


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Per-sample randomness (image pick, frame offset): the same for the same seed, epoch and key."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _caption(members: dict) -> str:
    if "txt" not in members:
        raise BadSample("missing_member", "no txt")
    raw = members["txt"]
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise BadSample("bad_caption", "txt is not UTF-8 text") from None
    text = text.strip()
    if not text or "\x00" in text:
        raise BadSample("bad_caption", "txt is empty or binary")
    return text


def _npy(members: dict, name: str) -> np.ndarray:
    if name not in members:
        raise BadSample("missing_member", f"no {name}")
    try:
        return np.load(io.BytesIO(members[name]), allow_pickle=False)
    except Exception as exc:
        raise BadSample("bad_latent" if name == "latent.npy" else "bad_text",
                        f"{name} unreadable: {type(exc).__name__}") from None


class SampleDecoder:
    """Config-bound processing of raw samples; picklable, used inside loader workers."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.buckets = [Bucket(b.height, b.width, b.frames) for b in cfg.buckets]
        self.latent_buckets = {latent_shape(b, cfg.latent_channels, cfg.vae_spatial_factor,
                                            cfg.vae_temporal_factor): b for b in reversed(self.buckets)}
        self._encoders: Optional[dict] = None  # configured_encoders(cfg), once a record needs it

    def _draw(self, key: str, epoch: int) -> tuple[np.random.Generator, bool]:
        """The sample's generator and its image-ratio pick (its first draw; frames come next)."""
        rng = sample_rng(self.cfg.seed, epoch, key)
        return rng, bool(rng.random() < self.cfg.image_ratio)

    def __call__(self, key: str, members: dict, epoch: int, shard: str = "?", source: int = 0) -> Sample:
        rng, as_image = self._draw(key, epoch)
        caption = _caption(members)
        mode = self.cfg.mode
        if mode == "auto":
            mode = "precomputed" if "latent.npy" in members else "decode"
        if mode == "precomputed":
            return self._precomputed(key, caption, members, as_image, shard)
        return self._decode(key, caption, members, as_image, rng, source=source)

    def decode_clip(self, key: str, mp4: bytes, epoch: int = 0, image: bool = False) -> Sample:
        """The crop decode mode reads from sample ``key``'s ``mp4`` in ``epoch`` — its bucket and
        frame window — as a video (or, ``image``, as one frame) whatever the image-ratio pick: what
        the curation latents stage encodes, for epoch 0."""
        rng, _ = self._draw(key, epoch)
        return self._decode(key, "", {"mp4": mp4}, image, rng, tasks=False)

    def _decode(self, key, caption, members, as_image, rng, tasks=True, source: int = 0) -> Sample:
        cfg = self.cfg
        img = next((e for e in IMAGE_EXTS if e in members), None)
        frames = None
        if img is not None and "mp4" not in members:
            pixels, bucket = decode_image(members[img], lambda i: choose_bucket(
                self.buckets, i.width, i.height, None, cfg.fps, image=True))
        elif "mp4" in members:
            pixels, bucket, frames = decode_video(members["mp4"], lambda i: choose_bucket(
                self.buckets, i.width, i.height, i.span, cfg.fps, image=as_image),
                cfg.fps, rng, cfg.decode_threads)
        else:
            raise BadSample("missing_member", "no mp4 or image")
        sample = Sample(key, caption, bucket, "pixels", {"pixels": pixels}, frames)
        if tasks and cfg.tasks:
            self._add_task(sample, members, rng, self.task_weights(source))
        return sample

    def _side_member(self, side: str) -> Optional[str]:
        return SRC_MEMBER if side == "src" else self.cfg.task_options.depth_member

    def task_weights(self, source: int) -> dict:
        """The task weights of samples of source ``source``: its own ``tasks``, else ``data.tasks``."""
        srcs = self.cfg.sources
        return (srcs[source].tasks if source < len(srcs) else None) or self.cfg.tasks

    def _add_task(self, sample: Sample, members: dict, rng, weights: dict) -> None:
        """Draw the sample's task (after its frames, from the same generator) and build its condition."""
        pixels = sample.arrays["pixels"]  # 3×F×H×W
        has_side = lambda side: sample.frames is not None and self._side_member(side) in members  # noqa: E731
        task = draw_task(rng, weights, pixels.shape[1], has_side)
        if task is None:
            raise BadSample("no_task", f"no task of ({', '.join(weights)}) applies to this "
                            f"{pixels.shape[1]}-frame sample (image tasks need 1 frame, video tasks more; "
                            f"vedit needs {SRC_MEMBER}, depth {self.cfg.task_options.depth_member})")
        side = None
        if task.side is not None:
            name = self._side_member(task.side)
            try:
                side, _, _ = decode_video(members[name], lambda i: sample.bucket, self.cfg.fps, rng,
                                          self.cfg.decode_threads, indices=sample.frames)
            except BadSample as exc:
                raise BadSample(f"bad_{task.side}", f"{name}: {exc}") from None
        cond, mask = task.build(pixels, rng, self.cfg.task_options, side)
        sample.arrays["condition"], sample.arrays["condition_mask"] = cond, mask
        sample.task = task.name
        sample.caption = task_caption(sample.caption, task)

    def _precomputed(self, key, caption, members, as_image, shard) -> Sample:
        cfg = self.cfg
        meta = sample_meta(members)
        if meta is not None and isinstance(meta.get("latents"), dict) and (
                cfg.encoders.text_encoder_path or cfg.encoders.vae_path):
            if self._encoders is None:
                self._encoders = configured_encoders(cfg)
            check_record(meta, self._encoders, f"shard {shard}, sample {key}")
        lat = _npy(members, "latent.npy")
        if lat.ndim != 4 or tuple(lat.shape) not in self.latent_buckets or lat.dtype.kind != "f":
            raise BadSample("bad_latent", f"latent.npy {lat.dtype}{tuple(lat.shape)} matches no bucket "
                            f"(C={cfg.latent_channels}, F'×H'×W' of {[b.name for b in self.buckets]})")
        bucket = self.latent_buckets[tuple(lat.shape)]
        if as_image and not bucket.is_image:  # first latent frame of a causal / per-frame VAE = image
            img = self.latent_buckets.get((lat.shape[0], 1) + tuple(lat.shape[2:]))
            if img is not None:
                lat, bucket = lat[:, :1], img
        text = _npy(members, "text.npy")
        mask = _npy(members, "text_mask.npy")
        L, D = cfg.text.max_length, cfg.text.dim
        if text.ndim != 2 or text.shape[1] != D or mask.shape != (text.shape[0],):
            raise BadSample("bad_text", f"text.npy {tuple(text.shape)} / text_mask.npy {tuple(mask.shape)}"
                            f" is not L×{D} / L")
        text, mask = text[:L].astype(np.float32), mask[:L].astype(bool)
        if text.shape[0] < L:  # pad to L tokens, masked out
            text = np.concatenate([text, np.zeros((L - text.shape[0], D), np.float32)])
            mask = np.concatenate([mask, np.zeros(L - mask.shape[0], bool)])
        if "pooled.npy" in members:
            pooled = _npy(members, "pooled.npy").astype(np.float32).reshape(-1)
        elif self._masked_mean_pools(meta, D):  # the t5 kind's pooled vector
            pooled = (text * mask[:, None]).sum(0) / max(1, mask.sum())
        else:
            raise BadSample("missing_member", f"no pooled.npy (a shard with a latents record always has one; "
                            f"without, the masked-mean stand-in needs P == D and text_encoder_kind t5: "
                            f"P={cfg.text.pooled_dim}, D={D}, kind {cfg.encoders.text_encoder_kind})")
        if pooled.shape != (cfg.text.pooled_dim,):
            raise BadSample("bad_text", f"pooled.npy {tuple(pooled.shape)} is not ({cfg.text.pooled_dim},)")
        return Sample(key, caption, bucket, "latents", {
            "latents": np.ascontiguousarray(lat, dtype=np.float32), "text": text, "text_mask": mask,
            "pooled": pooled.astype(np.float32)})

    def _masked_mean_pools(self, meta: Optional[dict], D: int) -> bool:
        """A shard without pooled.npy may stand in the masked mean of its hidden states — the pooled
        vector of the t5 kind only (clip pools text_embeds, sentence normalises the mean) — when it
        has no latents record (curation always writes pooled.npy) and P == D."""
        recorded = meta is not None and isinstance(meta.get("latents"), dict)
        return not recorded and self.cfg.text.pooled_dim == D and self.cfg.encoders.text_encoder_kind == "t5"


def collate(samples: list[Sample]) -> dict:
    """Samples of one (kind, bucket) → the batch dict the trainer consumes."""
    import torch

    b = samples[0].bucket
    batch = {"captions": [s.caption for s in samples], "keys": [s.key for s in samples],
             "bucket": (b.height, b.width, b.frames)}
    if samples[0].task is not None:
        batch["tasks"] = [s.task for s in samples]
    for name in samples[0].arrays:
        arrays = [s.arrays[name] for s in samples]
        batch[name] = torch.from_numpy(arrays[0][None] if len(arrays) == 1 else np.stack(arrays))
    return batch

