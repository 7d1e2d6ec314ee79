"""A real, throw-away Slurm cluster on this machine: one munged, one slurmctld and two slurmd
daemons (``node1``, ``node2``) that both live on 127.0.0.1 on different ports.

Debian's packages (``slurmctld slurmd slurm-client munge``, Slurm 22.05 on bookworm) are installed
when missing. Every file the daemons write lives in one temporary folder; :meth:`stop` kills the
daemons by pid and removes it. Nothing listens on anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client", "munged": "munge",
            "shellcheck": "shellcheck"}
NODES = ("node1", "node2")
CPUS_PER_NODE = 2


def ensure_packages(packages: dict[str, str] = PACKAGES) -> None:
    """apt-get install the packages whose program is missing (no-op when all are there)."""
    missing = sorted({pkg for prog, pkg in packages.items() if shutil.which(prog) is None
                      and not os.path.exists(f"/usr/sbin/{prog}")})
    if not missing:
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"missing Debian packages {missing}; install them (apt-get install {' '.join(missing)})")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    # The packages' service scripts are not started in a container (policy-rc.d); we start our own.
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


SLURM_CONF = """\
# Written by tests/slurm/cluster.py — a two-node cluster on 127.0.0.1, short timers for tests.
ClusterName=vchitest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups in a container: track processes by parent pid, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
PropagateResourceLimits=NONE
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
# Look at pending jobs every second, so a requeued job starts as soon as it is eligible.
SchedulerParameters=sched_interval=1
JobRequeue=1
ReturnToService=2
KillWait=5
MinJobAge=300
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10
NodeName=DEFAULT CPUs={cpus} RealMemory=1000 State=UNKNOWN
{nodes}
PartitionName=test Nodes={node_list} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.procs: list[subprocess.Popen] = []
        self.env: dict[str, str] = {}

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_packages()
        root = self.root
        for d in ("munge", "state", "log", *(f"spool-{n}" for n in NODES)):
            (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self.procs.append(subprocess.Popen(
            [_sbin("munged"), "--foreground", "--force", f"--socket={root}/munge/munge.socket",
             f"--key-file={key}", f"--pid-file={root}/munge/munged.pid", f"--log-file={root}/log/munged.log",
             f"--seed-file={root}/munge/munged.seed"],
            stdout=subprocess.DEVNULL, stderr=open(root / "log" / "munged.err", "w")))
        self._wait(lambda: (root / "munge" / "munge.socket").exists(), timeout, "munged")

        ctld_port, *node_ports = free_ports(1 + len(NODES))
        nodes = "\n".join(f"NodeName={n} NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 Port={p}"
                          for n, p in zip(NODES, node_ports))
        conf = root / "slurm.conf"
        conf.write_text(SLURM_CONF.format(host=socket.gethostname(), ctld_port=ctld_port, root=root,
                                          cpus=CPUS_PER_NODE, nodes=nodes, node_list=",".join(NODES)))
        self.conf = conf
        self.env = dict(os.environ, SLURM_CONF=str(conf))
        log = open(root / "log" / "daemons.err", "a")
        self.procs.append(subprocess.Popen([_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], env=self.env,
                                           stdout=log, stderr=log))
        self._wait(lambda: self.run("scontrol", "ping", check=False).returncode == 0, timeout, "slurmctld")
        for n in NODES:
            self.procs.append(subprocess.Popen([_sbin("slurmd"), "-D", "-N", n, "-f", str(conf)], env=self.env,
                                               stdout=log, stderr=log))
        self._wait(self._nodes_idle, timeout, "slurmd on both nodes")
        return self

    def _nodes_idle(self) -> bool:
        r = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
        states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
        return all(states.get(n, "").rstrip("*") == "idle" for n in NODES)

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: a daemon exited with {p.returncode}\n{self.logs()}")
            if ok():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{what} not ready after {timeout:.0f}s\n{self.logs()}")

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def stop(self) -> None:
        if self.env and self.procs:
            # Jobs of this cluster only (its SLURM_CONF). Wait for them to end: their slurmstepd
            # processes are daemons of their own and would outlive slurmd.
            self.run("scancel", "--user", "root", check=False)
            deadline = time.time() + 30
            while time.time() < deadline:
                r = self.run("squeue", "-h", "-o", "%i", check=False)
                if r.returncode != 0 or not r.stdout.strip():
                    break
                time.sleep(0.5)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ helpers for tests
    def run(self, *cmd: str, check: bool = True, timeout: float = 60, env: dict | None = None):
        r = subprocess.run(list(cmd), env=env or self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stdout}\n{r.stderr}")
        return r

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, RestartCnt, ExitCode, …); {} once purged."""
        r = self.run("scontrol", "-o", "show", "job", str(job_id), check=False)
        fields = {}
        for tok in r.stdout.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                fields[k] = v
        return fields

    def wait_state(self, job_id: int, states: set[str], timeout: float = 300) -> dict[str, str]:
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout:.0f}s: {info}\n{self.logs()}")
