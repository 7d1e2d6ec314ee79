"""Training-side data: a streaming, resumable WebDataset loader (local disk or S3), buckets,
joint image-video batches, and the on-device encode step. See docs/data.md.

The names below are imported on first use (:mod:`vchitect.lazy`): the run config imports
:mod:`vchitect.data.config` without torch, PyAV or the loader."""

from vchitect.lazy import lazy_exports

lazy_exports(__name__, {
    "BucketConfig": "config", "DataConfig": "config", "EncoderConfig": "config", "S3Config": "config",
    "SourceConfig": "config", "TextShapeConfig": "config",
    "ShardLoader": "loader", "build_loader": "loader", "SyntheticLoader": "synthetic",
    "encode_batch": "encode", "load_encoders": "encode", "vae_encode_split": "encode",
})
