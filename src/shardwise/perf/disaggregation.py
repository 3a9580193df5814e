"""Colocated chunked prefill against disaggregated pools (Splitwise, DistServe): what each layout
gives a workload where long prompts arrive while sequences decode.

Colocated, a prompt's chunks join the decode steps (Sarathi-Serve): each such step runs the
decodes and a chunk, so the decodes' inter-token latency (ITL) rises to that step's time for as
many steps as the prompt has chunks, and the prompt's TTFT is those steps. Disaggregated, the
decode pool steps its decodes alone on its own cores, except one step per prompt that also takes
in the prompt's KV (a copy into its pool), and the prefill pool runs each prompt alone on its
own cores: its TTFT is the prompt's chunks there, plus any wait behind earlier prompts. In both
layouts the prompt's own later tokens then decode beside the others (reading its long context),
and between prompts every step is a plain decode step; the share of slower steps sets the
percentiles.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardwise.model.spec import ModelSpec
from shardwise.perf.estimate import Deployment, step_time
from shardwise.perf.hardware import DeviceSpec
from shardwise.perf.memory import kv_bytes
from shardwise.perf.operators import Precision, Work


@dataclass(frozen=True)
class Workload:
    decoding: int  # sequences decoding all along
    context: int  # their tokens so far (prompt and output), on average
    prompt: int  # tokens of each long prompt that arrives
    interval_s: float  # seconds between two long prompts' arrivals
    chunk: int  # tokens a step may run (colocated: decodes and a prompt's chunk together)
    output: int = 1  # tokens each long prompt generates


@dataclass(frozen=True)
class LayoutPrediction:
    ttft_s: float  # a long prompt's time to its first token
    # the decode steps between two arrivals: (seconds, how many), those a prompt's chunk (colocated),
    # its KV (disaggregated) or its later tokens join first, then the plain ones
    steps: tuple[tuple[float, float], ...]
    utilisation: float  # of the cores that prefill the prompts (above 1: the prompts queue without end)

    def itl_s(self, q: float) -> float:
        """The q-quantile of the decodes' inter-token latency (each step is one token's)."""
        total, seen = sum(n for _, n in self.steps), 0.0
        for seconds, n in sorted(self.steps, reverse=True):
            seen += n
            if seen >= (1 - q) * total:
                return seconds
        return min(seconds for seconds, _ in self.steps)

    @property
    def tpot_s(self) -> float:
        """The mean seconds per output token of a decoding sequence."""
        return sum(t * n for t, n in self.steps) / sum(n for _, n in self.steps)

    def request_tpot_s(self, q: float, tokens: int) -> float:
        """The q-quantile of a decode request's TPOT (its mean seconds per token) over `tokens`
        tokens, for requests starting at any step between two arrivals alike: those that meet
        the stalled steps get the tail."""
        cycle = [seconds for seconds, n in self.steps for _ in range(round(n))] or [self.steps[0][0]]
        means = sorted(sum(cycle[(start + i) % len(cycle)] for i in range(tokens)) / tokens
                       for start in range(len(cycle)))
        return means[min(len(means) - 1, int(q * len(means)))]

    def to_dict(self) -> dict[str, float]:
        return {"ttft_s": self.ttft_s, "utilisation": self.utilisation, "itl_p50_s": self.itl_s(0.5),
                "itl_p99_s": self.itl_s(0.99), "tpot_s": self.tpot_s}


def colocated(spec: ModelSpec, device: DeviceSpec, w: Workload, p: Precision) -> LayoutPrediction:
    """Every step on one device: the decodes, and a prompt's chunk beside them while one waits."""
    whole = Deployment.single(spec, device)
    per_chunk = max(w.chunk - w.decoding, 1)
    decode = Work.decode(w.decoding, w.context)
    mixed = [step_time(spec, whole, decode + Work(((min(per_chunk, w.prompt - k), k),)), p).latency
             for k in range(0, w.prompt, per_chunk)]
    plain = step_time(spec, whole, decode, p).latency
    beside = [_with_prompt(spec, whole, w, p)] * (w.output - 1)
    return LayoutPrediction(sum(mixed), _between_arrivals(mixed + beside, plain, w.interval_s),
                            sum(mixed) / w.interval_s)


def disaggregated(spec: ModelSpec, prefill_device: DeviceSpec, decode_device: DeviceSpec, w: Workload,
                  p: Precision) -> LayoutPrediction:
    """The prompts on one device, alone in chunks of w.chunk tokens; the decodes on the other,
    which takes in each prompt's KV (read and written once) beside one of its steps."""
    prefill = Deployment.single(spec, prefill_device)
    prefilling = sum(step_time(spec, prefill, Work(((min(w.chunk, w.prompt - k), k),)), p).latency
                     for k in range(0, w.prompt, w.chunk))
    decoding = Deployment.single(spec, decode_device)
    plain = step_time(spec, decoding, Work.decode(w.decoding, w.context), p).latency
    kv = kv_bytes(spec, (0, spec.num_layers), w.prompt, p.kv)
    taking_in = 2 * kv / (decode_device.bandwidth * decode_device.memory_efficiency)
    beside = [_with_prompt(spec, decoding, w, p)] * (w.output - 1)  # (a one-token answer never moves)
    if beside:
        beside[0] += taking_in
    utilisation = prefilling / w.interval_s
    # prompts arriving evenly, each served alone: a wait grows only once the pool is saturated
    waiting = 0.0 if utilisation < 1 else prefilling * (utilisation - 1)
    return LayoutPrediction(prefilling + waiting, _between_arrivals(beside, plain, w.interval_s), utilisation)


def _with_prompt(spec: ModelSpec, deployment: Deployment, w: Workload, p: Precision) -> float:
    """A decode step of the decoding sequences and a long prompt's sequence after its prompt."""
    return step_time(spec, deployment, Work.decode(w.decoding, w.context) + Work.decode(1, w.prompt), p).latency


def _between_arrivals(stalled: list[float], plain_s: float, interval_s: float) -> tuple[tuple[float, float], ...]:
    """The decode steps between two arrivals: the stalled ones, and plain ones for the time left."""
    return (*((t, 1.0) for t in stalled), (plain_s, max(interval_s - sum(stalled), 0.0) / plain_s))
