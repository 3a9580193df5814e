"""A Ray node that joins a serving cluster: profiled in place, then offered to the planner.

A pipeline with a cluster file looks for alive Ray nodes that offer CPUs and are none of the
cluster's devices. For each it starts a Probe there and on every node running a stage, and
measures, all without holding up a step: the link between the newcomer and each of those nodes
(hand-overs through the driver's node, as `profile --address` times them), and its speed. A
node on the same machine as one of the cluster's devices (a lab's; the same boot and cores)
runs on the same cores: it takes that device's figures, already corrected by the drift watch,
and measures only the share of their speed it keeps up when busy (a quota); any other node is
profiled in full (quick: fewer rounds).
Once done, its device and links go to the drift watch (DriftWatch.offer), which plans again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from shardwise.perf.cluster_profile import probe_on
from shardwise.perf.hardware import DeviceSpec, LinkSpec
from shardwise.perf.profile import link_from_hand_overs
from shardwise.planner.topology import Cluster, ClusterDevice

log = logging.getLogger("shardwise.cluster")
HAND_OVERS = 8  # hand-overs per message size, for each link (profile --quick's count)


def newcomers(cluster: Cluster, seen: set[str]) -> list[dict[str, Any]]:
    """Alive Ray nodes that offer CPUs, run none of the cluster's devices and are not in `seen`
    (a device on "local" is on the driver's node)."""
    known = {d.node for d in cluster.devices}
    if "local" in known:
        known.add(ray.get_runtime_context().get_node_id())
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0 and n["NodeID"] not in seen
            and not {n["NodeID"], n["NodeManagerAddress"]} & known]


@dataclass
class Join:
    """One newcomer being measured: start() it, poll done(), then take its device and links."""

    node: dict[str, Any]  # its ray.nodes() entry
    name: str
    cluster: Cluster  # as the drift watch had it when the node was found
    stage_nodes: dict[str, str]  # the cluster device name of each node running a stage -> its Ray node id
    model: str
    hidden: int
    pending: list[ray.ObjectRef] = field(default_factory=list)  # measurements not in yet
    _probe: Any = None  # on the newcomer
    _others: dict[str, Any] = field(default_factory=dict)  # on the stages' nodes, by device name
    _refs: dict[str, Any] = field(default_factory=dict)
    _profile: ray.ObjectRef | None = None
    _driver: Any = None  # on the driver's node

    def start(self) -> Join:
        self._probe = probe = probe_on(self.node["NodeID"])
        self._others = others = {name: probe_on(node_id) for name, node_id in self.stage_nodes.items()}
        self._driver = driver = probe_on(ray.get_runtime_context().get_node_id())  # (hand-overs pass it)
        self._refs = {"machine": probe.machine.remote(), "kept": probe.speed_kept.remote(),
                      "machines": {name: p.machine.remote() for name, p in others.items()},
                      "links": {name: driver.hand_overs.remote(probe, p, self.hidden, HAND_OVERS)
                                for name, p in others.items()}}
        self.pending = [self._refs["machine"], self._refs["kept"],
                        *self._refs["machines"].values(), *self._refs["links"].values()]
        return self

    def done(self) -> bool:
        """Whether every measurement is in (starting the full profile when no known device shares
        the node's machine)."""
        self.pending = ray.wait(self.pending, num_returns=len(self.pending), timeout=0)[1] if self.pending else []
        if self.pending:
            return False
        if self._profile is None and self._twin() is None:
            self._profile = self._probe.profile.remote(self.model, "cpu", self.name, True)
            self.pending = [self._profile]
            return False
        return True

    def _twin(self) -> ClusterDevice | None:
        """A cluster device on the same machine, with as many cores (its figures are the node's)."""
        machine = ray.get(self._refs["machine"])
        machines = {name: ray.get(ref) for name, ref in self._refs["machines"].items()}
        cores, nodes = self.node["Resources"].get("CPU"), ray.nodes()
        for device in self.cluster.devices:
            node = next((n for n in nodes if device.node in (n["NodeID"], n["NodeManagerAddress"])), None)
            if machines.get(device.name) == machine and node and node["Resources"].get("CPU") == cores:
                return device
        return None

    def result(self) -> tuple[ClusterDevice, dict[tuple[str, str], LinkSpec], bool]:
        """(its device, its links to the stages' nodes, whether its figures are a calibrated twin's)."""
        twin = self._twin()
        if twin is not None:
            share, burst = ray.get(self._refs["kept"])
            spec = replace(twin.spec, name=self.name, sustained_share=share, burst_s=burst)
        else:
            spec = DeviceSpec.from_dict(ray.get(self._profile))
        links = {}
        for name, trips in self._refs["links"].items():
            sizes, _ = ray.get(trips)
            links[(self.name, name)] = link_from_hand_overs(sizes, f"{self.name}->{name}")
        memory = float(self.node["Resources"].get("memory", spec.memory_bytes))
        ip = self.node["NodeManagerAddress"]  # (as profile's cluster files place nodes; its id where shared)
        shared = sum(n["Alive"] and n["NodeManagerAddress"] == ip for n in ray.nodes()) > 1
        device = ClusterDevice(self.name, spec, memory, self.node["NodeID"] if shared else ip, "cpu")
        log.info("node %s joined: %s", self.name, "figures of its machine's " + twin.name if twin else "profiled")
        return device, links, twin is not None

    def close(self) -> None:
        for probe in [self._probe, self._driver, *self._others.values()]:
            if probe is not None:
                ray.kill(probe)
