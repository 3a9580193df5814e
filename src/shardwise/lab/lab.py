"""Bring a lab up and down: a Ray head on the host's end of the lab's bridge (it coordinates: no CPU
for tasks, so nothing is profiled or planned on it), and each node a real Ray worker in its own
network namespace and cgroup. They start as machines of a real cluster do: `shardwise cluster
start` for the head, `shardwise cluster join` for each node (Ray's token authentication and TLS
on). Each node has a cache of its own (fetched weights, profiles, credentials: a machine's own
disk) and cannot see the host's (so a model there is not on the node), only its built kernels
(code installed alike on every machine).

What `up` makes is written to a state file as it is made, so `down` (or a failed `up`, or Ctrl-C)
removes exactly that and nothing else. One lab at a time; its address is the head's.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shardwise.cache import cache_dir
from shardwise.errors import ShardwiseError
from shardwise.lab import host
from shardwise.lab.spec import LabSpec

STATE = Path("/run/shardwise-lab/state.json")
NODE_CACHES = Path("/var/tmp/shardwise-lab")  # each node's cache_dir(), under its name
HEAD_PORT = 6390
OBJECT_STORE_BYTES = 128 * 2**20  # hidden states are small: keep each node's shared memory small
RAY_CURRENT = Path("/tmp/ray/ray_current_cluster")  # what a plain ray.init() would join


@dataclass
class NodeState:
    name: str
    ip: str
    cpus: float
    memory_gb: float
    rate_mbit: float
    delay_ms: float
    namespace: str
    veth: str


@dataclass
class LabState:
    address: str = ""
    bridge: bool = False
    head: bool = False
    nodes: list[NodeState] = field(default_factory=list)

    def save(self) -> None:
        STATE.parent.mkdir(parents=True, exist_ok=True)
        STATE.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls) -> LabState | None:
        if not STATE.exists():
            return None
        data = json.loads(STATE.read_text())
        return cls(data["address"], data["bridge"], data["head"], [NodeState(**n) for n in data["nodes"]])

    def node(self, name: str) -> NodeState:
        for node in self.nodes:
            if node.name == name:
                return node
        raise ShardwiseError(f"the lab has no node '{name}'; its nodes: {', '.join(n.name for n in self.nodes)}")


def node_cache(name: str) -> Path:
    return NODE_CACHES / name


def readable_by_nodes(path: Path, folder: Path) -> Path:
    """The host's file linked (or copied) into `folder`, where the lab's nodes can read it: they do
    not see the host's cache, so a catalog model there is not on them (and they cannot fetch it
    where the lab has no route to its index)."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if not target.exists():
        try:
            os.link(path, target)
        except OSError:  # (another file system)
            shutil.copy(path, target)
    return target


def _shardwise(arguments: list[str]) -> str:
    return f"{shlex.quote(sys.executable)} -m shardwise.cli {shlex.join(arguments)}"


def _start_ray(group: host.Cgroup, arguments: list[str], ray_options: list[str], node: NodeState | None = None) -> None:
    """`shardwise cluster ARGUMENTS -- RAY_OPTIONS` inside the group (and for a node, in its network
    and mount namespaces, with its own cache, the host's hidden): its Ray daemons, and every
    worker they start, stay in the group."""
    command = f"{_shardwise(['cluster', *arguments])} -- {shlex.join(ray_options)}"
    if node is not None:
        mine, hosts = node_cache(node.name), cache_dir()
        hosts.mkdir(parents=True, exist_ok=True)
        (mine / "kernels").mkdir(parents=True)
        command = (f"mount --bind {shlex.quote(str(hosts / 'kernels'))} {shlex.quote(str(mine / 'kernels'))} && "
                   f"mount -t tmpfs -o size=1m,mode=755 shardwise-lab {shlex.quote(str(hosts))} && "
                   f"export SHARDWISE_CACHE={shlex.quote(str(mine))} && exec {command}")
        command = f"exec ip netns exec {node.namespace} sh -c {shlex.quote(command)}"  # (its own mount namespace)
    done = host.run("sh", "-c", f"{group.enter_command()}; {command}", check=False)
    if done.returncode != 0:
        raise ShardwiseError(f"lab: {' '.join(arguments[:1])} failed: {(done.stderr or done.stdout).strip()[-800:]}")


def oversubscribed(spec: LabSpec) -> str | None:
    """A warning when the nodes' quotas leave this machine less than a core for everything else:
    the driver, Ray's head and daemons (measured: about one core's worth while stages compute
    on two nodes at once). Then nodes busy together get less than their quotas promise."""
    cores = os.cpu_count() or 1
    asked = sum(n.cpus for n in spec.nodes)
    if asked <= cores - 1:
        return None
    return (f"the nodes' quotas add up to {asked:g} of this machine's {cores} cores, leaving less than one for "
            "the driver and Ray's own processes: nodes busy at once will run slower than their quotas promise "
            "(for measurements that hold, keep the quotas' sum a core below the machine's)")


