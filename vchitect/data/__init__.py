"""Training-side data: a streaming, resumable WebDataset loader (local disk or S3), buckets,
joint image-video batches, and the on-device encode step. See docs/data.md."""

import vchitect.config  # noqa: F401  first: it imports .config back for Config.data

from .config import BucketConfig, DataConfig, EncoderConfig, S3Config, SourceConfig, TextShapeConfig
from .encode import encode_batch, load_encoders, vae_encode_split
from .loader import ShardLoader, build_loader
from .synthetic import SyntheticLoader

__all__ = ["BucketConfig", "DataConfig", "EncoderConfig", "S3Config", "SourceConfig", "TextShapeConfig",
           "ShardLoader", "SyntheticLoader", "build_loader", "encode_batch", "load_encoders",
           "vae_encode_split"]
