"""Which demo design choices make direction learnable? A fast in-memory ablation of the demo recipe.

The full demo (`vchitect demo`) spends minutes on curation and runs the 2-rank trainer; to compare
design levers quickly this script trains the real demo transformer (`VchitectTransformer3DModel`,
demo preset shape) in one process on clips drawn in memory the way the demo's curated clips look
(shapes moving 15 % → 85 % along an axis at one of three fixed cross positions, the loader's
random start within the clip, 16×16 after area downscaling from 128 px), with the frozen MiniLM
text encoder (embeddings of the 72-caption vocabulary computed once), rectified flow, AdamW with
warm-up and cosine decay, EMA 0.99. At every ``--eval-every`` steps it samples every colour × shape
× direction prompt with the Euler sampler and classifier-free guidance, and scores them with the
demo's probe (`vchitect/eval/probe.py`), separately on training and held-out combinations.

    # the demo's recipe (configs/*/demo.yaml, shape radius of vchitect.demo.corpus)
    python benchmarks/demo_ablation.py --frame-pos-embed sincos --shift 3 --batch 8 --steps 1800 --eval-every 300
    ... --captions from          # the old captions ("moves from left to right")
    ... --radius 0.22 --seed 1   # smaller shapes, another seed
    ... --start centre           # every shape starts at the centre
    ... --oracle-pooled          # diagnostic: one-hot colour + direction as the pooled vector
    ... --prediction sample      # x-prediction; --text-layer 2: an earlier MiniLM layer

Every evaluation also prints a ``SWAP`` line: the loss increase when every caption's direction
(or colour) word is replaced by another, at t = 0.95, 0.8, 0.5, 0.2 (0.000: the word is ignored).

Figures: benchmarks/RESULTS.md (Demo). ``--save DIR`` writes the sampled videos (.npy) and a
contact sheet per evaluation.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.synthetic import (BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, caption_for, draw_shape,  # noqa: E402
                                     with_article)
from vchitect.demo import text_encoder_path  # noqa: E402
from vchitect.demo.corpus import HELD_OUT, OFFSETS, RADIUS, SHOT_LENGTHS, position, training_combos  # noqa: E402
from vchitect.diffusion.sampling import TextCondition, flow_sigmas, sample  # noqa: E402
from vchitect.eval.probe import probe_video, score  # noqa: E402
from vchitect.models.encoders import load_text_encoder  # noqa: E402
from vchitect.models.transformer import VchitectTransformer3DModel  # noqa: E402

SOURCE = 128  # the demo corpus' frame side before the loader's downscale
MARGIN = 0.1  # seconds the curation trims at each cut


def cap(args, c: str, s: str, d: str) -> str:
    return caption_for(c, s, d) if args.captions == "word" else f"{with_article(c)} {s} moves from {d}"


def render_clip(args, color: str, shape: str, direction: str, background, offset: float, seconds: float,
                start: float) -> np.ndarray:
    """F×size×size×3 uint8: the demo's trajectory sampled at ``args.fps`` from ``start`` seconds into
    the shot (15 % → 85 % of the axis, or 50 % → 85 % with ``--start centre``)."""
    path = {} if args.start == "edge" else {"begin": 0.5, "span": 0.35}
    out = []
    for k in range(args.frames):
        progress = min(1.0, (start + k / args.fps) / seconds)
        centre = position(direction, progress, offset, SOURCE, **path)
        img = np.empty((SOURCE, SOURCE, 3), np.uint8)
        img[:] = background
        draw_shape(img, shape, centre, args.radius * SOURCE, COLORS[color])
        out.append(cv2.resize(img, (args.size, args.size), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(out)).float().permute(3, 0, 1, 2) / 127.5 - 1  # C×F×H×W in [-1, 1]


class Clips:
    """Random training clips and their captions (10 % empty: the classifier-free guidance dropout)."""

    def __init__(self, args, seed: int = 0):
        self.a, self.rng = args, np.random.default_rng(seed)
        self.combos = [(c, s, d) for c, d in training_combos() for s in SHAPES]

    def batch(self, n: int) -> tuple[torch.Tensor, list[str]]:
        a, rng = self.a, self.rng
        xs, caps = [], []
        for _ in range(n):
            c, s, d = self.combos[rng.integers(len(self.combos))]
            seconds = SHOT_LENGTHS[rng.integers(len(SHOT_LENGTHS))]
            span = (a.frames - 1) / a.fps
            start = MARGIN + rng.uniform(0, max(0.0, seconds - 2 * MARGIN - span))
            xs.append(render_clip(a, c, s, d, BACKGROUNDS[rng.integers(len(BACKGROUNDS))],
                                  OFFSETS[rng.integers(len(OFFSETS))], seconds, start))
            caps.append(cap(a, c, s, d) if rng.random() >= 0.1 else "")
        return torch.stack(xs), caps

    def swap_set(self, n: int = 48) -> tuple[torch.Tensor, list[tuple[str, str, str]], torch.Tensor]:
        """``n`` fixed clips (centred across the axis, 2 s shots, 0.2 s in), their (colour, shape,
        direction) and fixed noise: the inputs of :func:`swap_gain`."""
        combos, clips = [], []
        for _ in range(n):
            c, s, d = self.combos[self.rng.integers(len(self.combos))]
            combos.append((c, s, d))
            clips.append(render_clip(self.a, c, s, d, BACKGROUNDS[self.rng.integers(len(BACKGROUNDS))], 0.5,
                                     SHOT_LENGTHS[1], 0.2))
        x0 = torch.stack(clips)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
        return x0, combos, noise


def caption_table(args) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    enc = load_text_encoder(text_encoder_path(), kind="sentence", max_length=16)
    caps = sorted({cap(args, c, s, d) for c in COLORS for s in SHAPES for d in DIRECTIONS}) + [""]
    hidden, mask, pooled = enc.encode(caps)
    if args.text_layer != -1:  # token states of an earlier layer (pooled stays the sentence embedding)
        tok = enc.tokenizer(caps, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        with torch.no_grad():
            hidden = enc.model(**tok, output_hidden_states=True).hidden_states[args.text_layer]
    table = {c: (hidden[i], mask[i], pooled[i]) for i, c in enumerate(caps)}
    if args.oracle_pooled:  # diagnostic: the pooled vector one-hot encodes colour and direction
        for c in COLORS:
            for s in SHAPES:
                for d in DIRECTIONS:
                    h, m, _ = table[cap(args, c, s, d)]
                    p = torch.zeros(hidden.shape[-1])
                    p[sorted(COLORS).index(c)] = 1
                    p[16 + sorted(DIRECTIONS).index(d)] = 1
                    table[cap(args, c, s, d)] = (h, m, p)
        table[""] = (table[""][0], table[""][1], torch.zeros(hidden.shape[-1]))
    return table


def condition(table, prompts: list[str]) -> TextCondition:
    rows = [table[p] for p in prompts]
    return TextCondition(torch.stack([r[0] for r in rows]), torch.stack([r[2] for r in rows]),
                         torch.stack([r[1] for r in rows]))


def swap_gain(model, table, args, probe_set) -> str:
    """How much the loss rises when a caption's direction (or colour) is swapped, per noise level:
    a direct measure of whether the model reads each attribute at that t."""
    x0, combos, noise = probe_set
    out = []
    dirs, cols = sorted(DIRECTIONS), sorted(COLORS)
    with torch.no_grad():
        for tv in (0.95, 0.8, 0.5, 0.2):
            t = torch.full((len(combos),), tv)
            xt = (1 - tv) * x0 + tv * noise
            res = []
            for kind in ("true", "dir", "col"):
                caps = []
                for c, s, d in combos:
                    if kind == "dir":
                        d = dirs[(dirs.index(d) + 1) % 4]
                    if kind == "col":
                        c = cols[(cols.index(c) + 1) % len(cols)]
                    caps.append(cap(args, c, s, d))
                cnd = condition(table, caps)
                pred = model(xt, cnd.hidden, cnd.pooled, t * 1000, encoder_attention_mask=cnd.mask, return_dict=False)[0]
                res.append((pred - (noise - x0)).square().mean().item())
            out.append(f"t={tv}: {res[0]:.3f} +dir {res[1] - res[0]:+.3f} +col {res[2] - res[0]:+.3f}")
    return " | ".join(out)


def evaluate(model, ema: dict, table, args, step: int, swap_set) -> dict:
    live = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(ema)
    model.eval()
    prompts = [cap(args, c, s, d) for c in sorted(COLORS) for s in SHAPES for d in sorted(DIRECTIONS)]
    noise = torch.randn(len(prompts), 3, args.frames, args.size, args.size, generator=torch.Generator().manual_seed(1000))
    x = sample(model, noise, condition(table, prompts), condition(table, [""] * len(prompts)),
               sigmas=flow_sigmas(args.sample_steps, shift=args.shift), guidance_scale=args.guidance)
    gains = swap_gain(model, table, args, swap_set)
    model.load_state_dict(live)
    model.train()
    print(f"SWAP step {step}: {gains}", flush=True)
    if args.size < 16:  # the probe's thresholds are set for ≥ 16 pixels
        x = x.repeat_interleave(16 // args.size, -1).repeat_interleave(16 // args.size, -2)
    videos = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 4, 1).numpy()
    results = [probe_video(v) for v in videos]
    res = score(prompts, results, HELD_OUT)  # the probe parses both caption forms
    res["moving"] = sum(r.direction is not None for r in results) / len(results)
    if args.save:
        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"videos_{step}.npy", videos)
        rows = [np.concatenate([cv2.resize(f, (64, 64), interpolation=cv2.INTER_NEAREST) for f in vid], 1)
                for vid in videos[::9][:8]]
        cv2.imwrite(str(out / f"sheet_{step}.png"), cv2.cvtColor(np.concatenate(rows, 0), cv2.COLOR_RGB2BGR))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--size", type=int, default=16, help="frame side in pixels")
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--fps", type=float, default=4.5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rope-theta", type=float, default=10.0)
    ap.add_argument("--frame-pos-embed", default="none", choices=["none", "sincos"])
    ap.add_argument("--prediction", default="velocity", choices=["velocity", "sample"])
    ap.add_argument("--logit-mean", type=float, default=0.5)
    ap.add_argument("--shift", type=float, default=1.0, help="timestep shift in training and sampling")
    ap.add_argument("--text-layer", type=int, default=-1, help="MiniLM hidden-state layer for the tokens")
    ap.add_argument("--captions", default="word", choices=["word", "from"],
                    help="'a red circle moves right' (the corpus' captions) or 'a red circle moves from left to right'")
    ap.add_argument("--oracle-pooled", action="store_true", help="diagnostic: one-hot colour+direction as pooled")
    ap.add_argument("--start", default="edge", choices=["edge", "centre"],
                    help="trajectory 15 %% → 85 %% of the axis, or from the centre 50 %% → 85 %%")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--radius", type=float, default=RADIUS, help="shape radius, fraction of the frame side")
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save", default=None, help="folder for sampled videos and contact sheets")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    table = caption_table(args)
    clips = Clips(args, seed=args.seed)
    swap_set = Clips(args, seed=99).swap_set()
    model = VchitectTransformer3DModel(
        sample_size=args.size, patch_size=args.patch, in_channels=3, num_layers=args.layers, num_attention_heads=4,
        attention_head_dim=32, joint_attention_dim=384, pooled_projection_dim=384,
        pos_embed_max_size=args.size // args.patch, rope_theta=args.rope_theta,
        frame_pos_embed=args.frame_pos_embed, prediction=args.prediction)
    ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    warmup = 20

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    print(f"{sum(p.numel() for p in model.parameters()):,} parameters; {vars(args)}", flush=True)
    t0, losses = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x0, caps = clips.batch(args.batch)
        c = condition(table, caps)
        t = torch.sigmoid(torch.randn(args.batch) + args.logit_mean)
        t = args.shift * t / (1 + (args.shift - 1) * t)
        noise = torch.randn_like(x0)
        tt = t.view(-1, 1, 1, 1, 1)
        pred = model((1 - tt) * x0 + tt * noise, c.hidden, c.pooled, t * 1000, encoder_attention_mask=c.mask,
                     return_dict=False)[0]
        loss = (pred - (noise - x0)).square().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for k, v in model.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].mul_(0.99).add_(v, alpha=0.01)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            print(f"step {step + 1} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f} s)", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            r = evaluate(model, ema, table, args, step + 1, swap_set)
            print(f"EVAL step {step + 1}: training combos colour {r['train']['color']:.0%} direction "
                  f"{r['train']['direction']:.0%} · held-out colour {r['held_out']['color']:.0%} direction "
                  f"{r['held_out']['direction']:.0%} · moving {r['moving']:.0%}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
