"""Real Slurm jobs on the two-node test cluster (both nodes are this machine, on 127.0.0.1):
a 2-node training job equals a 2-process local run; USR1 → checkpoint → requeue → resume ends
with the same parameters as an uninterrupted run; curation on a 2-node Ray cluster writes the same
shards as a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers_run import ENV, REPO, VCHITECT, assert_same_tensors, losses
from tests.helpers_run import write_config as write_run_config
from vchitect.train.checkpoint import find_latest, load_tensors

STEPS = 30


def write_config(path: Path, output_dir: Path) -> Path:
    """The tiny CPU run of tests/distributed/test_trainer.py for STEPS steps, one checkpoint at the end."""
    return write_run_config(path.parent, path.name,
                            train={"output_dir": str(output_dir), "steps": STEPS, "checkpoint_every": 0})


def job_env(cluster) -> dict[str, str]:
    # sbatch hands this environment to the job (--export=ALL): SLURM_CONF of the test cluster,
    # one thread per rank on the 2-core machine.
    return dict(cluster.env, **{k: ENV[k] for k in ("OMP_NUM_THREADS", "PYTHONUNBUFFERED")})


def submit(cluster, *argv: str) -> int:
    r = subprocess.run([*VCHITECT, "submit", *argv], env=job_env(cluster), capture_output=True, text=True,
                       cwd=REPO, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(r.stdout.split()[0])


def job_logs(log_dir: Path) -> str:
    out = []
    for f in sorted(log_dir.rglob("*.out")):
        out.append(f"--- {f.relative_to(log_dir)}\n{f.read_text(errors='replace')[-4000:]}")
    return "\n".join(out)


def node_logs(restart_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(restart_dir.glob("node-*.out")))


def wait_done(cluster, job_id: int, log_dir: Path, timeout: float = 300) -> dict:
    try:
        return cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{job_logs(log_dir)}") from None


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-process local run (`vchitect launch --nproc 2 train …`). It is started
    in the background and ``reference()`` waits for it, so it overlaps with the first Slurm job."""
    tmp = tmp_path_factory.mktemp("local")
    cfg = write_config(tmp / "run.yaml", tmp / "run")
    log = open(tmp / "launch.log", "w")
    proc = subprocess.Popen([*VCHITECT, "launch", "--nproc", "2", "train", str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=REPO)

    def wait() -> Path:
        rc = proc.wait(timeout=400)
        assert rc == 0, (tmp / "launch.log").read_text()[-4000:]
        return tmp / "run"

    yield wait
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    log.close()


def assert_same_model(a: Path, b: Path) -> None:
    assert_same_tensors(load_tensors(a), load_tensors(b))


def test_two_node_training_job_equals_a_local_two_process_run(slurm_cluster, reference, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run)
    job = submit(slurm_cluster, "train", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--time", "10:00")
    ref = reference()  # the local run, meanwhile
    info = wait_done(slurm_cluster, job, run / "slurm")
    logs = job_logs(run / "slurm")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["NodeList"] == "node[1-2]"
    assert (run / "slurm" / f"{job}.sbatch").is_file()  # the exact script, kept with the logs
    names = sorted(p.name for p in (run / "slurm" / str(job) / "restart-0").glob("node-*.out"))
    assert names == ["node-0.out", "node-1.out"], logs
    assert "training finished" in (run / "slurm" / f"vchitect-train-{job}.out").read_text()
    assert losses(run) == losses(ref)  # bitwise: floats compare exactly
    assert_same_model(run / "checkpoints" / f"step-{STEPS:09d}", ref / "checkpoints" / f"step-{STEPS:09d}")


def test_usr1_checkpoints_requeues_and_resumes_to_the_same_result(slurm_cluster, reference, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "run.yaml", run)
    job = submit(slurm_cluster, "train", str(cfg), "--nodes", "2", "--gpus-per-node", "0", "--time", "10:00",
                 "--job-name", "preempt-me")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.read_text().strip()):
        assert time.time() < deadline, job_logs(run / "slurm")
        assert slurm_cluster.job(job).get("JobState") in ("PENDING", "RUNNING"), job_logs(run / "slurm")
        time.sleep(0.05)
    # What `#SBATCH --signal=B:USR1@N` does near the time limit: USR1 to the batch shell only.
    slurm_cluster.run("scancel", "--batch", "--signal=USR1", str(job))
    # The requeued job waits out the cluster's short requeue delay (cred_expire=5 s in the test
    # slurm.conf; 120 s by default), then runs again with SLURM_RESTART_COUNT=1.
    info = wait_done(slurm_cluster, job, run / "slurm", timeout=400)
    ref = reference()
    logs = job_logs(run / "slurm")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", logs
    assert info["Restarts"] == "1", logs

    batch_log = (run / "slurm" / f"preempt-me-{job}.out").read_text()
    assert "SIGUSR1: asking the trainer ranks to checkpoint and exit" in batch_log
    assert "requeueing job" in batch_log and "restart 1]" in batch_log and "training finished" in batch_log
    # c10d numbers the nodes in the order they join, so rank 0 (which logs) may be on either node
    first = node_logs(run / "slurm" / str(job) / "restart-0")
    assert "preemption signal received: saving step" in first, logs
    stopped = int(first.split("preemption signal received: saving step")[1].split()[0])
    assert 1 <= stopped < STEPS, "the signal should stop the run early"
    second = node_logs(run / "slurm" / str(job) / "restart-1")
    assert f"resumed from {run / 'checkpoints' / f'step-{stopped:09d}'}" in second, logs

    assert find_latest(run / "checkpoints").name == f"step-{STEPS:09d}"
    assert losses(run) == losses(ref)
    assert_same_model(run / "checkpoints" / f"step-{STEPS:09d}", ref / "checkpoints" / f"step-{STEPS:09d}")


# ----------------------------------------------------------------------------- curation on Ray


def shard_bytes(out: Path) -> dict[str, bytes]:
    index = json.loads((out / "index.json").read_text())
    return {s["name"]: (out / s["name"]).read_bytes() for s in index["shards"]}


def test_curation_job_on_a_two_node_ray_cluster_writes_the_same_shards(slurm_cluster, tmp_path):
    raw = tmp_path / "raw"
    subprocess.run([sys.executable, "-m", "data_pipeline.cli", "synth", str(raw), "--n", "2", "--no-defects"],
                   check=True, capture_output=True, cwd=REPO, timeout=300)
    config = str(REPO / "configs" / "curate" / "synthetic.yaml")
    out, logs, local = tmp_path / "slurm-out", tmp_path / "logs", tmp_path / "local"
    job = submit(slurm_cluster, "curate", config, f"input.path={raw}/manifest.jsonl", f"output.path={out}",
                 "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-node", "2", "--time", "10:00",
                 "--log-dir", str(logs))
    # the local run (its own one-node Ray), while the job runs
    r = subprocess.run([sys.executable, "-m", "data_pipeline.cli", "run", config, f"input.path={raw}/manifest.jsonl",
                        f"output.path={local}", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"), timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    info = wait_done(slurm_cluster, job, logs, timeout=400)
    text = job_logs(logs)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text
    batch_log = (logs / f"vchitect-curate-{job}.out").read_text()
    assert "Ray cluster up: 2 nodes" in batch_log and "curation finished" in batch_log, text
    assert "stopping Ray" in batch_log
    assert (out / "_SUCCESS").exists()
    got, want = shard_bytes(out), shard_bytes(local)
    assert sorted(got) == sorted(want) and len(want) >= 1
    for name in want:
        assert got[name] == want[name], name  # byte-identical shards
    assert json.loads((out / "index.json").read_text())["shards"] == json.loads((local / "index.json").read_text())["shards"]
    # Ray was stopped: no process of this job's Ray session is left on the "nodes"
    left = subprocess.run(["pgrep", "-f", f"/tmp/ray-{job}/"], capture_output=True, text=True).stdout.split()
    subprocess.run(["rm", "-rf", f"/tmp/ray-{job}"])  # Ray's session folder of the job (node-local on a cluster)
    assert not left, left
