"""Prometheus metrics of a server, named like vLLM's (prefix shardwise: instead of vllm:),
each server on its own registry."""

from __future__ import annotations

import math
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)
RECOVERY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
QUANTILES = (0.5, 0.9, 0.99)
WINDOW_S = 60.0  # snapshot() percentiles cover the requests of about this long


class Metrics:
    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        labels = {"model_name": model}

        def make(kind, name, doc, extra_labels=(), **kwargs):
            return kind(f"shardwise:{name}", doc, ["model_name", *extra_labels], registry=self.registry, **kwargs)

        self.ttft = make(Histogram, "time_to_first_token_seconds", "Time to first token.",
                         buckets=TTFT_BUCKETS).labels(**labels)
        self.tpot = make(Histogram, "time_per_output_token_seconds", "Time between consecutive output tokens.",
                         buckets=TPOT_BUCKETS).labels(**labels)
        self.e2e = make(Histogram, "e2e_request_latency_seconds", "Request latency, arrival to last token.",
                        buckets=E2E_BUCKETS).labels(**labels)
        self.running = make(Gauge, "num_requests_running", "Sequences in the running batch.").labels(**labels)
        self.waiting = make(Gauge, "num_requests_waiting", "Sequences queued for admission.").labels(**labels)
        self.queue_age = make(Gauge, "queue_oldest_wait_seconds",
                              "How long the oldest queued sequence has waited for admission.").labels(**labels)
        self._rejected = make(Counter, "requests_rejected",
                              "Requests refused before any work, by reason (queue_full, queue_timeout, "
                              "shutting_down): each got a 503 with Retry-After.", extra_labels=["reason"])
        self.kv_usage = make(Gauge, "kv_cache_usage_perc",
                             "Fraction of the KV cache reserved by running sequences (1 = full).").labels(**labels)
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens prefilled.").labels(**labels)
        self.preemptions = make(Counter, "num_preemptions", "Running sequences paused (or their KV given "
                                "back) for higher-ranked ones, under --policy mlfq.").labels(**labels)
        self.prefix_queries = make(Counter, "prefix_cache_queries",
                                   "Prompt tokens looked up in the prefix cache.").labels(**labels)
        self.prefix_hits = make(Counter, "prefix_cache_hits",
                                "Prompt tokens found in the prefix cache (their KV reused, not prefilled)."
                                ).labels(**labels)
        self.prefix_hit_rate = make(Gauge, "prefix_cache_hit_rate",
                                    "Prefix cache hits over queries, in tokens, since the start.").labels(**labels)
        self.prefix_blocks = make(Gauge, "prefix_cache_blocks", "KV blocks the prefix cache holds.").labels(**labels)
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated.").labels(**labels)
        self.spec_drafts = make(Counter, "spec_decode_num_drafts",
                                "Sequences' steps that verified drafts (speculative decoding).").labels(**labels)
        self.spec_draft_tokens = make(Counter, "spec_decode_num_draft_tokens",
                                      "Tokens drafted for speculative decoding.").labels(**labels)
        self.spec_accepted = make(Counter, "spec_decode_num_accepted_tokens",
                                  "Drafted tokens the model accepted.").labels(**labels)
        self.spec_draft_s = make(Counter, "spec_decode_draft_seconds", "Seconds spent drafting.").labels(**labels)
        self.spec_verify_s = make(Counter, "spec_decode_verify_seconds",
                                  "Seconds of the steps that verified drafts, each from its submission to its "
                                  "tokens (steps of micro-batches in flight overlap).").labels(**labels)
        self.prefill_handoffs = make(Counter, "prefill_handoffs",
                                     "Requests whose prompt ran on the prefill pool (disaggregated prefill) and "
                                     "whose KV then moved to the decode pool.").labels(**labels)
        self._success = make(Counter, "request_success", "Finished sequences by reason.",
                             extra_labels=["finished_reason"])
        self.stage_failures = make(Counter, "stage_failures", "Pipeline stages lost (died or hung).").labels(**labels)
        self.recoveries = make(Counter, "stage_recoveries", "Lost stages replaced and resumed.").labels(**labels)
        self.replayed_tokens = make(Counter, "replayed_tokens",
                                    "Tokens prefilled again to rebuild lost KV caches.").labels(**labels)
        self.replans = make(Counter, "replans", "Moves to a new plan after a node's speed drifted from its "
                            "profile.").labels(**labels)
        self._stage_seconds = make(Gauge, "stage_step_seconds",
                                   "Each pipeline stage's median step time over the drift window: predicted "
                                   "from the cluster file's profiles, and measured.", extra_labels=["stage", "source"])
        self.recovery_time = make(Histogram, "recovery_seconds", "From noticing a lost stage to resuming.",
                                  buckets=RECOVERY_BUCKETS).labels(**labels)
        self.collab_sessions = make(Counter, "collab_sessions", "Collaborative sessions opened.").labels(**labels)
        self.collab_layer_tokens = make(Counter, "collab_layer_tokens",
                                        "Tokens each layer processed in collaborative sessions, by side "
                                        "(server: computed here; client: offloaded).", extra_labels=["side", "layer"])
        self.collab_seconds = make(Counter, "collab_server_seconds",
                                   "Server compute spent on collaborative segments.").labels(**labels)
        self._model = model
        self._stages_timed = 0
        self._history: deque[tuple[float, dict]] = deque()  # (time, histogram buckets) of past snapshots

    def rejected(self, reason: str) -> None:
        self._rejected.labels(model_name=self._model, reason=reason).inc()

    def stage_timing(self, timing: list[tuple[float, float]]) -> None:
        if len(timing) != self._stages_timed:  # a new plan: no stale stages
            self._stage_seconds.clear()
            self._stages_timed = len(timing)
        for stage, pair in enumerate(timing):
            for source, seconds in zip(("predicted", "measured"), pair, strict=True):
                self._stage_seconds.labels(model_name=self._model, stage=str(stage), source=source).set(seconds)

    def finished(self, reason: str) -> None:
        self._success.labels(model_name=self._model, finished_reason=reason).inc()

    def export(self) -> bytes:
        return generate_latest(self.registry)

    def snapshot(self) -> dict:
        """The numbers export() gives, as a dict (a metric with labels besides the model's maps
        their values to its own), plus each histogram's percentiles over the last WINDOW_S
        seconds ({"p50": ..., "count": n}; None where nothing was observed)."""
        values, buckets = {}, {}
        for family in self.registry.collect():
            for sample in family.samples:
                name = sample.name.removeprefix("shardwise:")
                labels = {k: v for k, v in sample.labels.items() if k != "model_name"}
                if name.endswith("_bucket"):
                    buckets.setdefault(name.removesuffix("_bucket"), []).append((float(labels["le"]), sample.value))
                elif not name.endswith("_created"):
                    if labels:
                        values.setdefault(name, {})["/".join(labels.values())] = sample.value
                    else:
                        values[name] = sample.value
        now = time.monotonic()
        self._history.append((now, buckets))
        while len(self._history) > 1 and self._history[1][0] <= now - WINDOW_S:
            self._history.popleft()  # keep the newest snapshot at least WINDOW_S old as the baseline
        base = self._history[0][1] if len(self._history) > 1 else {}
        for name, cumulative in buckets.items():
            old = dict(base.get(name, []))
            recent = [(le, count - old.get(le, 0.0)) for le, count in cumulative]
            total = recent[-1][1]
            values[name] = {f"p{round(q * 100)}": histogram_quantile(q, recent) if total else None for q in QUANTILES}
            values[name]["count"] = total
        return values


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's estimate of quantile q from cumulative (upper bound, count) buckets: linear
    within the bucket holding it; the highest finite bound if it falls in the +Inf bucket."""
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank and count > below:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower
