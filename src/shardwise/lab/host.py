"""What a lab makes on its Linux host, and unmakes: a bridge, a network namespace per node (a veth
pair into the bridge, token-bucket shaped), and a cgroup v1 group per node (CPU quota, memory
limit) that every process of the node runs in, so that all of them can be found and stopped."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from shardwise.errors import ShardwiseError

BRIDGE = "swlab0"
SUBNET = "10.213.0"  # the head at .1, node i at .(10 + i)
CGROUPS = Path("/sys/fs/cgroup")
GROUP = "shardwise-lab"
CFS_PERIOD_US = 100_000
NETNS_ETC = Path("/etc/netns")  # `ip netns exec NAME` mounts the files of NAME's folder here over /etc's


class LabUnavailable(ShardwiseError):
    """This host cannot run a lab (not root, no namespaces or cgroups): the reason, in one line."""


def check_host() -> None:
    if os.geteuid() != 0:
        raise LabUnavailable("a lab needs root (network namespaces, cgroups): run it as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise LabUnavailable(f"a lab needs the '{tool}' command (Debian: apt install iproute2)")
    for controller in ("cpu", "memory"):
        if not (CGROUPS / controller / "cgroup.procs").exists():
            raise LabUnavailable(f"a lab needs the cgroup v1 '{controller}' controller at {CGROUPS / controller}")
    probe = "swlab-probe"
    if run("ip", "netns", "add", probe, check=False).returncode != 0:
        raise LabUnavailable("this kernel or container cannot make network namespaces (ip netns add failed)")
    run("ip", "netns", "delete", probe, check=False)


def run(*command: str, check: bool = True, namespace: str | None = None) -> subprocess.CompletedProcess:
    if namespace is not None:
        command = ("ip", "netns", "exec", namespace, *command)
    done = subprocess.run(command, capture_output=True, text=True)
    if check and done.returncode != 0:
        raise ShardwiseError(f"lab: `{' '.join(command)}` failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def netem_available() -> bool:
    """Whether the kernel has netem (link delay): tried on a dummy device that is then removed."""
    run("ip", "link", "add", "swlab-netem", "type", "dummy", check=False)
    try:
        return run("tc", "qdisc", "add", "dev", "swlab-netem", "root", "netem", "delay", "1ms",
                   check=False).returncode == 0
    finally:
        run("ip", "link", "delete", "swlab-netem", check=False)


# --- the bridge ------------------------------------------------------------------------------
def add_bridge() -> str:
    run("ip", "link", "add", BRIDGE, "type", "bridge")
    run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    run("ip", "link", "set", BRIDGE, "up")
    return f"{SUBNET}.1"


def remove_bridge() -> None:
    run("ip", "link", "delete", BRIDGE, check=False)


# --- a node's namespace ----------------------------------------------------------------------
def add_namespace(namespace: str, veth: str, ip: str, rate_mbit: float, delay_ms: float) -> None:
    """The namespace, its end of a veth pair (eth0, ip) and the host's end in the bridge, shaped
    to rate_mbit (and delayed by delay_ms) in both directions."""
    run("ip", "netns", "add", namespace)
    _no_name_server(namespace)
    run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
    run("ip", "link", "set", veth, "master", BRIDGE, "up")
    run("ip", "addr", "add", f"{ip}/24", "dev", "eth0", namespace=namespace)
    run("ip", "link", "set", "eth0", "up", namespace=namespace)
    run("ip", "link", "set", "lo", "up", namespace=namespace)
    run("ip", "route", "add", "default", "via", f"{SUBNET}.1", namespace=namespace)
    for device, inside in ((veth, None), ("eth0", namespace)):  # into the node, and out of it
        shape(device, rate_mbit, delay_ms, inside)


def _no_name_server(namespace: str) -> None:
    """No name server is reachable from a node: its lookups fail at once. (With the host's, each
    new process that opened a TCP store waited 10 s: the machine's name is in /etc/hosts for IPv4
    only, and its IPv6 lookup went on to a server the node cannot reach.)"""
    folder = NETNS_ETC / namespace
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")


def shape(device: str, rate_mbit: float, delay_ms: float, namespace: str | None) -> None:
    """A token bucket at rate_mbit, after a netem delay where one is asked for. Its bucket holds
    4 ms of traffic (what a 250 Hz kernel needs to keep the rate), at least one full packet: a
    larger bucket would let a slow link pass a whole decode step's hidden state at once, where
    a real link of that rate takes its serialisation time."""
    burst = max(int(rate_mbit * 1e6 / 8 * 0.004), 1514)
    tbf = ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]
    if delay_ms:
        run("tc", "qdisc", "add", "dev", device, "root", "handle", "1:", "netem", "delay", f"{delay_ms}ms",
            namespace=namespace)
        run("tc", "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", *tbf, namespace=namespace)
    else:
        run("tc", "qdisc", "add", "dev", device, "root", *tbf, namespace=namespace)


def remove_namespace(namespace: str) -> None:
    """The namespace, its processes and its veth pair (which goes with it)."""
    pids = run("ip", "netns", "pids", namespace, check=False).stdout.split()
    stop([int(p) for p in pids])
    run("ip", "netns", "delete", namespace, check=False)
    shutil.rmtree(NETNS_ETC / namespace, ignore_errors=True)
    if NETNS_ETC.is_dir() and not any(NETNS_ETC.iterdir()):  # (iproute2's folder, left empty: made for the lab)
        NETNS_ETC.rmdir()


# --- a node's cgroup -------------------------------------------------------------------------
class Cgroup:
    def __init__(self, name: str):
        self.dirs = {controller: CGROUPS / controller / GROUP / name for controller in ("cpu", "memory")}

    def create(self) -> None:
        for path in self.dirs.values():
            path.mkdir(parents=True, exist_ok=True)

    def set_cpus(self, cores: float | None) -> None:
        """A CFS quota of `cores` cores (None: no limit)."""
        quota = -1 if cores is None else max(1000, round(cores * CFS_PERIOD_US))
        (self.dirs["cpu"] / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
        (self.dirs["cpu"] / "cpu.cfs_quota_us").write_text(str(quota))

    def set_memory(self, limit_bytes: int) -> None:
        (self.dirs["memory"] / "memory.limit_in_bytes").write_text(str(limit_bytes))

    def enter_command(self) -> str:
        """Shell words that move the shell running them (and so what it execs) into the group."""
        return "; ".join(f"echo $$ > {path / 'cgroup.procs'}" for path in self.dirs.values())

    def pids(self) -> list[int]:
        found = set()
        for path in self.dirs.values():
            procs = path / "cgroup.procs"
            if procs.exists():
                found |= {int(p) for p in procs.read_text().split()}
        return sorted(found)

    def remove(self) -> None:
        stop(self.pids())
        for path in self.dirs.values():
            if path.exists():
                path.rmdir()


def remove_group_root() -> None:
    for controller in ("cpu", "memory"):
        path = CGROUPS / controller / GROUP
        if path.exists() and not any(p.is_dir() for p in path.iterdir()):
            path.rmdir()


def stop(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
            time.sleep(0.1)
        pids = alive
        if not pids:
            return


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
