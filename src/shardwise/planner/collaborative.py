"""Split layers between a client and a server (SplitLLM-style), on plain numbers.

The input starts and the output ends on the client; every change of side costs
`switch`. Minimise the server's work subject to latency <= SLA and the client's
memory, with any number of switches.

A DP over layers keeps, at each layer boundary and side, the Pareto set of partial
placements by (server work, latency, client memory): a placement dominated in all
three can never become better, so pruning it is exact. The sets stay small because
the three quantities move together (a layer on the server adds work, saves client
memory, and changes latency by the speed difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from shardwise.errors import ShardwiseError

CLIENT, SERVER = "client", "server"


@dataclass(frozen=True)
class SplitResult:
    server_work: float  # seconds of server compute per step
    latency: float  # seconds: every layer's compute plus the switches
    client_memory: float  # bytes of the layers on the client
    placement: list[str]  # "client" or "server", per layer


def _pareto_placements(client: Sequence[float], server: Sequence[float], switch: float, memory: Sequence[float],
                       client_capacity: float, sla: float | None) -> list[SplitResult]:
    n = len(client)
    if not (len(server) == len(memory) == n) or n == 0:
        raise ShardwiseError("client, server and memory need one entry per layer (and at least one layer)")
    if min(*client, *server, *memory, switch, client_capacity) < 0:
        raise ShardwiseError("times, memory and capacity must be non-negative")
    # label: (server work, latency, client memory, placement so far); per side of the last layer
    labels: dict[str, list[tuple[float, float, float, tuple[str, ...]]]] = {CLIENT: [(0.0, 0.0, 0.0, ())],
                                                                            SERVER: []}
    for layer in range(n):
        grown: dict[str, list] = {CLIENT: [], SERVER: []}
        for side, entries in labels.items():
            for work, time, mem, placed in entries:
                for new_side in (CLIENT, SERVER):
                    t = time + (switch if new_side != side else 0.0)
                    if new_side == CLIENT:
                        t, m, w = t + client[layer], mem + memory[layer], work
                    else:
                        t, m, w = t + server[layer], mem, work + server[layer]
                    if m <= client_capacity and (sla is None or t <= sla):
                        grown[new_side].append((w, t, m, (*placed, new_side)))
        labels = {side: _nondominated(entries) for side, entries in grown.items()}
    finished = labels[CLIENT] + [(w, t + switch, m, p) for w, t, m, p in labels[SERVER]]  # back to the client
    return [SplitResult(w, t, m, list(p)) for w, t, m, p in finished if sla is None or t <= sla]


def _nondominated(entries: list) -> list:
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    kept: list = []
    for e in entries:
        if not any(k[0] <= e[0] and k[1] <= e[1] and k[2] <= e[2] for k in kept):
            kept.append(e)
    return kept


def split_client_server(client: Sequence[float], server: Sequence[float], switch: float, memory: Sequence[float],
                        client_capacity: float, sla: float) -> SplitResult:
    """The placement with the least server work whose latency meets the SLA."""
    feasible = _pareto_placements(client, server, switch, memory, client_capacity, sla)
    if not feasible:
        fastest = _pareto_placements(client, server, switch, memory, client_capacity, None)
        if not fastest:
            raise ShardwiseError("no split fits the client's memory: even the all-server placement does not "
                                 "(check the client capacity)")
        best = min(r.latency for r in fastest)
        raise ShardwiseError(f"no split meets the SLA of {sla * 1e3:.1f} ms: the fastest placement takes "
                             f"{best * 1e3:.1f} ms; loosen the SLA or use a faster server or link")
    return min(feasible, key=lambda r: (r.server_work, r.latency))


def split_frontier(client: Sequence[float], server: Sequence[float], switch: float, memory: Sequence[float],
                   client_capacity: float) -> list[SplitResult]:
    """Server work as the SLA loosens: for each latency, the least server work that reaches it
    (latency ascending, server work strictly descending)."""
    frontier: list[SplitResult] = []
    for r in sorted(_pareto_placements(client, server, switch, memory, client_capacity, None),
                    key=lambda r: (r.latency, r.server_work)):
        if not frontier or r.server_work < frontier[-1].server_work - 1e-12 * max(1.0, frontier[-1].server_work):
            frontier.append(r)
    return frontier
