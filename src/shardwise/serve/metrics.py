"""Prometheus metrics of a server, named like vLLM's (prefix shardwise: instead of vllm:),
each server on its own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)
RECOVERY_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


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
        self.kv_usage = make(Gauge, "kv_cache_usage_perc",
                             "Fraction of the KV cache reserved by running sequences (1 = full).").labels(**labels)
        self.prompt_tokens = make(Counter, "prompt_tokens", "Prompt tokens prefilled.").labels(**labels)
        self.generation_tokens = make(Counter, "generation_tokens", "Tokens generated.").labels(**labels)
        self._success = make(Counter, "request_success", "Finished sequences by reason.",
                             extra_labels=["finished_reason"])
        self.stage_failures = make(Counter, "stage_failures", "Pipeline stages lost (died or hung).").labels(**labels)
        self.recoveries = make(Counter, "stage_recoveries", "Lost stages replaced and resumed.").labels(**labels)
        self.replayed_tokens = make(Counter, "replayed_tokens",
                                    "Tokens prefilled again to rebuild lost KV caches.").labels(**labels)
        self.recovery_time = make(Histogram, "recovery_seconds", "From noticing a lost stage to resuming.",
                                  buckets=RECOVERY_BUCKETS).labels(**labels)
        self.collab_sessions = make(Counter, "collab_sessions", "Collaborative sessions opened.").labels(**labels)
        self.collab_layer_tokens = make(Counter, "collab_layer_tokens",
                                        "Tokens each layer processed in collaborative sessions, by side "
                                        "(server: computed here; client: offloaded).", extra_labels=["side", "layer"])
        self.collab_seconds = make(Counter, "collab_server_seconds",
                                   "Server compute spent on collaborative segments.").labels(**labels)
        self._model = model

    def finished(self, reason: str) -> None:
        self._success.labels(model_name=self._model, finished_reason=reason).inc()

    def export(self) -> bytes:
        return generate_latest(self.registry)
