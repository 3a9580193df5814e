"""Serving workloads, as sessions of requests sent one after another (most sessions hold one).

sharegpt: prompt and output lengths shaped like ShareGPT's. The survey behind the seed
quotes means of 161 prompt and 338 output tokens; lengths are drawn from lognormal
distributions with those means (ShareGPT's are long-tailed), scaled down by `scale` for
small machines.
chat: multi-turn conversations sharing one system prompt; each turn resends the system
prompt and the whole conversation so far (what prefix caching is for).
mixed: a heavy-tailed mix of short answers and a few very long ones (what preemptive
scheduling is for).
Prompts are random token ids sent to /v1/completions, so each request has exactly its
prompt length, and outputs run to exactly their length (ignore_eos), as vLLM's benchmarks do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SHAREGPT_MEAN_PROMPT = 161
SHAREGPT_MEAN_OUTPUT = 338
SIGMA = 0.8  # lognormal shape: a long tail, as in ShareGPT
TOKEN_RANGE = (1000, 30000)  # ordinary vocabulary, away from special tokens
CHAT_MEAN_USER = 48  # tokens of a user's message
CHAT_MEAN_REPLY = 96  # tokens of an assistant's reply
MIXED_MEAN_SHORT = 24  # tokens of a short answer


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_tokens: int


def _lognormal(rng: np.random.Generator, mean: float, n: int, low: int, high: int) -> np.ndarray:
    mu = math.log(mean) - SIGMA**2 / 2  # so the distribution's mean is `mean`
    return np.clip(np.rint(rng.lognormal(mu, SIGMA, n)), low, high).astype(int)


def sharegpt_like(n: int, *, scale: float = 1.0, seed: int = 0, max_prompt: int = 1024,
                  max_output: int = 1024) -> list[list[BenchRequest]]:
    rng = np.random.default_rng(seed)
    prompts = _lognormal(rng, SHAREGPT_MEAN_PROMPT * scale, n, 4, max_prompt)
    outputs = _lognormal(rng, SHAREGPT_MEAN_OUTPUT * scale, n, 2, max_output)
    return [[BenchRequest(_tokens(rng, p), int(o))] for p, o in zip(prompts, outputs, strict=True)]


def chat(n: int, *, turns: int = 4, system_tokens: int = 512, scale: float = 1.0, seed: int = 0,
         max_prompt: int = 4096, max_output: int = 1024) -> list[list[BenchRequest]]:
    """n requests as conversations of `turns` turns (a conversation ends early at max_prompt).
    The next turn resends a stand-in of each reply of the same length (the model's own reply is
    not known when the workload is made), so only the system prompt and earlier turns' user
    messages and replies before the last can be cached."""
    rng = np.random.default_rng(seed)
    system = _tokens(rng, system_tokens)
    sessions = []
    for _ in range(-(-n // turns)):
        history, session = list(system), []
        for user, reply in zip(_lognormal(rng, CHAT_MEAN_USER * scale, turns, 4, max_prompt),
                               _lognormal(rng, CHAT_MEAN_REPLY * scale, turns, 2, max_output), strict=True):
            history += _tokens(rng, user)
            if len(history) > max_prompt:
                break
            session.append(BenchRequest(list(history), int(reply)))
            history += _tokens(rng, reply)
        sessions.append(session)
    return sessions


def mixed(n: int, *, long_share: float = 0.125, longs_first: bool = False, scale: float = 1.0, seed: int = 0,
          max_prompt: int = 1024, max_output: int = 1024) -> list[list[BenchRequest]]:
    """n requests: a long_share of them ask for max_output tokens, the rest for short answers; in
    random order, or the long ones first (a batch job's requests just before interactive ones)."""
    rng = np.random.default_rng(seed)
    prompts = _lognormal(rng, SHAREGPT_MEAN_PROMPT * scale, n, 4, max_prompt)
    outputs = _lognormal(rng, MIXED_MEAN_SHORT * scale, n, 2, max_output)
    longs = round(n * long_share)
    outputs[:longs] = max_output
    order = np.arange(n) if longs_first else rng.permutation(n)
    return [[BenchRequest(_tokens(rng, prompts[i]), int(outputs[i]))] for i in order]


def _tokens(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(*TOKEN_RANGE, size=int(n)).tolist()