def up(spec: LabSpec, progress: Callable[[str], None] = lambda _: None) -> LabState:
    host.check_host()
    if STATE.exists():
        raise ShardwiseError(f"a lab is up already ({STATE}): run `shardwise lab down` first")
    if any(n.link.delay_ms for n in spec.nodes) and not host.netem_available():
        raise ShardwiseError("link delay needs the kernel's netem qdisc, which this host lacks (modprobe sch_netem, "
                             "or drop delay_ms: the links are still rate-shaped)")
    state = LabState()
    try:
        progress("bridge")
        head_ip = host.add_bridge()
        state.bridge = True
        state.save()
        secret = secrets.token_urlsafe(32)  # (the cluster's: what `cluster start` would make)
        progress("head node")
        head = host.Cgroup("head")
        head.create()
        state.head = True
        state.save()
        state.address = f"{head_ip}:{HEAD_PORT}"
        _start_ray(head, ["start", f"--port={HEAD_PORT}", f"--node-ip={head_ip}", f"--token={secret}"],
                   ["--node-name=head", "--num-cpus=0", f"--object-store-memory={OBJECT_STORE_BYTES}",
                    "--include-dashboard=false"])
        state.save()
        for i, node in enumerate(spec.nodes):
            progress(f"node {node.name}")
            ip = f"{host.SUBNET}.{10 + i}"
            record = NodeState(node.name, ip, node.cpus, node.memory_gb, node.link.rate_mbit, node.link.delay_ms,
                               f"swlab-{node.name}", f"swl{i}")
            group = host.Cgroup(node.name)
            group.create()
            state.nodes.append(record)
            state.save()
            group.set_memory(int((node.memory_gb + spec.runtime_gb) * 1e9))
            host.add_namespace(record.namespace, record.veth, ip, node.link.rate_mbit, node.link.delay_ms)
            shutil.rmtree(node_cache(node.name), ignore_errors=True)  # (a machine fresh to the cluster)
            _start_ray(group, ["join", state.address, f"--token={secret}", f"--node-ip={ip}"],
                       [f"--node-name={node.name}", f"--num-cpus={max(1, round(node.cpus))}",
                        f"--memory={int(node.memory_gb * 1e9)}", f"--object-store-memory={OBJECT_STORE_BYTES}"],
                       record)
            group.set_cpus(node.cpus)  # after the start: Ray's start-up times out on a fraction of a core
        return state
    except BaseException:
        down(state)
        raise


def down(state: LabState | None = None) -> LabState | None:
    """Stop every process of the lab and remove what it made; None when no lab was up. Without a
    state file (a lab killed while it came up) what carries the lab's names is swept instead."""
    state = state or LabState.load() or _leftovers()
    if state is None:
        return None
    for node in reversed(state.nodes):
        host.Cgroup(node.name).remove()
        host.remove_namespace(node.namespace)
    if state.head:
        host.Cgroup("head").remove()
    host.remove_group_root()
    if state.bridge:
        host.remove_bridge()
    if state.address and RAY_CURRENT.exists() and RAY_CURRENT.read_text().strip() == state.address:
        RAY_CURRENT.unlink()
    if state.address:  # (the host's credentials for the lab's cluster)
        host.run("sh", "-c", _shardwise(["cluster", "forget", state.address]), check=False)
    shutil.rmtree(NODE_CACHES, ignore_errors=True)
    STATE.unlink(missing_ok=True)
    return state


def _leftovers() -> LabState | None:
    """What a lab whose state was lost left behind: its bridge, namespaces and cgroups, by name."""
    namespaces = [n for n in host.run("ip", "netns", "list", check=False).stdout.split() if n.startswith("swlab-")]
    namespaces += [p.name for p in host.NETNS_ETC.glob("swlab-*")]
    groups = {p.name for c in ("cpu", "memory") if (host.CGROUPS / c / host.GROUP).is_dir()
              for p in (host.CGROUPS / c / host.GROUP).iterdir() if p.is_dir()}
    names = {n.removeprefix("swlab-") for n in namespaces} | (groups - {"head"})
    bridge = host.run("ip", "link", "show", host.BRIDGE, check=False).returncode == 0
    if not (names or bridge or groups):
        return None
    nodes = [NodeState(name, "", 0, 0, 0, 0, f"swlab-{name}", "") for name in sorted(names)]
    return LabState(f"{host.SUBNET}.1:{HEAD_PORT}", bridge, "head" in groups, nodes)


def set_cpus(name: str, cpus: float) -> NodeState:
    """Change a running node's CPU share (another tenant took its cores; its quota changed)."""
    state = LabState.load()
    if state is None:
        raise ShardwiseError("no lab is up: start one with `shardwise lab up LAB.yaml`")
    if cpus <= 0:
        raise ShardwiseError(f"cpus must be > 0, not {cpus}")
    node = state.node(name)
    host.Cgroup(name).set_cpus(cpus)
    node.cpus = cpus
    state.save()
    return node
