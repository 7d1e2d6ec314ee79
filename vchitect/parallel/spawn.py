"""Run one Python command as ``nproc`` local ranks (gloo/NCCL env:// rendezvous) — for tests and
benchmarks on one machine: the ranks start through :func:`launch.local.start_ranks`, as those of
``vchitect launch`` do; this adds the timeout, the captured output and a raise on failure.
Production launches go through ``launch/`` (torchrun / Slurm)."""

from __future__ import annotations

import subprocess
import time

from launch.local import start_ranks  # the one place that spawns local ranks (also `vchitect launch`)


def run_local(argv: list[str], nproc: int, timeout: float = 600, threads: int = 1,
              capture: bool = True) -> list[subprocess.CompletedProcess]:
    """Start ``python argv…`` ``nproc`` times with RANK/WORLD_SIZE/MASTER_* set; wait for all.

    If one rank fails, the others are stopped (they would wait forever in a collective)."""
    out = subprocess.PIPE if capture else None
    procs = start_ranks(argv, nproc, threads=threads, force_threads=True, stdout=out, stderr=out, text=True)
    deadline = time.time() + timeout
    results: dict[int, subprocess.CompletedProcess] = {}
    try:
        while len(results) < nproc:
            for rank, p in enumerate(procs):
                if rank in results:
                    continue
                if p.poll() is not None:
                    so, se = p.communicate() if capture else ("", "")
                    results[rank] = subprocess.CompletedProcess(p.args, p.returncode, so, se)
                    if p.returncode != 0:
                        raise RuntimeError(f"rank {rank} exited with {p.returncode}:\n{(se or '')[-4000:]}")
            if time.time() > deadline:
                raise TimeoutError(f"{argv} on {nproc} ranks did not finish in {timeout:.0f} s")
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [results[r] for r in range(nproc)]
