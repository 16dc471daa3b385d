"""A one-node Slurm cluster on this machine for the tests: munged, slurmctld and slurmd as root, every file
(configuration, state, spool, logs, munge's key and socket) under one temporary folder, the daemons started in
the foreground so that their PIDs are ours to stop.

Debian's ``slurm-wlm`` and ``munge`` (Slurm 22.05 on bookworm) are installed with apt-get if missing; where that
cannot be done, :func:`start` raises :class:`Unavailable` with the reason (the tests skip with it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel")
PACKAGES = ("slurm-wlm", "munge")
MEMORY_MARGIN_MB = 512  # RealMemory below what the machine has: slurmd refuses a node that claims more


class Unavailable(RuntimeError):
    """Why no cluster can run here (not root, no apt-get, the install failed)."""


@dataclass
class Cluster:
    root: Path
    conf: Path
    env: dict[str, str]  # SLURM_CONF for the clients
    processes: list[subprocess.Popen] = field(default_factory=list)

    def stop(self) -> None:
        """Stop the daemons by PID, slurmd first (it would requeue nothing: the tests are over)."""
        for process in reversed(self.processes):
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def install() -> None:
    """apt-get the packages when a binary is missing; Unavailable if it cannot be done here."""
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(
            "slurm-wlm and munge are not installed and this is not root with apt-get "
            "(apt-get install -y slurm-wlm munge)"
        )
    done = subprocess.run(
        ["apt-get", "install", "-y", "-q", *PACKAGES],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        check=False,
    )
    if done.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")


def start(root: Path) -> Cluster:
    """Install if needed, write the configuration under ``root`` and start munged, slurmctld and slurmd; return
    when the node takes jobs."""
    install()
    if os.geteuid() != 0:
        raise Unavailable("slurmd must run as root to start jobs here")
    root.mkdir(parents=True, exist_ok=True)
    cluster = Cluster(root, root / "slurm.conf", {**os.environ, "SLURM_CONF": str(root / "slurm.conf")})
    try:
        _start_munge(cluster)
        cluster.conf.write_text(slurm_conf(root, _free_port(), _free_port()))
        for daemon in ("slurmctld", "slurmd"):
            (root / daemon).mkdir(exist_ok=True)
            cluster.processes.append(
                subprocess.Popen(
                    [_binary(daemon), "-D", "-f", str(cluster.conf)],
                    env=cluster.env,
                    stdout=subprocess.DEVNULL,
                    stderr=(root / f"{daemon}.out").open("w"),
                )
            )
        _wait_idle(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def slurm_conf(root: Path, controller_port: int, node_port: int) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    memory = max(256, _memory_mb() - MEMORY_MARGIN_MB)
    return "\n".join(
        [
            "ClusterName=advreg-test",
            f"SlurmctldHost={host}",
            f"SlurmctldPort={controller_port}",
            f"SlurmdPort={node_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            f"AuthInfo=socket={root / 'munge.socket'}",
            f"StateSaveLocation={root / 'slurmctld'}",
            f"SlurmdSpoolDir={root / 'slurmd'}",
            f"SlurmctldPidFile={root / 'slurmctld.pid'}",
            f"SlurmdPidFile={root / 'slurmd.pid'}",
            f"SlurmctldLogFile={root / 'slurmctld.log'}",
            f"SlurmdLogFile={root / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=30",
            "KillWait=5",
            "InactiveLimit=0",
            f"NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
            "",
        ]
    )


def _start_munge(cluster: Cluster) -> None:
    key = cluster.root / "munge.key"
    subprocess.run([_binary("mungekey"), "--create", f"--keyfile={key}"], check=True, capture_output=True)
    socket_path = cluster.root / "munge.socket"
    cluster.processes.append(
        subprocess.Popen(
            [
                _binary("munged"),
                "--foreground",
                "--force",
                f"--socket={socket_path}",
                f"--key-file={key}",
                f"--pid-file={cluster.root / 'munged.pid'}",
                f"--log-file={cluster.root / 'munged.log'}",
                f"--seed-file={cluster.root / 'munged.seed'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    )
    _wait(lambda: socket_path.exists(), "munged's socket", cluster)


def _wait_idle(cluster: Cluster) -> None:
    def idle() -> bool:
        shown = subprocess.run(["sinfo", "-h", "-o", "%t"], env=cluster.env, capture_output=True, text=True)
        return shown.returncode == 0 and shown.stdout.strip() in ("idle", "mix")

    _wait(idle, "the node to be idle", cluster, timeout=60)


def _wait(ready, what: str, cluster: Cluster, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [p.args[0] for p in cluster.processes if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            logs = {p.name: p.read_text()[-400:] for p in cluster.root.glob("*.log") if p.is_file()}
            raise Unavailable(f"the one-node cluster did not start (waiting for {what}; exited: {dead}; logs: {logs})")
        time.sleep(0.2)


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 1024
