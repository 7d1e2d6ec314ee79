"""Evaluation: the synthetic prompt-following probe and VBench-style video metrics."""

from .metrics import consistency, temporal_flickering, video_metrics
from .probe import ProbeResult, parse_prompt, probe_video, score

__all__ = ["ProbeResult", "consistency", "parse_prompt", "probe_video", "score", "temporal_flickering",
           "video_metrics"]
