"""`vchitect launch --nproc N COMMAND …`: N local ranks of a vchitect command, without torchrun.

Each rank is `python -m vchitect.cli COMMAND …` with RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (the env:// rendezvous torch.distributed expects). SIGTERM,
SIGUSR1 and SIGINT sent to the launcher are forwarded to every rank, so a preempted run
checkpoints and exits cleanly. If one rank fails, the others are stopped.

Ranks die with their launcher: each rank started here finds the launcher's pid in
``VCHITECT_LAUNCHER_PID`` and calls :func:`watch_launcher` at start-up, which asks Linux for a
SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and starts a watchdog thread that polls
``os.getppid()`` (portable; also closes the window before the prctl). A rank whose launcher is gone
gets SIGTERM — it finishes the step, checkpoints and exits as if preempted — and SIGKILL
:data:`ORPHAN_GRACE_S` seconds later if it is still there. Its DataLoader workers watch the rank the
same way (PyTorch's own watchdog), so nothing keeps training after ``kill -9`` of the launcher.
Under torchrun or Slurm the variable is unset and none of this runs.

Exit code: 0 when every rank succeeded; the trainer's preemption code (75) when the ranks
stopped for a signal; 2 when a rank reported a user error (printed once, by the launcher);
otherwise the first failing rank's code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
LAUNCHER_PID_ENV = "VCHITECT_LAUNCHER_PID"  # set for the ranks: the pid they watch
USER_ERRORS_ENV = "VCHITECT_LAUNCH_ERRORS"  # set for the ranks: a folder for their one-line user errors
EXIT_USER_ERROR = 2
ORPHAN_GRACE_S = 10.0  # SIGTERM → SIGKILL of a rank whose launcher died: a quick checkpoint fits, nothing lingers
PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(args: list[str], nproc: int, *, threads: int,
                env: dict[str, str] | None = None, force_threads: bool = False,
                **popen) -> list[subprocess.Popen]:
    """Start ``python args…`` ``nproc`` times, rank r with the env:// rendezvous variables (RANK=r,
    LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT) plus ``env`` set, and
    return the processes (the one place that spawns local ranks: :func:`launch` and the tests' and
    benchmarks' ``vchitect.parallel.spawn.run_local``). ``OMP_NUM_THREADS`` is ``threads`` unless
    the caller's environment sets it (``force_threads``: always ``threads``). ``popen`` goes to
    :class:`subprocess.Popen` (stdout, stderr, text …)."""
    port = free_port()
    procs: list[subprocess.Popen] = []
    for rank in range(nproc):
        rank_vars = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                         LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                         **(env or {}))
        if force_threads:
            rank_vars["OMP_NUM_THREADS"] = str(threads)
        else:
            rank_vars.setdefault("OMP_NUM_THREADS", str(threads))
        procs.append(subprocess.Popen([sys.executable, *args], env=rank_vars, **popen))
    return procs


def launch(nproc: int, argv: list[str], threads_per_rank: int | None = None, grace_s: float = 60.0) -> int:
    if nproc < 1:
        raise ValueError(f"--nproc {nproc}: need at least one process")
    threads = threads_per_rank or max(1, (os.cpu_count() or 1) // nproc)
    errors = Path(tempfile.mkdtemp(prefix="vchitect-launch-"))
    # From this (the main) thread: the ranks' parent-death signal fires when the forking thread exits.
    procs = start_ranks(["-m", "vchitect.cli", *argv], nproc, threads=threads,
                        env={LAUNCHER_PID_ENV: str(os.getpid()), USER_ERRORS_ENV: str(errors)})

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
                        if not (errors / f"rank-{rank}.txt").exists():  # a user error speaks for itself
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
        reported = _user_errors(errors)
        shutil.rmtree(errors, ignore_errors=True)
    if reported:
        for line in reported:
            print(line, flush=True)
        return EXIT_USER_ERROR
    if first_failure is not None:
        return first_failure if first_failure > 0 else 128 - first_failure  # -9 (killed) → 137
    return 75 if any(c == 75 for c in codes.values()) else 0


def _user_errors(folder: Path) -> list[str]:
    """The distinct one-line errors the ranks left in ``folder``, in rank order (usually one line)."""
    lines: list[str] = []
    for path in sorted(folder.glob("rank-*.txt"), key=lambda p: int(p.stem.split("-")[1])):
        line = path.read_text(errors="replace").strip()
        if line and line not in lines:
            lines.append(line)
    return lines


# ------------------------------------------------------------------ rank side
def report_user_error(line: str) -> bool:
    """In a rank of :func:`launch`: hand the launcher the one line that explains a user error (it
    prints each distinct line once, instead of one copy per rank). False outside such a rank."""
    folder = os.environ.get(USER_ERRORS_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    (Path(folder) / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(line + "\n")
    return True


def set_parent_death_signal(sig: int) -> bool:
    """Linux: deliver ``sig`` to this process when the thread that forked it exits. False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_launcher(grace_s: float = ORPHAN_GRACE_S, poll_s: float = 0.5) -> bool:
    """In a rank started by :func:`launch`: stop when the launcher dies (see the module docstring).
    Does nothing (False) in a process that :func:`launch` did not start."""
    global _launcher_pid
    launcher = os.environ.pop(LAUNCHER_PID_ENV, None)  # popped: the rank's own children do not watch
    if launcher is None:
        return False
    _launcher_pid = int(launcher)
    set_parent_death_signal(signal.SIGTERM)
    threading.Thread(target=_orphan_watchdog, args=(int(launcher), grace_s, poll_s), daemon=True,
                     name="vchitect-launcher-watchdog").start()
    return True


_launcher_pid: int | None = None  # set by watch_launcher in a rank of launch()


def release_orphaned_folder() -> None:
    """In a rank whose launcher is gone: remove the user-error folder the launcher would have removed
    (empty unless a rank had reported an error). Called by the watchdog and when the rank exits —
    the parent-death SIGTERM can stop the rank before the watchdog's next poll."""
    if _launcher_pid is None or os.getppid() == _launcher_pid:
        return
    folder = os.environ.pop(USER_ERRORS_ENV, None)
    if folder:
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _orphan_watchdog(launcher: int, grace_s: float, poll_s: float) -> None:
    while os.getppid() == launcher:  # re-parented (to init or a subreaper) once the launcher is gone
        time.sleep(poll_s)
    try:
        print(f"[launch] the launcher (pid {launcher}) is gone; stopping this rank", file=sys.stderr, flush=True)
    except (OSError, ValueError):  # stderr may have gone with the launcher (a closed pipe)
        pass
    release_orphaned_folder()
    os.kill(os.getpid(), signal.SIGTERM)  # as if forwarded: finish the step, checkpoint, exit 75
    time.sleep(grace_s)
    os.kill(os.getpid(), signal.SIGKILL)
