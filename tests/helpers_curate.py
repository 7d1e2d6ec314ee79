"""Helpers for the curation fault tests (tests/unit/test_curate_reliability.py, tests/e2e)."""

from __future__ import annotations

import pickle


class OpenOnUnpickle:
    """Unpickling an instance calls ``open(marker, "w")``: the file appears iff someone unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def crafted_pickle(marker) -> bytes:
    """The bytes an attacker would plant as a completion record (only ever written, never loaded)."""
    return pickle.dumps(OpenOnUnpickle(str(marker)))


def run_unprivileged(code: str, *args: str, workdir: str, user: str = "nobody", timeout: float = 120):
    """Run Python ``code`` (with ``args`` in sys.argv[1:]) as ``user``, importing this checkout's
    ``data_pipeline``; returns the CompletedProcess. When no interpreter of this Python version can be
    run by that user (the venv sits in a folder only root can enter), the code runs as root without
    CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (setpriv), which gives the same EACCES.

    The suite runs as root, for whom every permission check passes; a real EACCES needs another
    user. ``workdir`` must be a folder that user can read: the ``data_pipeline`` package is copied
    there, so the checkout itself need not be readable by them; the interpreter and site-packages
    (compiled av / numpy) must be.
    """
    import os
    import pwd
    import shutil
    import site
    import subprocess
    import sys

    import pytest

    pw = pwd.getpwnam(user)
    pkg = os.path.join(workdir, "_code")
    shutil.copytree(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data_pipeline"),
                    os.path.join(pkg, "data_pipeline"), ignore=shutil.ignore_patterns("__pycache__"))
    for d, _dirs, files in os.walk(pkg):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    prelude = ("import site, sys\n"
               f"for d in {site.getsitepackages()!r}:\n"
               "    site.addsitedir(d)\n"
               f"sys.path.insert(0, {pkg!r})\n")

    def drop():
        if os.geteuid() == 0:
            os.setgroups([])
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    def run(exe, body, *argv):
        return subprocess.run([exe, "-s", "-B", "-c", prelude + body, *argv], cwd=workdir, preexec_fn=drop,
                              env={"HOME": workdir, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                              timeout=timeout)

    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [sys.executable, os.path.realpath(sys.executable), shutil.which(f"python{version}"),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}"]
    tried = []
    for exe in dict.fromkeys(c for c in candidates if c):
        try:
            check = run(exe, "import av, fsspec, data_pipeline.sources\nprint('%d.%d' % sys.version_info[:2])")
        except OSError as exc:  # e.g. an interpreter under /root
            tried.append(f"{exe}: {exc}")
            continue
        if check.returncode == 0 and check.stdout.strip() == version:
            return run(exe, code, *args)
        tried.append(f"{exe}: rc {check.returncode} {check.stderr.strip()[-200:]}")
    # The checkout or its venv is not readable by that user (e.g. under /root): stay root but without
    # the capabilities that bypass file permissions, so a mode-000 file still gives a real EACCES.
    setpriv = shutil.which("setpriv")
    if setpriv and os.geteuid() == 0:
        caps = "-dac_override,-dac_read_search"
        r = subprocess.run([setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", sys.executable, "-s", "-B",
                            "-c", prelude + code, *args], cwd=workdir, env={"HOME": workdir, "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=timeout)
        return r
    pytest.fail(f"no Python {version} that user {user!r} can run with this site-packages: {tried}, and no "
                f"setpriv (util-linux) to drop root's file capabilities; the permission test needs one of them")
