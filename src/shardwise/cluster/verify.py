"""Spot checks of stages on nodes the driver does not trust (Petals' open problem).

A node that joins a cluster runs whatever it runs: tampered weights in its cache, a broken
kernel, or a lie on purpose. With a share of steps to check, the pipeline picks one sequence
of such a step at random and hands what every stage returned for it to a Verifier on the
driver's node. The Verifier recomputes that sequence from its token ids through the same
split of the layers (a prefill of its whole context, so no untrusted KV is used), and compares
each stage's rows with its own: hidden states within a relative error, and at the last stage
a greedy token against the trusted logits. The first stage that differs is the liar (the
stages after it only computed on its output). A checked step's tokens are given out only once
its check passed, so with every step checked nothing a liar computed reaches a client.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import ray
import torch

from shardwise.engine.sampling import SamplingParams
from shardwise.engine.shard import ShardModel
from shardwise.engine.worker import Sampled
from shardwise.model.weights import open_weights

# the relative error a stage's rows may show against the recompute: a decode step's kernels and
# batch differ from a prefill's (measured on CPU: float32 ~1e-6, int8 and int4 ~2e-4; bf16 and
# fp16 round far more coarsely); swapped or corrupted weights are off by far more
TOLERANCE = {"float32": 1e-3, "int8": 3e-3, "int4": 3e-3, "bfloat16": 5e-2, "float16": 5e-2}
LOGIT_TOLERANCE = 1e-2  # how far below the trusted best logit a greedy token may be (ties)


class Checked(NamedTuple):
    """One sequence of one step: its token ids up to and including the step's chunk (`rows`
    long), where that chunk's rows begin in the step's hidden states, the sequence's row in the
    last stage's tokens, and whether its token is greedy (so the last stage's choice is checkable)."""

    tokens: list[int]
    rows: int
    offset: int
    row: int
    greedy: bool


class Lie(NamedTuple):
    stage: int
    detail: str


def is_greedy(params: SamplingParams) -> bool:
    """Whether the token is the trusted argmax (nothing but the logits chose it)."""
    return (params.temperature == 0 and not params.logit_bias and params.constraint is None
            and params.repetition_penalty == 1 and not params.presence_penalty and not params.frequency_penalty)


@ray.remote(num_cpus=0)
class Verifier:
    """The driver's node's copy of the layers [0, end of the last checked stage), split as the
    plan splits them, on its CPU. dtypes: each stage's weight dtype (how closely it can agree);
    dtype: the pipeline's (quantised weights are recomputed quantised, the rest in float32)."""

    def __init__(self, model_path: str, spans: list[tuple[int, int]], dtypes: list[str], dtype: str | None):
        weights = open_weights(Path(model_path))
        dtype = dtype if dtype in ("int8", "int4") else None  # (float32 on this CPU: the truth to within them)
        self.shards = [ShardModel(weights.spec, span, weights=weights, dtype=dtype) for span in spans]
        self.tolerances = [TOLERANCE[d] for d in dtypes]

    def check(self, checked: Checked, *outputs: tuple[np.ndarray, tuple] | Sampled) -> Lie | None:
        """outputs: what each stage returned for the step (Ray hands them over once computed);
        the stages past the Verifier's layers are not checked."""
        x = torch.tensor(checked.tokens)
        for stage, (shard, output, tolerance) in enumerate(zip(self.shards, outputs, self.tolerances, strict=False)):
            shard.allocate(0)
            try:
                x = shard.forward([0], [len(checked.tokens)], x)
            finally:
                shard.free(0)
            if isinstance(output, Sampled):
                token = output.tokens[checked.row]
                if checked.greedy and token is not None and x[-1, token] < x[-1].max() - LOGIT_TOLERANCE:
                    return Lie(stage, f"chose token {token} where the trusted best is {int(x[-1].argmax())}")
                continue
            want = x[-checked.rows:].float()
            got = torch.tensor(output[0][checked.offset:checked.offset + checked.rows])  # (a copy: Ray's is read-only)
            error = float((got - want).norm() / want.norm().clamp_min(1e-12))
            if not error <= tolerance:  # (a NaN is a lie too)
                return Lie(stage, f"returned hidden states {error:.2g} away from a trusted recompute (at most "
                                  f"{tolerance:g} allowed)")
        return None
