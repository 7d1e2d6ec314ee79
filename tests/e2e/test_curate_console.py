"""What a person running ``vchitect-curate run`` sees: in a terminal, in a log file, on SIGTERM."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline import synthetic

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "curate" / "synthetic.yaml"

# Imported by every Python process of the run (site imports ``sitecustomize`` at start-up). In a Ray
# worker, the first import of PyAV (the first video task) then does what a terminal-aware library
# does when its stdin is a terminal (the ffmpeg CLI's terminal set-up, ``tty.setraw``, curses): a
# ``tcsetattr`` on fd 0. A process of a background process group doing that to its controlling
# terminal is stopped by SIGTTOU (state T), in the middle of its task.
_TTY_TOUCHING_LIBRARY = '''\
import os, sys
if any(a.endswith("default_worker.py") for a in sys.argv):
    class _TouchTerminalOnImport:
        def find_spec(self, name, path=None, target=None):
            if name == "av" and os.isatty(0):
                import termios
                termios.tcsetattr(0, termios.TCSANOW, termios.tcgetattr(0))
            return None
    sys.meta_path.insert(0, _TouchTerminalOnImport())
'''

# Run in a new session (start_new_session), make the pty its controlling terminal, then become the
# CLI: the same situation as a command typed into a terminal.
_WITH_CONTROLLING_TTY = ("import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
                         "os.execv(sys.executable, [sys.executable] + sys.argv[1:])")


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("console_raw")
    synthetic.generate_corpus(str(root), n=1, seed=3, shots_per_video=2)  # 1 clean video + 5 defects
    return root


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _describe(pid: int) -> str:
    """``pid state pgid command`` from /proc (state T: stopped by job control)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
    state, _ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
    return f"  {pid} {state} pgid={pgid} {cmd[:120]}\n"


def _run_in_terminal(args: list[str], env: dict, timeout: float) -> tuple[int | None, str]:
    """Run ``python -m data_pipeline.cli ARGS`` with a pty as its controlling terminal (stdin, stdout,
    stderr); returns (exit code or None on timeout, everything it wrote)."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _WITH_CONTROLLING_TTY, "-m", "data_pipeline.cli", *args],
                            stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: every process holding the slave has exited
                    chunk = b""
                out += chunk
                if not chunk and proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        code = proc.poll()
        if code is None:  # hung: say which of the session's processes are stopped, then end every one
            pids = _session_pids(proc.pid)
            out += f"\n[test] timed out after {timeout:.0f} s; the session's processes:\n".encode()
            out += "".join(_describe(pid) for pid in pids).encode()
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait()
        return code, out.decode(errors="replace")
    finally:
        os.close(master)


def test_curation_in_a_terminal_finishes(small_corpus, tmp_path):
    """Ray's workers are background process groups of the terminal's session: any of them touching the
    terminal is stopped (SIGTTOU) and the run hangs, unless no Ray process has the terminal as stdin."""
    inject = tmp_path / "site"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(_TTY_TOUCHING_LIBRARY)
    out = tmp_path / "shards"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(inject), str(REPO), os.environ.get("PYTHONPATH", "")]))
    code, text = _run_in_terminal(["run", str(CONFIG), f"input.path={small_corpus / 'manifest.jsonl'}",
                                   f"output.path={out}"], env, timeout=240)
    assert code == 0, text[-4000:]
    assert (out / "_SUCCESS").is_file() and list(out.glob("shard-*.tar")), text[-4000:]
    assert "clips in 1 shards" in text


# ----------------------------------------------------------------------------- in a log file

RAY_NOISE = ("Token authentication is enabled",             # Ray's note on its own default
             "constructor arguments in the object store",   # core_worker.cc, once per pool actor
             "Progress bars disabled",                      # Ray Data, because ours replace its bars
             "execution finished",                          # Ray Data INFO
             "ray_remote_args",                             # Ray Data deprecation warning
             "SIGTERM received", "PC: @")                   # the core worker's C++ stack dump


def _log(curated_shards: Path) -> str:
    return (curated_shards.parent / "curate.log").read_text()


def test_curation_log_has_plain_progress_lines(curated_shards):
    """Without a terminal (a pipe, as in Slurm or nohup): plain lines with count, rate and ETA."""
    text = _log(curated_shards)
    lines = [ln for ln in text.splitlines() if ln.startswith("curate: ") and " inputs (" in ln]
    assert len(lines) >= 3, text[-3000:]
    for ln in lines:
        assert " inputs/s, " in ln and ", ETA " in ln and "| probe kept " in ln and "| record kept " in ln, ln
    total = lines[-1].split()[1].split("/")[1]
    assert lines[-1].startswith(f"curate: {total}/{total} inputs (100%)"), lines[-1]
    assert "\x1b[" not in text and "━" not in text  # no live display, no colour codes


def test_curation_log_has_no_ray_noise(curated_shards):
    text = _log(curated_shards)
    assert "curate: packing shards" in text
    found = [n for n in RAY_NOISE if n in text]
    assert not found, f"Ray noise in the output: {found}\n{text[-4000:]}"


def test_sigterm_ends_the_run_with_one_line(small_corpus, tmp_path):
    """SIGTERM while inputs are processed: Ray shut down, our line, exit code 143, no stack dump."""
    out = tmp_path / "shards"
    env = dict(os.environ)
    env.pop("RAY_AUTH_MODE", None)
    proc = subprocess.Popen([sys.executable, "-m", "data_pipeline.cli", "run", str(CONFIG),
                             f"input.path={small_corpus / 'manifest.jsonl'}", f"output.path={out}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list((out / "_work" / "done").glob("*.json")):  # Ray is up and inputs are being recorded
            assert proc.poll() is None and time.monotonic() < deadline, "no input recorded"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, text[-4000:]
    assert "curate: stopped by SIGTERM" in text and "rerun the same command" in text, text[-4000:]
    found = [n for n in RAY_NOISE if n in text]
    assert not found, f"Ray noise in the output: {found}\n{text[-4000:]}"
    assert "Traceback" not in text, text[-4000:]
