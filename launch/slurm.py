"""`vchitect submit (train|curate) CONFIG …`: render a Slurm batch script and `sbatch` it.

The templates are ``slurm/train.sbatch`` and ``slurm/curate.sbatch`` (package data in a wheel:
:func:`vchitect.resources.resource_dir`); ``{{NAME}}`` placeholders
are filled here (every value shell-quoted), so the rendered script is a plain bash file that can
be read, kept and resubmitted by hand. ``--dry-run`` prints it instead of submitting.

The rendered script calls back into this module for the things bash cannot do well
(``python -m launch.slurm …``, no torch import, fast):

    node-addr NODE          the address Slurm reaches NODE at (NodeAddr), for rendezvous / Ray head
    free-port               a free TCP port on this host
    latest-checkpoint DIR   newest complete checkpoint under DIR/checkpoints (or nothing)
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

EXIT_PREEMPTED = 75  # == vchitect.train.signals.EXIT_PREEMPTED (not imported: that pulls in torch)
PLACEHOLDER = re.compile(r"\{\{([A-Z_]+)\}\}")


# ----------------------------------------------------------------------------- rendering


def render_template(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{NAME}}``; a placeholder without a value is an error, not a silent blank."""
    missing = sorted(set(PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise KeyError(f"template placeholders without a value: {missing}")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def cpus_per_node(args, ranks: int, loader_workers: Optional[int]) -> int:
    """``--cpus-per-node``, or for a train job without it one CPU per process the node runs: each of
    its ``ranks`` and their ``loader_workers`` data-loader workers (said on stderr). Without it
    Slurm gives the node's one task a single CPU, which torchrun and every rank would share
    (docs/slurm.md); a curation job has no such rule (Ray takes what the task has), so it is refused."""
    if args.cpus_per_node is not None:
        if args.cpus_per_node < ranks:
            raise ValueError(f"--cpus-per-node {args.cpus_per_node} is fewer than the {ranks} ranks each node runs; "
                             f"give at least one CPU per rank (all of a node's cores for a full-node job)")
        return args.cpus_per_node
    if loader_workers is None:
        raise ValueError("--cpus-per-node is required for curate jobs: it is what Ray may use on each node "
                         "(without it Slurm gives the node's task one CPU); give e.g. all of a node's cores")
    cpus = ranks * (1 + loader_workers)
    print(f"vchitect submit: no --cpus-per-node: asking for {cpus} CPUs per node, one per process "
          f"({ranks} rank{'s' if ranks > 1 else ''} × (1 + data.num_workers={loader_workers})); give "
          f"--cpus-per-node for more (all of a node's cores for a full-node job)", file=sys.stderr)
    return cpus


def sbatch_lines(args, *, job_name: str, log_dir: Path, gpus: int, cpus: int) -> list[str]:
    """The #SBATCH header: one task per node, requeue on preemption, logs appended per job."""
    lines = [f"--job-name={job_name}", f"--nodes={args.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={cpus}"]
    if gpus:
        lines.append(f"--gpus-per-node={gpus}")
    for flag, value in (("partition", args.partition), ("time", args.time), ("account", args.account),
                        ("qos", args.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [f"--output={log_dir}/%x-%j.out", "--open-mode=append", "--requeue"]
    if args.kind == "train" and args.signal_seconds:
        lines.append(f"--signal=B:USR1@{args.signal_seconds}")
    for extra in args.sbatch_arg or []:
        extra = extra.strip()
        lines.append(extra if extra.startswith("-") else f"--{extra}")
    for line in lines:
        if "\n" in line or any(c.isspace() for c in line.split("=", 1)[0]):
            raise ValueError(f"#SBATCH {line!r}: one option per line, e.g. --sbatch-arg=--exclusive")
    return [f"#SBATCH {line}" for line in lines]


def _venv_bin() -> str:
    # Not resolved: a venv's python is a symlink to the base interpreter, and only the venv's own
    # bin/ folder carries its packages and console scripts (torchrun, ray, vchitect-curate).
    return str(Path(sys.executable).absolute().parent)


def _abs(path: str) -> str:
    return path if "://" in path else str(Path(path).absolute())


def render(args) -> tuple[str, Path, str]:
    """The batch script for ``args`` (the `vchitect submit` namespace), its log folder and the
    output folder of the run."""
    if args.nodes < 1:
        raise ValueError(f"--nodes {args.nodes}: need at least one node")
    if args.gpus_per_node < 0:
        raise ValueError(f"--gpus-per-node {args.gpus_per_node}: must be 0 (CPU job) or more")
    config = _abs(args.config)
    if not os.path.exists(config):
        raise FileNotFoundError(f"{args.config}: no such config file")
    overrides = list(args.overrides or [])
    if args.kind == "train":
        from vchitect.config import load_config

        cfg = load_config(config, overrides)  # fail at submit time, not after hours in the queue
        output_dir = _abs(cfg.train.output_dir)
        cpu_job = args.gpus_per_node == 0 or cfg.train.device == "cpu"
        default_logs = Path(output_dir) / "slurm"
        loader_workers = cfg.data.num_workers
    else:
        from data_pipeline.config import load_curate_config

        cfg = load_curate_config(config, overrides)
        output_dir = cfg.output.path if "://" in cfg.output.path else _abs(cfg.output.path)
        cpu_job = args.gpus_per_node == 0
        default_logs = Path.cwd() / "slurm-logs"  # not inside the shard folder
        loader_workers = None
    log_dir = Path(_abs(args.log_dir)) if args.log_dir else default_logs
    job_name = args.job_name or f"vchitect-{args.kind}"
    gpus = 0 if cpu_job else args.gpus_per_node
    ranks = max(1, args.gpus_per_node) if args.kind == "train" else 1
    cpus = cpus_per_node(args, ranks, loader_workers)
    values = {
        "SBATCH": "\n".join(sbatch_lines(args, job_name=job_name, log_dir=log_dir, gpus=gpus, cpus=cpus)),
        "SUBMIT_CMD": " ".join(shlex.quote(a) for a in ["vchitect", "submit", *(a for a in sys.argv[2:] if a != "--dry-run")])
        if Path(sys.argv[0]).name in ("vchitect", "cli.py") else "vchitect submit …",
        "WORKDIR": shlex.quote(str(Path.cwd())),
        "VENV_BIN": shlex.quote(_venv_bin()),
        "CONFIG": shlex.quote(config),
        "OVERRIDES": " ".join(shlex.quote(o) for o in overrides),
        "LOG_DIR": shlex.quote(str(log_dir)),
        "OUTPUT_DIR": shlex.quote(output_dir),
        "NPROC_PER_NODE": str(max(1, args.gpus_per_node)),
        "GPU_JOB": "0" if cpu_job else "1",
        "EXIT_PREEMPTED": str(EXIT_PREEMPTED),
    }
    from vchitect.resources import resource_dir

    template = (resource_dir("slurm") / f"{args.kind}.sbatch").read_text()
    return render_template(template, values), log_dir, output_dir


def submit(args) -> int:
    """Render; print it (``--dry-run``) or write it next to the logs and sbatch it. Returns an exit code."""
    try:
        script, log_dir, output_dir = render(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vchitect submit: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    log_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the --output folder
    if args.kind == "train":
        latest = latest_checkpoint(output_dir)
        if latest:
            print(f"vchitect submit: the job will resume from {latest} (train.resume=auto)", file=sys.stderr)
    if not _which("sbatch"):
        print("vchitect submit: sbatch not found (run on a Slurm login node, or use --dry-run)", file=sys.stderr)
        return 127
    r = subprocess.run(["sbatch", "--parsable"], input=script, text=True, capture_output=True)
    if r.returncode != 0:
        print(f"vchitect submit: sbatch failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        return r.returncode
    job_id = r.stdout.strip().split(";")[0]
    (log_dir / f"{job_id}.sbatch").write_text(script)  # the exact script, for the record
    print(job_id)
    print(f"vchitect submit: job {job_id}; batch log {log_dir}/<job-name>-{job_id}.out, per-node logs under "
          f"{log_dir}/{job_id}/", file=sys.stderr)
    return 0


def _which(prog: str) -> Optional[str]:
    from shutil import which

    return which(prog)


# ----------------------------------------------------------------------------- helpers for the scripts


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """Newest complete checkpoint under OUTPUT_DIR/checkpoints — the rule of
    vchitect.train.checkpoint.is_complete (a step-… folder with .metadata and vchitect.json), kept
    torch-free so the batch script can log it in a fraction of a second."""
    root = Path(output_dir) / "checkpoints"
    if "://" in output_dir or not root.is_dir():
        return None
    done = sorted(p.name for p in root.glob("step-*")
                  if p.is_dir() and not p.name.endswith(".tmp") and (p / ".metadata").is_file()
                  and (p / "vchitect.json").is_file())
    return str(root / done[-1]) if done else None


def node_addr(node: str) -> str:
    """The address Slurm itself uses for NODE (its NodeAddr), falling back to DNS.

    NodeAddr is what slurmctld reaches the node at, so it is routable inside the cluster even where
    node names do not resolve (cloud clusters, or the test cluster whose nodes are all 127.0.0.1)."""
    try:
        out = subprocess.run(["scontrol", "-o", "show", "node", node], capture_output=True, text=True,
                             timeout=30).stdout
        m = re.search(r"\bNodeAddr=(\S+)", out)
        if m and m.group(1) not in ("(null)", ""):
            addr = m.group(1)
            return socket.gethostbyname(addr)
    except (OSError, subprocess.SubprocessError):
        pass
    return socket.gethostbyname(node)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m launch.slurm", description="helpers for the sbatch templates")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("node-addr", help="address of a Slurm node (NodeAddr, else DNS)")
    a.add_argument("node")
    sub.add_parser("free-port", help="a free TCP port on this host")
    c = sub.add_parser("latest-checkpoint", help="newest complete checkpoint of a run's output_dir")
    c.add_argument("output_dir")
    args = ap.parse_args(argv)
    if args.cmd == "node-addr":
        print(node_addr(args.node))
    elif args.cmd == "free-port":
        print(free_port())
    else:
        print(latest_checkpoint(args.output_dir) or "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
