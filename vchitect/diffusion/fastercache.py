"""FasterCache: training-free reuse of attention outputs and of the unconditional prediction.

Two caches, each with its own schedule over the sampling steps i = 0 … N−1 (starts are fractions
of N, so one setting fits any step count):

**Attention reuse.** From step ``round(attention_start·N)`` on, each block's attention (all three
branches and their projections) is computed only every ``attention_interval`` steps. On the
other steps its output is extrapolated linearly from the last two computed ones, at steps a < b:

    F_i = F_b + w(i) · (i − b)/(b − a) · (F_b − F_a),
    w(i) = weight_start + (weight_end − weight_start) · i/(N − 1)

so the extrapolation weight grows over sampling (w = 0 is plain reuse, w = 1 the full linear
extrapolation). Conditional and unconditional rows keep separate histories.

**CFG-Cache.** From step ``round(cfg_start·N)`` on, the unconditional pass runs only every
``cfg_interval`` steps. At every full step the difference Δ = FFT(v_uncond) − FFT(v_cond) is stored
(per-frame 2-D FFT over height and width), split into a low band (normalised radius ≤
``cfg_freq_cutoff``, 1 = Nyquist) and a high band. On skipped steps

    v_uncond = IFFT(FFT(v_cond) + a_low(i)·Δ_low + a_high(i)·Δ_high),
    a_low = 1 + low_boost·(1 − p),  a_high = 1 + high_boost·p,  p = i/(N − 1),

stressing the low-frequency difference early (layout) and the high-frequency one late (detail).

Defaults (benchmarks/RESULTS.md): both caches from 20 % of the steps, refreshed together every 3rd
step. Aligned refreshes matter: at every full CFG step both branches' attention is computed
fresh, so the stored CFG residual is exact; attention every 2nd and CFG every 3rd step (from 30 %)
lost 7.5 dB of PSNR on the trained demo model while saving fewer FLOPs.

Cost: attention histories hold two outputs per block and per role (the activations of two
forward passes); counters of computed and reused work are left in ``FasterCacheConfig.stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MethodType
from typing import Optional

import torch


@dataclass
class FasterCacheConfig:
    attention_start: float = 0.2  # fraction of the steps before attention reuse may start
    attention_interval: int = 3  # from the start on, compute attention every this many steps
    weight_start: float = 0.0  # extrapolation weight w at the first step …
    weight_end: float = 1.0  # … growing linearly to this at the last
    cfg_start: float = 0.2  # fraction of the steps before the unconditional pass may be skipped
    cfg_interval: int = 3  # from the start on, run the unconditional pass every this many steps
    cfg_freq_cutoff: float = 0.25  # low/high split of the CFG residual (normalised radius, 1 = Nyquist)
    low_boost: float = 0.0  # extra weight of the low-frequency residual early in sampling
    high_boost: float = 0.0  # extra weight of the high-frequency residual late in sampling
    attention: bool = True  # enable attention reuse
    cfg: bool = True  # enable CFG-Cache
    stats: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        if self.attention_interval < 1 or self.cfg_interval < 1:
            raise ValueError("FasterCache intervals must be >= 1 (1 = always compute)")
        for name in ("attention_start", "cfg_start"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"FasterCache {name}={getattr(self, name)}: a fraction of the steps in [0, 1]")

    def attach(self, model, num_steps: int) -> "FasterCacheSession":
        return FasterCacheSession(self, model, num_steps)


class FasterCacheSession:
    """The caches of one sampling run; installed on ``model.transformer_blocks`` until :meth:`detach`."""

    def __init__(self, cfg: FasterCacheConfig, model, num_steps: int):
        self.cfg, self.num_steps = cfg, num_steps
        self.attn_start = int(round(cfg.attention_start * num_steps))
        self.cfg_start = int(round(cfg.cfg_start * num_steps))
        self.step, self.roles = 0, ("cond",)
        self.history: dict[tuple[int, str], list] = {}
        self.residual: Optional[tuple[int, torch.Tensor, torch.Tensor]] = None
        self.counts = {"block_rows": 0, "attention_rows": 0, "attention_reused_rows": 0, "uncond_rebuilt": 0,
                       "model_calls": 0}
        self._attns, self._hooks = [], []
        blocks = list(model.transformer_blocks)
        for i, block in enumerate(blocks):
            attn = block.attn
            self._attns.append((attn, attn.__dict__.get("forward")))
            attn.forward = MethodType(_cached_forward(self, i, type(attn).forward), attn)
            self._hooks.append(block.register_forward_pre_hook(self._count_block))
        self._hooks.append(model.register_forward_pre_hook(self._count_call))

    # ---------------------------------------------------------------- schedule
    def progress(self, i: int) -> float:
        return i / max(self.num_steps - 1, 1)

    def cfg_full(self, i: int) -> bool:
        """Whether step i runs the unconditional pass."""
        return not self.cfg.cfg or i < self.cfg_start or (i - self.cfg_start) % self.cfg.cfg_interval == 0

    def attention_scheduled(self, i: int) -> bool:
        """Whether step i computes attention (when a role lacks two computed outputs it computes anyway)."""
        return (not self.cfg.attention or i < self.attn_start
                or (i - self.attn_start) % self.cfg.attention_interval == 0)

    def begin_step(self, i: int, roles: tuple[str, ...]) -> None:
        self.step, self.roles = i, roles

    # ---------------------------------------------------------------- counting
    def _count_block(self, _module, args):
        self.counts["block_rows"] += args[2].shape[0]  # temb: B rows (videos) of this call

    def _count_call(self, _module, args):
        self.counts["model_calls"] += 1

    # ---------------------------------------------------------------- attention reuse
    def attention(self, i_block: int, forward, attn, x, ctx, num_frames, rope, text_mask=None):
        R = len(self.roles)
        xs, cs = x.chunk(R), ctx.chunk(R)
        ms = text_mask.chunk(R) if text_mask is not None else [None] * R
        rows = xs[0].shape[0] // num_frames
        outs: list = [None] * R
        compute = [r for r, role in enumerate(self.roles)
                   if self.attention_scheduled(self.step) or len(self.history.get((i_block, role), ())) < 2]
        if compute:
            cat = (lambda ts: torch.cat([ts[r] for r in compute]) if len(compute) > 1 else ts[compute[0]])
            mask = None if text_mask is None else cat(ms)
            video, text = forward(attn, cat(xs), cat(cs), num_frames, rope, mask)
            videos = video.chunk(len(compute))
            texts = text.chunk(len(compute)) if text is not None else [None] * len(compute)
            for j, r in enumerate(compute):
                outs[r] = (videos[j], texts[j])
                hist = self.history.setdefault((i_block, self.roles[r]), [])
                hist.append((self.step, outs[r]))
                del hist[:-2]
            self.counts["attention_rows"] += rows * len(compute)
        for r, role in enumerate(self.roles):
            if outs[r] is None:
                outs[r] = self._extrapolate(self.history[(i_block, role)])
                self.counts["attention_reused_rows"] += rows
        video = torch.cat([o[0] for o in outs]) if R > 1 else outs[0][0]
        text = None if outs[0][1] is None else (torch.cat([o[1] for o in outs]) if R > 1 else outs[0][1])
        return video, text

    def _extrapolate(self, hist):
        (a, fa), (b, fb) = hist
        i = self.step
        w = self.cfg.weight_start + (self.cfg.weight_end - self.cfg.weight_start) * self.progress(i)
        k = w * (i - b) / (b - a)

        def ex(t_a, t_b):
            return None if t_b is None else t_b + k * (t_b - t_a)

        return ex(fa[0], fb[0]), ex(fa[1], fb[1])

    # ---------------------------------------------------------------- CFG-Cache
    def _low_mask(self, h: int, w: int, device) -> torch.Tensor:
        fh = torch.fft.fftfreq(h, device=device) * 2
        fw = torch.fft.fftfreq(w, device=device) * 2
        r2 = fh[:, None] ** 2 + fw[None, :] ** 2
        return (r2 <= self.cfg.cfg_freq_cutoff ** 2).float()  # H×W, unshifted FFT layout

    def store_cfg_residual(self, v_cond: torch.Tensor, v_uncond: torch.Tensor, i: int) -> None:
        if not self.cfg.cfg:
            return
        delta = torch.fft.fft2(v_uncond.float()) - torch.fft.fft2(v_cond.float())  # B×C×F×H×W, per frame
        low = self._low_mask(*delta.shape[-2:], delta.device)
        self.residual = (i, delta * low, delta * (1 - low))

    def rebuild_uncond(self, v_cond: torch.Tensor, i: int) -> torch.Tensor:
        _, low, high = self.residual
        p = self.progress(i)
        a_low, a_high = 1 + self.cfg.low_boost * (1 - p), 1 + self.cfg.high_boost * p
        self.counts["uncond_rebuilt"] += 1
        return torch.fft.ifft2(torch.fft.fft2(v_cond.float()) + a_low * low + a_high * high).real

    # ---------------------------------------------------------------- teardown
    def detach(self) -> None:
        for attn, own_forward in self._attns:
            if own_forward is None:
                del attn.forward
            else:
                attn.forward = own_forward
        for h in self._hooks:
            h.remove()
        self.history.clear()
        self.residual = None
        self.cfg.stats = dict(self.counts, num_steps=self.num_steps)


def _cached_forward(session: FasterCacheSession, i_block: int, forward):
    def cached(attn, x, ctx, num_frames, rope, text_mask=None):
        return session.attention(i_block, forward, attn, x, ctx, num_frames, rope, text_mask)

    return cached


__all__ = ["FasterCacheConfig", "FasterCacheSession"]
