"""Separate network hosts on this machine: one network namespace per node, joined by a Linux bridge.

`NodeNetwork.make(tag, nodes)` creates a bridge in the root namespace holding the subnet's first address
(10.77.X.1, where the controller listens), and per node a namespace with a veth pair: one end on the
bridge, the other inside the namespace as `eth0` with the address 10.77.X.(i + 1). `run_in(i, command)` is
the argv that runs a command on node i: in its network namespace (nsenter), in a new UTS namespace with
the node's hostname, and in a new mount namespace where a hosts file naming every node (written in
`folder`) is bound over /etc/hosts, as a site's DNS would name them, so a node's hostname resolves to its
own address and not to loopback. `remove()` deletes exactly what `make` created.

Design choice: namespaces, not containers: the nodes share this machine's filesystem, users and munge key
(as nodes on a shared filesystem do), and only the network and the hostname differ, which is what a
rendezvous across hosts depends on. The cost: root and a kernel that allows network namespaces; where
`ip netns add` fails, `reason()` says why and the tests that need this skip.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

IFNAME = "eth0"   # the node's interface inside its namespace (GLOO_SOCKET_IFNAME for the ranks)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def reason() -> str | None:
    """None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if not all(shutil.which(tool) for tool in ("ip", "unshare", "nsenter")):
        return "iproute2's ip and util-linux's unshare and nsenter are needed for network namespaces"
    probe = f"kdprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class NodeNetwork:
    """Namespaces `{tag}n1`..`{tag}nN` with hostnames node1..nodeN on the bridge `{tag}br`."""

    def __init__(self, tag: str, nodes: int, subnet: int, folder: Path):
        self.tag, self.nodes, self.subnet = tag, nodes, subnet
        self.hosts = Path(folder) / "hosts"
        self.bridge = f"{tag}br"
        self.made_links: list[str] = []
        self.made_namespaces: list[str] = []

    @classmethod
    def make(cls, tag: str, nodes: int, folder: Path) -> NodeNetwork:
        """`tag` (at most 10 characters) keeps names apart from other clusters on this machine; the nodes'
        hosts file goes in `folder`."""
        if len(tag) > 10:
            raise ValueError(f"namespace tag {tag!r} is longer than 10 characters (interface names are <= 15)")
        net = cls(tag, nodes, _free_subnet(), folder)
        try:
            net._make()
        except BaseException:
            net.remove()
            raise
        return net

    @property
    def gateway(self) -> str:
        """The controller's address: the bridge's, in the root namespace."""
        return f"10.77.{self.subnet}.1"

    def address(self, node: int) -> str:
        return f"10.77.{self.subnet}.{node + 1}"

    def hostname(self, node: int) -> str:
        return f"node{node}"

    def namespace(self, node: int) -> str:
        return f"{self.tag}n{node}"

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        self.made_links.append(self.bridge)
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(
            f"{self.address(i)} {self.hostname(i)}\n" for i in range(1, self.nodes + 1)))
        for i in range(1, self.nodes + 1):
            ns, outer, inner = self.namespace(i), f"{self.tag}v{i}", f"{self.tag}i{i}"
            _ip("netns", "add", ns)
            self.made_namespaces.append(ns)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.made_links.append(outer)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", self.bridge, "up")
            for args in (("link", "set", inner, "name", IFNAME), ("addr", "add", f"{self.address(i)}/24", "dev",
                         IFNAME), ("link", "set", IFNAME, "up"), ("link", "set", "lo", "up")):
                _ip("-n", ns, *args)

    def run_in(self, node: int, command: str) -> list[str]:
        """argv running the shell `command` on `node`: its network namespace, its own UTS namespace (its
        hostname) and mount namespace (its /etc/hosts). Not `ip netns exec`, which mounts a fresh /sys
        without the cgroup hierarchy that slurmd reads."""
        return ["nsenter", f"--net=/run/netns/{self.namespace(node)}", "unshare", "--uts", "--mount",
                "--propagation", "private", "sh", "-c",
                f"mount --bind {self.hosts} /etc/hosts && hostname {self.hostname(node)} && {command}"]

    def pids(self, node: int) -> list[int]:
        """Every process in the node's namespace (its daemons, job steps and ranks)."""
        out = _ip("netns", "pids", self.namespace(node), check=False).stdout
        return [int(pid) for pid in out.split()]

    def kill(self, node: int, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process on `node` (a node loss); the pids signalled."""
        killed = []
        for pid in self.pids(node):
            try:
                os.kill(pid, sig)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    def remove(self) -> None:
        """Kill what is left in the namespaces, then delete the namespaces and links made."""
        for ns in self.made_namespaces:
            node = int(ns.removeprefix(f"{self.tag}n"))
            self.kill(node)
            _ip("netns", "del", ns, check=False)
        for link in reversed(self.made_links):
            _ip("link", "del", link, check=False)
        self.made_namespaces, self.made_links = [], []


def _free_subnet() -> int:
    """A third octet X for which no interface here has an address in 10.77.X.0/24."""
    used = _ip("-o", "-4", "addr", "show").stdout
    for candidate in [os.getpid() % 250 + 1, *range(1, 251)]:
        if f"10.77.{candidate}." not in used:
            return candidate
    raise RuntimeError("no free 10.77.X.0/24 subnet for the test nodes")
