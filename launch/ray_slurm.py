"""Ray on Slurm: the helper `slurm/curate.sbatch` uses while it brings a Ray cluster up.

    python -m launch.ray_slurm wait --address HEAD:PORT --nodes N [--timeout S]

waits until the Ray cluster at HEAD:PORT has N alive nodes (exit 0), or fails after S seconds
(exit 1) with the count it saw. The head and workers themselves are plain `ray start --block`
processes run by `srun` in the template.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time


def alive_nodes(address: str) -> int:
    import ray

    ray.init(address=address, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        return sum(1 for n in ray.nodes() if n.get("Alive"))
    finally:
        ray.shutdown()


def wait_for_nodes(address: str, nodes: int, timeout: float) -> int:
    deadline = time.time() + timeout
    seen, error = 0, None
    while time.time() < deadline:
        try:
            seen = alive_nodes(address)
            if seen >= nodes:
                return seen
        except Exception as exc:  # head not listening yet: ray.init raises ConnectionError and friends
            error = exc
        time.sleep(2)
    raise TimeoutError(f"Ray at {address}: {seen} of {nodes} nodes alive after {timeout:.0f}s"
                       + (f" (last error: {error})" if error and not seen else ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.ray_slurm", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wait", help="wait until the Ray cluster has N alive nodes")
    w.add_argument("--address", required=True, help="HEAD_ADDR:PORT of the Ray head (GCS)")
    w.add_argument("--nodes", type=int, required=True)
    w.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args(argv)
    try:
        n = wait_for_nodes(args.address, args.nodes, args.timeout)
    except TimeoutError as exc:
        print(f"launch.ray_slurm: {exc}", file=sys.stderr)
        return 1
    print(f"Ray at {args.address}: {n} nodes alive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
