"""A real Slurm cluster of several nodes on this machine: each node its own network host (tests/slurm/netns.py).

`MultiNodeCluster.start(folder, nodes=2)` makes the namespaces, starts a munged and slurmctld in the root
namespace (listening on the bridge's address, which slurm.conf names as the controller's) and one slurmd
per node inside its namespace with its hostname (`slurmd -N nodeI`, NodeAddr = the namespace's address).
Job steps inherit the node's namespaces, so a rank on node2 sees hostname node2 and reaches node1 only
over the bridge. `lose(i)` is a node loss (SIGKILL to everything in node i's namespace, slurmd included),
`revive(i)` starts its slurmd again. `stop()` ends the daemons by pid and removes the namespaces.

Design choice: the nodes declare this machine's CPUs each (Slurm would drain a node declaring more than it
sees), and SlurmdTimeout is short (10 s) so that a lost node is noticed within the test's time; the cost:
the nodes oversubscribe the real cores when all are busy, and a real site's longer SlurmdTimeout makes
its jobs wait that much longer before a node loss ends them.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.slurm import netns
from tests.slurm.cluster import SlurmCluster

SLURMD_TIMEOUT_S = 10


class MultiNodeCluster(SlurmCluster):
    """slurmctld on this host, slurmd node1..nodeN in their own network and UTS namespaces."""

    def __init__(self, folder: Path, nodes: int = 2, tag: str | None = None):
        super().__init__(folder)
        self.nodes = nodes
        self.tag = tag or f"kd{os.getpid() % 100000}"
        self.net: netns.NodeNetwork | None = None

    @property
    def hostnames(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "log", "munge"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.net = netns.NodeNetwork.make(self.tag, self.nodes, self.folder)
        host, f, cpus = socket.gethostname().split(".")[0], self.folder, os.cpu_count()
        nodes = [f"NodeName={self.net.hostname(i)} NodeAddr={self.net.address(i)} CPUs={cpus} RealMemory=1000 "
                 "State=UNKNOWN" for i in range(1, self.nodes + 1)]
        self.conf.write_text("\n".join([
            *self._conf_lines(), f"SlurmctldHost={host}({self.net.gateway})", f"SlurmdSpoolDir={f}/spool/%n",
            f"SlurmdPidFile={f}/slurmd-%n.pid", f"SlurmdLogFile={f}/log/slurmd-%n.log",
            f"SlurmdTimeout={SLURMD_TIMEOUT_S}", *nodes,
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""]))

    def _start_daemons(self) -> None:
        subprocess.run(["slurmctld", "-c"], env=self.env, check=True, capture_output=True)
        self.started.append(self.folder / "slurmctld.pid")
        for i in range(1, self.nodes + 1):
            self.revive(i, wait=False)

    def revive(self, node: int, wait: bool = True) -> None:
        """Start node `node`'s slurmd (again) in its namespace; with `wait`, until every node is idle."""
        name = self.net.hostname(node)
        (self.folder / "spool" / name).mkdir(parents=True, exist_ok=True)
        subprocess.run(self.net.run_in(node, f"exec slurmd -N {name}"), env=self.env, check=True,
                       capture_output=True)
        pid_file = self.folder / f"slurmd-{name}.pid"
        if pid_file not in self.started:
            self.started.append(pid_file)
        if wait:
            self._wait_idle(timeout=120)

    def lose(self, node: int) -> list[int]:
        """A node loss: SIGKILL to every process on `node` (slurmd, job steps, ranks); the pids killed."""
        return self.net.kill(node, signal.SIGKILL)

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self.net is not None:
                self.net.remove()


def wait_until(condition, what: str, timeout: float = 300, poll: float = 0.05) -> float:
    """Poll `condition` until true; the seconds it took. Raises TimeoutError naming `what`."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - start
