"""Activation checkpointing (none | full | selective) and activation offload of block inputs.

Checkpointing uses PyTorch's non-reentrant ``torch.utils.checkpoint`` around a block's forward, so
FSDP2's hooks, DTensor and ``torch.compile`` all compose with it. The block keeps its module path
(``transformer_blocks.3.attn.to_q`` …): the wrapper replaces the *instance's* ``forward`` instead of
wrapping the module, so state-dict keys and checkpoints are unchanged.

With checkpointing the only activations a block keeps between forward and backward are its
inputs (video tokens N×S×D and text tokens N×L×D). Activation offload moves those to CPU:

* on CUDA: copied into pinned host memory on a side stream right after the forward consumed them,
  so the copy overlaps the next blocks' compute; in backward, when block *i* is recomputed, the
  inputs of block *i−1* (the next one backward reaches) are copied back on the side stream, so
  the host-to-device copy overlaps block *i*'s recompute and backward;
* on CPU: the same code path runs as a plain copy, which keeps it tested.

The inputs travel to the recomputation through a :class:`_Stash` object instead of as arguments of
``checkpoint``, because non-reentrant checkpoint holds its arguments until backward: holding the
stash instead lets the device copy be freed after forward.
"""

from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpointed_block_indices(num_blocks: int, mode: str, ratio: float = 0.5) -> list[int]:
    """Which blocks are checkpointed: none, all (full) or ``round(ratio·n)`` spread evenly (selective)."""
    if mode == "none":
        return []
    if mode == "full":
        return list(range(num_blocks))
    if mode != "selective":
        raise ValueError(f"activation checkpointing mode {mode!r}: choose none, full or selective")
    m = round(ratio * num_blocks)
    if m <= 0:
        return []
    return sorted({min(num_blocks - 1, int((k + 0.5) * num_blocks / m)) for k in range(m)})


class ActivationOffloader:
    """Moves checkpointed block inputs to host memory in forward and back, one block ahead, in backward."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda" and torch.cuda.is_available()
        self.stream = torch.cuda.Stream() if self.cuda else None
        self._order: list = []  # weakrefs to live stashes, in forward order
        self.bytes_offloaded = 0  # of the current step (for logging / benchmarks)

    def stash(self, tensors: tuple[torch.Tensor, ...]) -> "_Stash":
        self._order = [r for r in self._order if r() is not None]
        if not self._order:
            self.bytes_offloaded = 0
        s = _Stash(self, tensors)
        self._order.append(weakref.ref(s))
        self.bytes_offloaded += sum(t.numel() * t.element_size() for t in tensors)
        return s

    def prefetch_before(self, s: "_Stash") -> None:
        """Start bringing back the stash that backward reaches after ``s``."""
        live = [r() for r in self._order]
        if s in live:
            i = live.index(s)
            if i > 0 and live[i - 1] is not None:
                live[i - 1].prefetch()


class _Stash:
    def __init__(self, offloader: ActivationOffloader, tensors: tuple[torch.Tensor, ...]):
        self.offloader = offloader
        self.device_tensors: Optional[tuple] = tensors
        self.requires_grad = [t.requires_grad for t in tensors]
        self.device = tensors[0].device
        self.fetched = None
        self.event = None
        if offloader.cuda:
            stream = offloader.stream
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.host = []
                for t in tensors:
                    h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    h.copy_(t.detach(), non_blocking=True)
                    t.record_stream(stream)
                    self.host.append(h)
        else:
            self.host = [t.detach().clone() for t in tensors]

    def release_device(self) -> None:
        self.device_tensors = None

    def prefetch(self) -> None:
        if self.fetched is not None:
            return
        if self.offloader.cuda:
            stream = self.offloader.stream
            with torch.cuda.stream(stream):
                self.fetched = [h.to(self.device, non_blocking=True) for h in self.host]
                self.event = stream.record_event()
        else:
            self.fetched = [h.clone() for h in self.host]

    def get(self) -> tuple[torch.Tensor, ...]:
        if self.device_tensors is not None:  # the forward itself
            return self.device_tensors
        # recomputation in backward
        self.offloader.prefetch_before(self)
        self.prefetch()
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)
            for t in self.fetched:
                t.record_stream(torch.cuda.current_stream())
        out = tuple(t.detach().requires_grad_(rg) for t, rg in zip(self.fetched, self.requires_grad))
        self.fetched, self.event = None, None
        return out


def _checkpointed_forward(run: Callable, offloader: Optional[ActivationOffloader]):
    """A MultimodalDiffusionBlock forward that recomputes ``run`` in backward."""

    def forward(x, ctx, temb, num_frames, rope, text_mask=None):
        if not torch.is_grad_enabled():
            return run(x, ctx, temb, num_frames, rope, text_mask)
        if offloader is None:
            return checkpoint(run, x, ctx, temb, num_frames, rope, text_mask, use_reentrant=False)
        stash = offloader.stash((x, ctx))

        def from_stash(stash, temb, rope, text_mask):
            x, ctx = stash.get()
            return run(x, ctx, temb, num_frames, rope, text_mask)

        out = checkpoint(from_stash, stash, temb, rope, text_mask, use_reentrant=False)
        stash.release_device()
        return out

    return forward


def apply_block_wrappers(model: nn.Module, *, ac_mode: str = "none", ac_ratio: float = 0.5,
                         offload: bool = False, compile_blocks: bool = False,
                         device_type: str = "cpu") -> dict:
    """Activation checkpointing, activation offload and per-block ``torch.compile`` on each block.

    Compile wraps the block body; the checkpoint/offload wrapper stays eager around it (stream
    waits and host copies are not traced). Returns a summary (which blocks, the offloader).
    """
    blocks = list(model.transformer_blocks)
    chosen = set(checkpointed_block_indices(len(blocks), ac_mode, ac_ratio))
    offloader = ActivationOffloader(device_type) if offload and chosen else None
    for i, block in enumerate(blocks):
        run = block.forward
        if compile_blocks:
            run = torch.compile(run)
        if i in chosen:
            block.forward = _checkpointed_forward(run, offloader)
        elif compile_blocks:
            block.forward = run
    return {"checkpointed": sorted(chosen), "offloader": offloader}
