"""Serving workloads: prompt and output lengths shaped like ShareGPT's.

The survey behind the seed quotes means of 161 prompt and 338 output tokens; lengths
are drawn from lognormal distributions with those means (ShareGPT's are long-tailed),
scaled down by `scale` for small machines. Prompts are random token ids sent to
/v1/completions, so each request has exactly its prompt length, and outputs run to
exactly their length (ignore_eos), as vLLM's benchmarks do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAREGPT_MEAN_PROMPT = 161
SHAREGPT_MEAN_OUTPUT = 338
SIGMA = 0.8  # lognormal shape: a long tail, as in ShareGPT
TOKEN_RANGE = (1000, 30000)  # ordinary vocabulary, away from special tokens


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_tokens: int


def _lognormal(rng: np.random.Generator, mean: float, n: int, low: int, high: int) -> np.ndarray:
    mu = math.log(mean) - SIGMA**2 / 2  # so the distribution's mean is `mean`
    return np.clip(np.rint(rng.lognormal(mu, SIGMA, n)), low, high).astype(int)


def sharegpt_like(n: int, *, scale: float = 1.0, seed: int = 0, max_prompt: int = 1024,
                  max_output: int = 1024) -> list[BenchRequest]:
    rng = np.random.default_rng(seed)
    prompts = _lognormal(rng, SHAREGPT_MEAN_PROMPT * scale, n, 4, max_prompt)
    outputs = _lognormal(rng, SHAREGPT_MEAN_OUTPUT * scale, n, 2, max_output)
    return [BenchRequest(rng.integers(*TOKEN_RANGE, size=p).tolist(), int(o))
            for p, o in zip(prompts, outputs, strict=True)]
