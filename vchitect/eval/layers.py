"""``vchitect eval layers EXPORT_DIR …``: RepVideo's layer diagnostic of exported models, as JSON and a plot.

RepVideo (Si et al. 2025) motivates its aggregation with two curves over the depth of a video DiT:
the attention maps change strongly between neighbouring layers, and the features of adjacent frames
become less similar along the depth. This command measures both on an export folder while it samples
(``--steps`` Euler steps of one prompt, guidance 1 by default so that only the conditional pass runs),
averaged over the transformer calls:

* **attention-map similarity** of block l with block l − 1 (l = 1 … L−1): the spatial branch's
  attention probabilities softmax(q·kᵀ/√d) over [the frame's video tokens; its text tokens] (padded
  text masked), for the video queries, averaged over heads — computed explicitly from the branch's
  q and k at the attention seam (``VchitectAttention.attention_fn``), not read out of SDPA, which
  does not return them; the sample itself still runs the model's own kernel. Per frame the S×K map
  is flattened, the cosine similarity of the two blocks' maps taken, and averaged over the frames;
* **adjacent-frame similarity** of block l's output video tokens (the residual stream it returns):
  the cosine similarity, over the D channels, of each token with the same token in the next frame,
  averaged over tokens and frame pairs.

Several exports are overlaid in one plot (e.g. the demo trained with and without
``model.repvideo``). Writes ``OUT/layers.json`` and ``OUT/layers.png``. Memory: the head-averaged maps
of two blocks at a time (N·S·(S+L) floats each, N = frames × batch), so at the 2B's scale keep
``--frames`` and the resolution small. Single process (not under ``vchitect launch``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F


def spatial_attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                            rows: Optional[int] = None) -> torch.Tensor:
    """Head-averaged softmax(q·kᵀ/√d): q N×Q×H×d, k N×K×H×d, key_mask N×K bool (True = attend) →
    N×rows×K (the first ``rows`` queries; all by default), in float32."""
    q = q[:, :rows] if rows is not None else q
    logits = torch.einsum("nqhd,nkhd->nhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(dim=-1).mean(dim=1)


def map_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two N×Q×K attention maps, per map (flattened), averaged over the N."""
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1).mean().item()


def frame_similarity(x: torch.Tensor, num_frames: int) -> float:
    """Cosine similarity over channels of every token with itself in the next frame, averaged:
    x (B·F)×S×D, frame-major within each video."""
    v = x.float().unflatten(0, (-1, num_frames))  # B×F×S×D
    return F.cosine_similarity(v[:, 1:], v[:, :-1], dim=-1).mean().item()


@dataclass
class LayerRecord:
    """Per-block sums over the transformer calls seen, and the number of calls."""

    num_layers: int
    attention: list[float] = field(init=False)  # entry l − 1: blocks l − 1 and l
    frames: list[float] = field(init=False)  # entry l: block l
    calls: int = 0

    def __post_init__(self):
        self.attention = [0.0] * (self.num_layers - 1)
        self.frames = [0.0] * self.num_layers

    def means(self) -> dict:
        n = max(self.calls, 1)
        return {"attention_similarity": [s / n for s in self.attention],
                "frame_similarity": [s / n for s in self.frames], "calls": self.calls}


