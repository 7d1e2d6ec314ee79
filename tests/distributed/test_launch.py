"""`vchitect launch` as a process tree: ranks (and their DataLoader workers) do not outlive a
launcher that is killed with SIGKILL."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.helpers_run import ENV, write_config
from tests.helpers_data import npy, write_shard
from vchitect.train.checkpoint import find_latest


def children() -> dict[int, list[int]]:
    """ppid → pids of the live (not zombie) processes, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[0] != "Z":
                tree.setdefault(stat[1], []).append(int(entry))
    return tree


def _stat(pid: int):
    """(state, ppid) of a process, or None when it has gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]  # the command name may hold spaces and ')'
    return state, int(ppid)


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has stopped; whoever reaps it is not our business


def precomputed_shards(root: Path, shards: int = 2, per_shard: int = 8) -> Path:
    """Latent shards for the tiny model (C 4, 3 × 8 × 8 latents, text 6 × 32, pooled 16)."""
    rng = np.random.default_rng(0)
    for s in range(shards):
        write_shard(str(root / f"train-{s:06d}.tar"), [{
            "__key__": f"s{s}_{i:04d}", "txt": b"a caption",
            "latent.npy": npy(rng.standard_normal((4, 3, 8, 8)).astype(np.float16)),
            "text.npy": npy(rng.standard_normal((6, 32)).astype(np.float16)),
            "text_mask.npy": npy(np.arange(6) < 4),
            "pooled.npy": npy(rng.standard_normal(16).astype(np.float16))} for i in range(per_shard)])
    return root


def shard_data(uri, **kw) -> dict:
    """The ``data:`` section that reads :func:`precomputed_shards` (or whatever ``uri`` names)."""
    return {"source": "shards", "sources": [{"uri": str(uri)}], "mode": "precomputed", "latent_channels": 4,
            "text": {"max_length": 6, "dim": 32, "pooled_dim": 16}, **kw}


def test_sigkill_of_the_launcher_stops_every_rank_and_dataloader_worker(tmp_path):
    """Shard data with one forked DataLoader worker per rank, so the tree is launcher → 2 ranks →
    1 worker each. After `kill -9` of the launcher the ranks get SIGTERM (parent-death signal and
    watchdog), checkpoint like a preempted run and exit; the workers follow their rank."""
    run = tmp_path / "run"
    data = precomputed_shards(tmp_path / "shards")
    cfg = write_config(tmp_path, data=shard_data(data, num_workers=1),
                       train={"output_dir": str(run), "steps": 100000, "checkpoint_every": 0})
    with open(tmp_path / "launch.log", "w") as log:  # a file, not a pipe: nobody has to keep reading it
        launcher = subprocess.Popen([sys.executable, "-m", "vchitect.cli", "launch", "--nproc", "2", "train", str(cfg)],
                                    env=ENV, stdout=log, stderr=subprocess.STDOUT)
    ranks: list[int] = []
    workers: list[int] = []
    try:
        deadline = time.time() + 240
        while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert launcher.poll() is None and time.time() < deadline, (tmp_path / "launch.log").read_text()[-3000:]
            time.sleep(0.1)
        tree = children()
        ranks = tree.get(launcher.pid, [])
        workers = [w for r in ranks for w in tree.get(r, [])]
        assert len(ranks) == 2 and len(workers) >= 2, (ranks, workers)  # both ranks train, each with a worker
        environ = Path(f"/proc/{ranks[0]}/environ").read_bytes().split(b"\0")
        errors = Path(next(v for v in environ if v.startswith(b"VCHITECT_LAUNCH_ERRORS=")).split(b"=", 1)[1].decode())
        assert errors.is_dir()  # the launcher's folder for the ranks' one-line errors

        launcher.send_signal(signal.SIGKILL)
        launcher.wait(timeout=10)
        deadline = time.time() + 30  # in practice a few seconds: one step, one checkpoint, the workers' 5 s poll
        while any(alive(p) for p in ranks + workers) and time.time() < deadline:
            time.sleep(0.1)
        left = [p for p in ranks + workers if alive(p)]
        assert not left, f"alive after the launcher died: {left}\n" + (tmp_path / "launch.log").read_text()[-3000:]
        assert find_latest(run / "checkpoints") is not None  # they stopped like a preempted run: saved, then left
        assert not errors.exists()  # the launcher cannot remove it any more; the ranks did
    finally:  # whatever happened, leave no process of this test behind
        for pid in [launcher.pid] + ranks + workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        launcher.wait(timeout=10)


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    """The watchdog alone: a process that ignores SIGTERM (so the parent-death signal does nothing)
    still goes, by SIGKILL, ``grace_s`` after its launcher died. No torch, about a second."""
    ready = tmp_path / "ready"
    rank = (f"import os, signal, sys, time; sys.path.insert(0, {os.getcwd()!r}); "
            f"from launch.local import watch_launcher; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"assert watch_launcher(grace_s=0.5, poll_s=0.05); "
            f"assert 'VCHITECT_LAUNCHER_PID' not in os.environ; open({str(ready)!r}, 'w').close(); time.sleep(600)")
    parent = (f"import os, subprocess, sys, time; "
              f"p = subprocess.Popen([sys.executable, '-c', {rank!r}], "
              f"env=dict(os.environ, VCHITECT_LAUNCHER_PID=str(os.getpid()))); print(p.pid, flush=True); "
              f"time.sleep(600)")
    launcher = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    try:
        child = int(launcher.stdout.readline())
        deadline = time.time() + 30
        while not ready.exists():
            assert time.time() < deadline and alive(child)
            time.sleep(0.02)
        time.sleep(0.3)
        assert alive(child)  # the watchdog leaves a rank alone while its launcher lives
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.time() + 10
        while alive(child) and time.time() < deadline:
            time.sleep(0.05)
        assert not alive(child)
    finally:
        if launcher.poll() is None:
            launcher.kill()


def test_run_local_ranks_get_the_launchers_rendezvous_environment():
    """`run_local` (tests, benchmarks) and `vchitect launch` start their ranks through one function,
    :func:`launch.local.start_ranks`: each rank sees RANK/LOCAL_RANK, the world size and one shared
    loopback port. No torch, well under a second."""
    from vchitect.parallel.spawn import run_local

    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS")
    show = f"import os; print(' '.join(os.environ[k] for k in {keys!r}))"
    seen = [r.stdout.split() for r in run_local(["-c", show], nproc=2, timeout=60, threads=3)]
    assert [s[:5] for s in seen] == [["0", "0", "2", "2", "127.0.0.1"], ["1", "1", "2", "2", "127.0.0.1"]]
    assert seen[0][5] == seen[1][5] and int(seen[0][5]) > 0  # one rendezvous port
    assert seen[0][6] == seen[1][6] == "3"  # run_local sets the threads, whatever the caller's environment says
