"""Session-scoped real Slurm cluster (two nodes on 127.0.0.1) for the tests in this folder."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from .cluster import SlurmCluster, ensure_packages


@pytest.fixture(scope="session")
def shellcheck() -> str:
    ensure_packages({"shellcheck": "shellcheck"})
    return shutil.which("shellcheck") or "/usr/bin/shellcheck"


@pytest.fixture(scope="session")
def slurm_cluster():
    # A short path under /tmp: munge's socket path must fit a unix socket name.
    root = tempfile.mkdtemp(prefix="vchitect-slurm-", dir="/tmp")
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
