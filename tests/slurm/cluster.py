"""A real one-node Slurm cluster on this machine, for testing the project's sbatch scripts.

`SlurmCluster.start(folder)` installs Debian's slurm-wlm and munge when they are missing (apt-get, as
root), starts its own munged (socket in `folder`, the machine's key), slurmctld and slurmd from a
slurm.conf written into `folder` (this host as the only node, its CPUs, free ports, state and logs in
`folder`), and waits until the node is idle. Clients find it through SLURM_CONF in `cluster.env`.
`stop()` ends the daemons it started, by pid. Clusters on several network hosts of this machine are
`MultiNodeCluster` (tests/slurm/multinode_cluster.py).

Design choice: the cluster is a real Slurm with requeue enabled and no accounting, so sbatch, srun,
scancel --signal and scontrol requeue behave as on a site; jobs are followed with `scontrol show job`
(kept MinJobAge = 600 s after they end). The cost: a requeued job waits Slurm's fixed ~2 minutes before
it may start again; `release(job)` sets its start time to now, as an operator would, once the node has
finished with the previous attempt.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.harness import free_port

DAEMONS = ("slurmctld", "slurmd")
PACKAGES = ("slurm-wlm", "munge")


def install_reason() -> str | None:
    """None when Slurm and munge are installed (installing them if possible), else why not."""
    if all(shutil.which(tool) for tool in ("sbatch", "slurmctld", "slurmd", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get cannot install it here (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            return f"apt-get could not install {' '.join(PACKAGES)}: {result.stderr.strip()[-500:]}"
    return None


class SlurmCluster:
    """One controller and one node on this host."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.conf = self.folder / "slurm.conf"
        # jobs run this interpreter (the checkout under test may have no .venv of its own)
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), PYTHON=os.environ.get("PYTHON", sys.executable))
        self.started: list[Path] = []

    @classmethod
    def start(cls, folder: Path, **kwargs) -> SlurmCluster:
        cluster = cls(folder, **kwargs)
        try:
            cluster._write_conf()
            cluster._start_munge()
            cluster._start_daemons()
            cluster._wait_idle()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _start_daemons(self) -> None:
        for daemon in DAEMONS:
            subprocess.run([daemon, "-c"] if daemon == "slurmctld" else [daemon], env=self.env, check=True,
                           capture_output=True)
            self.started.append(self.folder / f"{daemon}.pid")

    def _conf_lines(self) -> list[str]:
        """Every slurm.conf line but the controller's host and the nodes."""
        f = self.folder
        return ["ClusterName=distilltest", "SlurmUser=root", "SlurmdUser=root", f"SlurmctldPort={free_port()}",
                f"SlurmdPort={free_port()}", "AuthType=auth/munge", f"AuthInfo=socket={f}/munge/munge.socket",
                f"StateSaveLocation={f}/state", f"SlurmctldPidFile={f}/slurmctld.pid",
                f"SlurmctldLogFile={f}/log/slurmctld.log", "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
                "MpiDefault=none", "ReturnToService=2", "JobRequeue=1", "MinJobAge=600", "KillWait=30"]

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        host, f = socket.gethostname().split(".")[0], self.folder
        self.conf.write_text("\n".join([
            *self._conf_lines(), f"SlurmctldHost={host}", f"SlurmdSpoolDir={f}/spool", f"SlurmdPidFile={f}/slurmd.pid",
            f"SlurmdLogFile={f}/log/slurmd.log", f"NodeName={host} CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _start_munge(self) -> None:
        """This cluster's own munged (the machine's key), so that no other cluster's stop() takes it away."""
        m = self.folder / "munge"
        m.chmod(0o755)
        subprocess.run(["munged", "--force", f"--socket={m}/munge.socket", f"--pid-file={m}/munged.pid",
                        f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed"], check=True, capture_output=True)
        self.started.insert(0, m / "munged.pid")

    def _wait_idle(self, timeout: float = 60) -> None:
        """Wait until every node is idle."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if result.stdout.split() and set(result.stdout.split()) == {"idle"}:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Slurm nodes did not become idle; see {self.folder / 'log'}")

    def sbatch(self, script: str, *args: str, options: tuple[str, ...] = (), cwd: Path, env=None) -> str:
        """Submit `script` (relative to `cwd`) with sbatch `options` and script `args`, `env` added to the
        job's environment; the job id."""
        result = subprocess.run(["sbatch", "--parsable", *options, script, *args], cwd=cwd,
                                env=dict(self.env, **(env or {})),
                                capture_output=True, text=True, check=True)
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (for an array, its first task)."""
        text = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True,
                              text=True).stdout.splitlines()
        return dict(item.split("=", 1) for item in text[0].split() if "=" in item) if text else {}

    def states(self, job_id: str) -> list[str]:
        lines = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=self.env, capture_output=True,
                               text=True).stdout.splitlines()
        return [dict(i.split("=", 1) for i in line.split() if "=" in i).get("JobState", "?") for line in lines]

    def wait(self, job_id: str, timeout: float = 600) -> list[str]:
        """Wait until every task of the job has ended; their final states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states(job_id)
            if states and all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
                              for s in states):
                return states
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.states(job_id)} after {timeout} s")

    def release(self, job_id: str) -> None:
        """Let a requeued job start now instead of after Slurm's requeue delay, once the node is idle again.

        Too early, and slurmd refuses the launch ("Job credential revoked"): the previous attempt's step may
        still be ending, and a credential made in the same second as the requeue counts as revoked."""
        self._wait_idle()
        time.sleep(2)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], env=self.env, check=True,
                       capture_output=True)

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for pid_file in reversed(self.started):
            if pid_file.is_file():
                _terminate(int(pid_file.read_text()))


def _terminate(pid: int, timeout: float = 10) -> None:
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, 9)
