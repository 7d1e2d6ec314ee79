"""Start-up cost of the light CLI commands: wall time and `-X importtime` total, median of N runs.

    python benchmarks/cli_startup.py [--repeats 5]

Each command runs as `python -X importtime -m MODULE ARGS` in a fresh process, once with the
environment as it is and once each with and without PYTHONDONTWRITEBYTECODE=1 (set: nothing is
cached, every project module is compiled from source in every process; unset: the second and
later runs read __pycache__). The import total is the sum of the top-level cumulative times that
`-X importtime` prints (what the interpreter spends importing, start-up included); wall is the
whole process. Also lists which of torch, diffusers, ray, transformers, rich, numpy were imported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    ("vchitect --help", ["vchitect.cli", "--help"]),
    ("vchitect config show configs/model/tiny.yaml", ["vchitect.cli", "config", "show", "configs/model/tiny.yaml"]),
    ("vchitect-curate --help", ["data_pipeline.cli", "--help"]),
    ("vchitect-curate config show configs/curate/default.yaml",
     ["data_pipeline.cli", "config", "show", "configs/curate/default.yaml"]),
]
WATCHED = ("torch", "diffusers", "ray", "transformers", "rich", "numpy")


def measure(argv: list[str], env: dict) -> tuple[float, float, set[str], int]:
    """(wall s, import total s, watched top-level packages imported, exit code) of one run."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - start
    total_us, seen = 0, set()
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|", 2)
        if not cumulative.strip().isdigit():  # the header line
            continue
        if not name.startswith("  "):  # a top-level import: its cumulative time includes its children
            total_us += int(cumulative)
        top = name.strip().split(".")[0]
        if top in WATCHED:
            seen.add(top)
    return wall, total_us / 1e6, seen, r.returncode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    base = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    print("| command | PYTHONDONTWRITEBYTECODE | wall s (median) | imports s (median) | heavy imports | rc |")
    print("|---|---|---|---|---|---|")
    for label, argv in COMMANDS:
        for dont_write in (True, False):
            env = dict(base)
            if dont_write:
                env["PYTHONDONTWRITEBYTECODE"] = "1"
            else:
                env.pop("PYTHONDONTWRITEBYTECODE", None)
                measure(argv, env)  # writes __pycache__ for the runs that count
            runs = [measure(argv, env) for _ in range(args.repeats)]
            wall = statistics.median(r[0] for r in runs)
            imports = statistics.median(r[1] for r in runs)
            seen = ", ".join(sorted(set().union(*(r[2] for r in runs)))) or "none"
            print(f"| `{label}` | {'1' if dont_write else 'unset'} | {wall:.2f} | {imports:.2f} | {seen} | "
                  f"{runs[-1][3]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
