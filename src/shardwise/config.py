"""EngineConfig: the runtime options of one engine, with their defaults in one place. The LLM
facade, `shardwise generate` and `shardwise serve` all read them from here."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from shardwise.engine.policy import POLICIES
from shardwise.errors import ShardwiseError


@dataclass(frozen=True)
class SpeculativeConfig:
    """draft: "ngram" (prompt lookup), a weight format of the model's own weights (int4, int8,
    bfloat16, float32) or a model (catalog name, .gguf or HF directory) with the same vocabulary.
    gamma: most tokens drafted per step (each sequence adapts below it to what it accepts);
    None: 8 for a draft model (int4 drafts agree with the fp32 model's greedy tokens nearly
    always, and a longer run pays for the verification step), 4 for prompt lookup. ngram: the
    longest and shortest runs of tokens prompt lookup matches. max_batch: sequences speculate
    only while at most this many decode (a bigger batch keeps the cores busy already, and
    every rejected draft's compute is lost); None: 2 for a draft model (measured on a 2-core
    CPU: at batch 4 its drafts cost what they save), 8 for prompt lookup (its drafts are free)."""

    draft: str = "ngram"
    gamma: int | None = None
    max_ngram: int = 4
    min_ngram: int = 2
    max_batch: int | None = None

    def __post_init__(self) -> None:
        lookup = self.draft == "ngram"
        if self.gamma is None:
            object.__setattr__(self, "gamma", 4 if lookup else 8)
        if self.max_batch is None:
            object.__setattr__(self, "max_batch", 8 if lookup else 2)
        if not self.draft:
            raise ShardwiseError("speculative decoding needs a drafter: ngram, a weight format such as int4, "
                                 "or a model with the same vocabulary")
        if self.gamma < 1 or not 1 <= self.min_ngram <= self.max_ngram or self.max_batch < 1:
            raise ShardwiseError("speculative decoding needs gamma >= 1, 1 <= min_ngram <= max_ngram and "
                                 f"max_batch >= 1, got {self}")


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"  # cpu, cuda or cuda:N (a pipeline's stages take theirs from the plan)
    dtype: str | None = None  # weights: float32, bfloat16, float16, int8, int4 (None: float32 on CPUs)
    threads: int | None = None  # torch CPU threads in this process
    max_num_seqs: int = 32  # sequences in the running batch at most
    max_batch_tokens: int = 512  # tokens per step at most (decodes + prefill chunks)
    kv_tokens: int = 16384  # KV cache, in tokens, that running sequences may reserve (each stage must fit it)
    # each stage's KV pool holds kv_tokens from the start (False: it grows as sequences need room,
    # each growth copying the pool and stalling that step)
    preallocate_kv: bool = False
    micro_batches: int | None = None  # pipeline steps in flight (None: one per compute resource)
    stage_timeout: float = 60.0  # seconds without a finished pipeline step before a stage counts as lost
    spare_stages: bool = False  # keep a warm empty stage process per node, for fast recovery
    # with a cluster file: a node whose steps take this many times the predicted time (or 1/this)
    # for drift_window_s seconds has its speed corrected, and the model re-planned if that pays (0: never)
    drift_threshold: float = 1.5
    drift_window_s: float = 10.0
    # with a cluster file: a Ray node outside it that joins is measured and offered to the planner
    join_nodes: bool = True
    # a pipeline stage whose node lacks the model file fetches its layers' bytes from the driver's node
    # into its node's cache (None: where the node lacks the file; True: always; False: never)
    fetch_weights: bool | None = None
    # a package index (PEP 503 simple URL) that a catalog model comes from: the driver's, and each stage's
    # node that lacks the model fetches it from there itself rather than from the driver (None: pip's own
    # index for the driver, the driver and peers for the nodes)
    weights_index: str | None = None
    # the share of steps whose stages on other nodes than the driver's are checked against a recompute
    # on the driver's node (see cluster/verify.py): a stage that differs is reported and planned around
    verify_share: float = 0.0
    # a move to a new plan carries the running sequences' KV to the new stages (False: replays them)
    move_kv: bool = True
    # full KV blocks stay cached after their sequence ends, for later prompts that start the same way
    prefix_cache: bool = True
    # which sequences run first: fcfs (arrival order), or mlfq (FastServe's preemptive skip-join MLFQ)
    policy: str = "fcfs"
    # with a prefill pool (disaggregated prefill): prompts of at least this many tokens run there, and
    # shorter ones beside the decodes on the decode pool (their chunks hold the decodes up only briefly)
    prefill_pool_min_tokens: int = 128
    # speculative decoding's drafter: "ngram" (prompt lookup), a cheaper format of the model's own
    # weights ("int4"), a model with the same vocabulary, or a SpeculativeConfig; None: off
    speculative: SpeculativeConfig | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.speculative, str):
            object.__setattr__(self, "speculative", SpeculativeConfig(draft=self.speculative))
        if min(self.max_num_seqs, self.max_batch_tokens, self.kv_tokens, self.prefill_pool_min_tokens) < 1 or \
                self.stage_timeout <= 0:
            raise ShardwiseError("max_num_seqs, max_batch_tokens, kv_tokens and prefill_pool_min_tokens must each be "
                                 "at least 1, and stage_timeout positive")
        if not 0 <= self.verify_share <= 1:
            raise ShardwiseError(f"the share of steps to check (verify_share, --verify-stages) is from 0 to 1, got "
                                 f"{self.verify_share}")
        if self.policy not in POLICIES:
            raise ShardwiseError(f"unknown scheduling policy '{self.policy}': use {' or '.join(POLICIES)}")
        if not (self.drift_threshold == 0 or self.drift_threshold > 1) or self.drift_window_s <= 0:
            raise ShardwiseError(f"drift_threshold must be above 1 (or 0: never re-plan for speed), got "
                                 f"{self.drift_threshold}, and drift_window_s positive, got {self.drift_window_s}")

    def with_options(self, **options: Any) -> EngineConfig:
        """This config with some fields changed; an unknown name is a ShardwiseError listing the known."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ShardwiseError(f"unknown engine options {unknown}: use {', '.join(sorted(known))}")
        return replace(self, **options)


# A server keeps each step short (its decodes wait on the prefill chunks beside them), holds more
# requests' KV at once (in a pool sized once, at the start), and keeps spare stages so that a lost
# one is replaced in seconds.
SERVING = EngineConfig(max_batch_tokens=256, kv_tokens=32768, spare_stages=True, preallocate_kv=True)
