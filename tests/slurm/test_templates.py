"""`vchitect submit --dry-run`: the rendered batch scripts are complete, shellcheck-clean bash, and
the launch.slurm helpers the scripts call work. No Slurm cluster needed."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch import slurm

REPO = Path(__file__).resolve().parents[2]


def submit_args(kind: str, config: str, *overrides: str, **kw) -> argparse.Namespace:
    base = dict(kind=kind, config=config, overrides=list(overrides), nodes=2, gpus_per_node=0, cpus_per_node=None,
                partition=None, time=None, account=None, qos=None, job_name=None, signal_seconds=300, log_dir=None,
                sbatch_arg=[], dry_run=True)
    base.update(kw)
    return argparse.Namespace(**base)


def dry_run(*argv: str) -> str:
    r = subprocess.run([sys.executable, "-m", "vchitect.cli", "submit", *argv, "--dry-run"], capture_output=True,
                       text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> dict[str, str]:
    tmp = tmp_path_factory.mktemp("render")
    cpu_cfg = tmp / "cpu.yaml"
    cpu_cfg.write_text(yaml.safe_dump({"include": str(REPO / "configs/train/demo.yaml"),
                                       "train": {"output_dir": str(tmp / "run with space")}}))
    return {
        "train-4x8-gpu": dry_run("train", "configs/train/demo.yaml", "train.steps=100", "parallel.dp_shard=-1",
                                 "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-node", "64", "--partition", "h800",
                                 "--time", "48:00:00", "--account", "proj", "--qos", "high", "--job-name", "dit-2b",
                                 "--signal-seconds", "600", "--sbatch-arg=--exclusive", "--sbatch-arg", "mem=0"),
        # in-process (one CLI round trip above is enough)
        "train-cpu": slurm.render(submit_args("train", str(cpu_cfg), "train.lr=0.0003"))[0],
        "curate": slurm.render(submit_args("curate", str(REPO / "configs/curate/synthetic.yaml"),
                                           "input.path=/data/raw/manifest.jsonl", "output.path=s3://bucket/shards",
                                           nodes=3, cpus_per_node=32))[0],
    }


@pytest.mark.parametrize("name", ["train-4x8-gpu", "train-cpu", "curate"])
def test_rendered_script_passes_shellcheck(scripts, name, shellcheck, tmp_path):
    path = tmp_path / f"{name}.sbatch"
    path.write_text(scripts[name])
    r = subprocess.run([shellcheck, "--shell=bash", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_gpu_train_script_header_and_launch(scripts):
    s = scripts["train-4x8-gpu"]
    assert "{{" not in s and s.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --partition=h800", "#SBATCH --time=48:00:00",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --job-name=dit-2b", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@600", "#SBATCH --exclusive",
                 "#SBATCH --mem=0"):
        assert line in s.splitlines(), line
    assert "NPROC_PER_NODE=8" in s and "GPU_JOB=1" in s
    assert "OVERRIDES=(train.steps=100 parallel.dp_shard=-1)" in s
    assert f"VENV_BIN={Path(sys.executable).absolute().parent}" in s
    assert "--rdzv-backend=c10d" in s and "NCCL_IB_DISABLE" in s and "scontrol requeue" in s
    # all #SBATCH lines come before the first command, or sbatch ignores them
    lines = s.splitlines()
    last_sbatch = max(i for i, ln in enumerate(lines) if ln.startswith("#SBATCH"))
    first_cmd = min(i for i, ln in enumerate(lines) if ln and not ln.startswith("#"))
    assert last_sbatch < first_cmd


def test_cpu_train_script_quotes_paths_and_requests_no_gpus(scripts):
    s = scripts["train-cpu"]
    assert "--gpus-per-node" not in s.split("set -uo pipefail")[0]
    assert "GPU_JOB=0" in s and "NPROC_PER_NODE=1" in s
    assert "OUTPUT_DIR='" in s and "run with space'" in s  # shell-quoted


def test_curate_script_runs_ray_head_workers_and_cleans_up(scripts):
    s = scripts["curate"]
    assert "#SBATCH --nodes=3" in s and "--signal" not in s.split("set -uo")[0]
    assert "ray start --head --block" in s and "ray start --block --address" in s
    assert "trap cleanup EXIT" in s and '--address "$HEAD_ADDR:$RAY_PORT"' in s
    assert "output.path=s3://bucket/shards" in s


def test_render_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such config"):
        slurm.render(submit_args("train", str(tmp_path / "missing.yaml")))
    with pytest.raises(ValueError, match="--nodes 0"):
        slurm.render(submit_args("train", "configs/train/demo.yaml", nodes=0))
    with pytest.raises(KeyError, match="NOPE"):
        slurm.render_template("a {{NOPE}} b", {})


def test_submit_without_sbatch_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(slurm, "_which", lambda prog: None)
    args = submit_args("train", "configs/train/demo.yaml", f"train.output_dir={tmp_path}/run", dry_run=False)
    assert slurm.submit(args) == 127
    assert "sbatch not found" in capsys.readouterr().err


def test_latest_checkpoint_only_counts_complete_ones(tmp_path):
    ck = tmp_path / "checkpoints"
    assert slurm.latest_checkpoint(str(tmp_path)) is None
    for name, complete in (("step-000000002", True), ("step-000000004", True), ("step-000000006.tmp", True),
                           ("step-000000008", False)):
        (ck / name).mkdir(parents=True)
        if complete:
            (ck / name / ".metadata").write_bytes(b"")
            (ck / name / "vchitect.json").write_text("{}")
    assert slurm.latest_checkpoint(str(tmp_path)) == str(ck / "step-000000004")


def test_helpers_cli():
    r = subprocess.run([sys.executable, "-m", "launch.slurm", "free-port"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and 0 < int(r.stdout) < 65536
    r = subprocess.run([sys.executable, "-m", "launch.slurm", "node-addr", "localhost"], capture_output=True,
                       text=True, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() in ("127.0.0.1", "::1")


def test_submit_pipes_the_script_to_sbatch_and_reports_the_resume_point(monkeypatch, tmp_path, capsys):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\ncat > {tmp_path}/submitted.sh\necho '4242;cluster'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{__import__('os').environ['PATH']}")
    step = tmp_path / "run" / "checkpoints" / "step-000000010"
    step.mkdir(parents=True)
    (step / ".metadata").write_bytes(b"")
    (step / "vchitect.json").write_text("{}")
    args = submit_args("train", str(REPO / "configs/train/demo.yaml"), f"train.output_dir={tmp_path}/run",
                       dry_run=False)
    assert slurm.submit(args) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[0] == "4242"
    assert f"resume from {step}" in err
    submitted = (tmp_path / "submitted.sh").read_text()
    assert submitted == (tmp_path / "run" / "slurm" / "4242.sbatch").read_text()
    assert f"#SBATCH --output={tmp_path}/run/slurm/%x-%j.out" in submitted


def test_cpus_per_node_is_never_left_to_slurms_one_cpu(capsys):
    """`--nodes 4 --gpus-per-node 8` without `--cpus-per-node` used to render no --cpus-per-task at all,
    i.e. one CPU for torchrun and all 8 ranks of a node (docs/slurm.md)."""
    script = slurm.render(submit_args("train", "configs/train/demo.yaml", "data.num_workers=3", nodes=4,
                                      gpus_per_node=8))[0]
    assert "#SBATCH --cpus-per-task=32" in script.splitlines()  # 8 ranks × (1 rank + 3 loader workers)
    assert "asking for 32 CPUs per node" in capsys.readouterr().err
    given = slurm.render(submit_args("train", "configs/train/demo.yaml", nodes=4, gpus_per_node=8, cpus_per_node=96))[0]
    assert "#SBATCH --cpus-per-task=96" in given.splitlines() and capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="--cpus-per-node 4 is fewer than the 8 ranks"):
        slurm.render(submit_args("train", "configs/train/demo.yaml", nodes=4, gpus_per_node=8, cpus_per_node=4))
    with pytest.raises(ValueError, match="--cpus-per-node is required for curate jobs"):
        slurm.render(submit_args("curate", "configs/curate/synthetic.yaml", "input.path=/raw", "output.path=/out"))
