"""Preemption: SIGTERM and SIGUSR1 ask the run to stop after the current step.

The handler only sets a flag. At the end of each step the ranks agree (an all-reduce of the flag,
so a signal that reached one rank stops all of them at the same step), save a checkpoint and exit
with :data:`EXIT_PREEMPTED`. Slurm templates requeue on that code; a resumed run continues from
the checkpoint exactly.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h): "temporary failure, try again"


class PreemptionFlag:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device) -> bool:
        """True on every rank when any rank received a signal."""
        flag = torch.tensor([1 if self.received is not None else 0], device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