class LayerRecorder:
    """Records both curves on a :class:`~vchitect.models.VchitectTransformer3DModel` while installed
    (``with LayerRecorder(model) as rec: …``); leaves the model as it was on exit."""

    def __init__(self, model):
        self.model = model
        self.blocks = list(model.transformer_blocks)
        self.record = LayerRecord(len(self.blocks))
        self._previous: Optional[torch.Tensor] = None  # the last block's map in the current call
        self._tokens = 0  # S, the video tokens per frame of the running block
        self._hooks: list = []

    def _seam(self, i: int, backend: str):
        from vchitect.models.attention import dot_product_attention

        def attention_fn(q, k, v, key_mask=None, *, branch: str):
            if branch == "spatial":
                probs = spatial_attention_probs(q, k, key_mask, rows=self._tokens)  # video queries only
                if i > 0 and self._previous is not None:
                    self.record.attention[i - 1] += map_similarity(probs, self._previous)
                self._previous = probs
            return dot_product_attention(q, k, v, key_mask, backend)

        return attention_fn

    def __enter__(self) -> "LayerRecorder":
        for block in self.blocks:
            if block.attn.attention_fn is not None:
                raise ValueError("the transformer's attention already goes through a seam (sequence parallelism?); "
                                 "run `vchitect eval layers` in a single process")

        def call_starts(_module, _args):
            self._previous = None
            self.record.calls += 1

        def block_starts(_module, args):
            self._tokens = args[0].shape[1]  # S: the video tokens of the block's input

        self._hooks.append(self.model.register_forward_pre_hook(call_starts))
        for i, block in enumerate(self.blocks):
            block.attn.attention_fn = self._seam(i, block.attn.backend)
            self._hooks.append(block.register_forward_pre_hook(block_starts))
            self._hooks.append(block.register_forward_hook(self._block_done(i)))
        return self

    def _block_done(self, i: int):
        def hook(_module, args, output):
            x, num_frames = output[0], args[3]
            if num_frames > 1:
                self.record.frames[i] += frame_similarity(x, num_frames)

        return hook

    def __exit__(self, *exc) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for block in self.blocks:
            block.attn.attention_fn = None


def analyse(pipe, prompt: str, num_frames: int = 16, height: Optional[int] = None, width: Optional[int] = None,
            steps: int = 4, seed: int = 0, guidance: float = 1.0) -> dict:
    """Sample ``prompt`` with ``pipe`` (a VchitectPipeline) while recording; the two per-layer curves."""
    if num_frames < 2:
        raise ValueError(f"--frames {num_frames}: the adjacent-frame similarity needs at least 2 frames")
    pipe.set_progress_bar_config(disable=True)
    model = pipe.transformer
    with LayerRecorder(model) as rec, torch.no_grad():
        pipe(prompt, num_frames=num_frames, height=height, width=width, num_inference_steps=steps,
             guidance_scale=guidance, generator=torch.Generator().manual_seed(seed), output_type="latent")
    repvideo = model.config.get("repvideo") or {}
    return {"num_layers": len(rec.blocks), "repvideo": dict(repvideo) if repvideo.get("window") else None,
            **rec.record.means()}


def plot(path: Path, results: list[dict]) -> Path:
    """Both curves per layer, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
    for r in results:
        L = r["num_layers"]
        left.plot(range(1, L), r["attention_similarity"], marker="o", label=r["label"])
        right.plot(range(L), r["frame_similarity"], marker="o", label=r["label"])
    left.set_title("spatial attention maps: block l vs block l − 1")
    left.set_xlabel("block l")
    left.set_ylabel("cosine similarity")
    right.set_title("block output: frame f vs frame f + 1")
    right.set_xlabel("block l")
    right.set_ylabel("cosine similarity")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def run_layers(exports: list[str], prompt: str, out: str, labels: Optional[list[str]] = None, frames: int = 16,
               height: Optional[int] = None, width: Optional[int] = None, steps: int = 4, seed: int = 0,
               guidance: float = 1.0) -> dict:
    """The command: every export in turn (same prompt, noise seed and steps), then OUT/layers.json and .png."""
    from vchitect.export import VchitectPipeline

    labels = list(labels or [])
    if labels and len(labels) != len(exports):
        raise ValueError(f"--labels gives {len(labels)} names for {len(exports)} export folders; give one per folder")
    results = []
    for i, folder in enumerate(exports):
        if not (Path(folder) / "model_index.json").is_file():
            raise ValueError(f"{folder} is not an export folder (no model_index.json); make one with `vchitect export`")
        pipe = VchitectPipeline.from_pretrained(folder)
        res = analyse(pipe, prompt, frames, height, width, steps, seed, guidance)
        results.append({"label": labels[i] if labels else Path(folder).resolve().name, "export": str(folder), **res})
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"prompt": prompt, "frames": frames, "height": height, "width": width, "steps": steps, "seed": seed,
               "guidance": guidance, "models": results}
    (out_dir / "layers.json").write_text(json.dumps(summary, indent=1))
    plot(out_dir / "layers.png", results)
    return summary


__all__ = ["LayerRecorder", "analyse", "frame_similarity", "map_similarity", "plot", "run_layers",
           "spatial_attention_probs"]
