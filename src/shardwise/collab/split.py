"""Which layers a client runs: per-layer costs of each side, and the split a policy picks.

Costs are seconds per decoder layer for one decode token, the last layer carrying the
final norm, LM head and sampling. A side measures its own (`measure`) or takes them
from a `shardwise profile` file through the estimator. The split's latency is the
client's layers, the server's layers (plus the wait for its current step), and a
`switch` (half the measured round trip) each time the hidden states change sides;
the input starts and the output ends on the client.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardwise.engine.shard import ShardModel
from shardwise.errors import ShardwiseError
from shardwise.model.product import head_product
from shardwise.model.spec import ModelSpec
from shardwise.perf.memory import stage_bytes
from shardwise.perf.profile import timed
from shardwise.planner.collaborative import CLIENT, SERVER, SplitResult, split_client_server

POLICIES = ("dp", "greedy", "server")


@dataclass(frozen=True)
class Split:
    segments: list[tuple[str, int, int]]  # (side, first layer, end layer), in order
    latency_s: float  # predicted per decode token
    server_work_s: float  # server compute per decode token
    note: str | None = None  # why the policy's own choice was not taken


@torch.inference_mode()
def measure(shard: ShardModel, repeats: int = 15) -> list[float]:
    """Per-layer decode costs timed on this machine: a decode step through `shard` at a short
    context (every layer of the model is taken to cost what these do) and one LM head."""
    spec = shard.spec
    head = shard.head if shard.is_last else head_product(
        torch.randn(spec.vocab_size, spec.hidden_size, dtype=shard.dtype) / 30)
    x = torch.randn(1, spec.hidden_size, dtype=shard.dtype)
    head_s = timed(lambda: head(x), shard.device, repeats)  # float or quantised
    seq = -1  # a sequence id no caller uses
    shard.allocate(seq)
    try:
        def step(tokens: int) -> None:
            inputs = (torch.zeros(tokens, dtype=torch.long) if shard.is_first
                      else torch.randn(tokens, spec.hidden_size))
            shard.forward([seq], [tokens], inputs)

        step(32)
        step_s = timed(lambda: step(1), shard.device, repeats)
    finally:
        shard.free(seq)
    layer_s = max(step_s - (head_s if shard.is_last else 0.0), 1e-7) / (shard.end - shard.start)
    return [layer_s] * (spec.num_layers - 1) + [layer_s + head_s]


def choose(spec: ModelSpec, client: list[float], server: list[float], switch_s: float, client_memory: float,
           sla_s: float, policy: str = "dp", insist: bool = False, context: int = 2048) -> Split:
    """The split `policy` picks: "dp" the least server work within the SLA (SplitLLM's DP),
    "greedy" the most leading layers on the client within the SLA, "server" none on the
    client. Where the SLA cannot be met: everything on the server with a note, or a
    ShardwiseError when `insist`."""
    if policy not in POLICIES:
        raise ShardwiseError(f"unknown split policy '{policy}': use one of {', '.join(POLICIES)}")
    n = spec.num_layers
    if len(client) != n or len(server) != n:
        raise ShardwiseError(f"layer costs need one entry per layer ({n}), got {len(client)} for the client")
    memory = [stage_bytes(spec, (i, i + 1), "float32", context) for i in range(n)]
    everything_on_server = SplitResult(sum(server), sum(server) + 2 * switch_s, 0.0, [SERVER] * n)
    try:
        if policy == "dp":
            result = split_client_server(client, server, switch_s, memory, client_memory, sla_s)
        elif policy == "greedy":
            result = _greedy(client, server, switch_s, memory, client_memory, sla_s)
        else:
            result = everything_on_server
        note = None
    except ShardwiseError as e:
        if insist:
            raise
        result, note = everything_on_server, f"{e}; running every layer on the server instead"
    return Split(_segments(result.placement), result.latency, result.server_work, note)


def _greedy(client, server, switch_s, memory, capacity, sla_s) -> SplitResult:
    """The longest run of leading layers on the client that meets the SLA and fits."""
    n = len(client)
    for k in range(n, -1, -1):
        latency = sum(client[:k]) + sum(server[k:]) + (2 * switch_s if k < n else 0.0)
        if latency <= sla_s and sum(memory[:k]) <= capacity:
            return SplitResult(sum(server[k:]), latency, sum(memory[:k]), [CLIENT] * k + [SERVER] * (n - k))
    raise ShardwiseError(f"no split meets the SLA of {sla_s * 1e3:.1f} ms")


def _segments(placement: list[str]) -> list[tuple[str, int, int]]:
    segments: list[tuple[str, int, int]] = []
    for layer, side in enumerate(placement):
        if segments and segments[-1][0] == side:
            segments[-1] = (side, segments[-1][1], layer + 1)
        else:
            segments.append((side, layer, layer + 1))
    return segments
