"""`vchitect launch --nproc N COMMAND …`: N local ranks of a vchitect command, without torchrun.

Each rank is `python -m vchitect.cli COMMAND …` with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (the env:// rendezvous torch.distributed expects). SIGTERM,
SIGUSR1 and SIGINT sent to the launcher are forwarded to every rank, so a preempted run
checkpoints and exits cleanly. If one rank fails, the others are stopped.

Exit code: 0 when every rank succeeded; the trainer's preemption code (75) when the ranks
stopped for a signal; otherwise the first failing rank's code.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, argv: list[str], threads_per_rank: int | None = None, grace_s: float = 60.0) -> int:
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: need at least one process")
    port = free_port()
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                   LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, "-m", "vchitect.cli", *argv], env=env))

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        codes: dict[int, int] = {}
        failed_at = None
        first_failure = None  # the code of the rank that failed first: the cause, not the clean-up
        while len(codes) < nproc:
            for rank, p in enumerate(procs):
                if rank not in codes and p.poll() is not None:
                    codes[rank] = p.returncode
                    if p.returncode not in (0, 75) and failed_at is None:
                        failed_at = time.time()
                        first_failure = p.returncode
                        print(f"[launch] rank {rank} exited with {p.returncode}; stopping the other ranks",
                              file=sys.stderr)
                        for q in procs:
                            if q.poll() is None:
                                q.terminate()
            if failed_at is not None and time.time() - failed_at > grace_s:
                for q in procs:
                    if q.poll() is None:
                        q.kill()
            time.sleep(0.1)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if first_failure is not None:
        return first_failure if first_failure > 0 else 128 - first_failure  # -9 (killed) → 137
    return 75 if any(c == 75 for c in codes.values()) else 0
