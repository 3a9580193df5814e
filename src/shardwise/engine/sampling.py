"""Sampling parameters and the per-sequence sampler that turns logits into a token.

Each draw of a sequence is seeded from its seed and the draw's index, so a seeded
request gives the same tokens whatever else shares its batch, and a sampler rebuilt
mid-sequence (after a lost stage) carries on exactly where the old one was.

Every accepted value samples without NaN: logits are clamped to finite values after the
penalties and shifted so their maximum is 0 before the temperature divides them, so the
most likely token always keeps a probability of 1 before normalisation.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from shardwise.engine.structured import Constraint, SequenceGrammar
from shardwise.errors import ShardwiseError

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (vLLM's epsilon)


@dataclass
class SamplingParams:
    """What to generate and how; names and defaults follow vLLM's SamplingParams."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated
    seed: int | None = None
    logprobs: int | None = None  # return the sampled token's log-probability and this many top alternatives
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logit_bias: dict[int, float] | None = None  # OpenAI's: added to a token's logit, -100 bans it
    constraint: Constraint | None = None  # structured output: the grammar the tokens must follow

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if isinstance(self.constraint, dict):  # from JSON (a collaborative session's wire)
            self.constraint = Constraint(**self.constraint)
        if self.logit_bias:  # JSON's keys are text
            try:
                self.logit_bias = {int(token): bias for token, bias in self.logit_bias.items()}
            except (TypeError, ValueError):
                raise ShardwiseError(f"logit_bias maps token ids to biases, got {self.logit_bias!r}") from None
        self.stop = [s for s in (self.stop or []) if s]
        numbers = {"temperature": self.temperature, "top_p": self.top_p, "min_p": self.min_p,
                   "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                   "frequency_penalty": self.frequency_penalty}
        for name, value in numbers.items():
            if not isinstance(value, int | float) or not math.isfinite(value):
                raise ShardwiseError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ShardwiseError(message)
        for token, bias in (self.logit_bias or {}).items():
            if token < 0 or not isinstance(bias, int | float) or not -100 <= bias <= 100:
                raise ShardwiseError(f"logit_bias maps token ids to biases in [-100, 100], got {token!r}: {bias!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def penalised(self) -> bool:
        """Whether this sequence's logits change before the draw (penalties, biases)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias))


class SequenceSampler:
    """Sampling state of one sequence: its parameters, its draws so far and the tokens it has seen.
    generated: tokens it already produced, when it is rebuilt mid-sequence. grammar: what its
    tokens must follow (its masks are applied to the logits before they come here)."""

    def __init__(self, params: SamplingParams, generated: list[int] = (), grammar: SequenceGrammar | None = None):
        self.params, self.grammar = params, grammar
        self.seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = None if params.greedy else torch.Generator()
        self.draws = len(generated)
        self.seen: Counter[int] = Counter()  # prompt and generated tokens (repetition penalty)
        self.generated: Counter[int] = Counter()  # generated tokens (presence and frequency penalties)
        if params.presence_penalty or params.frequency_penalty:
            self.generated.update(generated)

    def observe(self, token_ids: list[int]) -> None:
        if self.params.repetition_penalty != 1.0:
            self.seen.update(token_ids)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: float32 [vocab] -> the next token id."""
        logits = self._penalise(logits)
        token = int(logits.argmax()) if self.params.greedy else self._draw(self._probs(logits))
        self._took(token)
        return token

    def verify(self, logits: torch.Tensor, drafts: list[int]) -> list[int]:
        """Speculative decoding's check of drafted tokens. logits [len(drafts) + 1, vocab]: the
        model's at each draft's position and after the last draft. Each position draws its
        token as a plain step would (the same seeded draw); a draft is accepted while it equals
        that token. Returns the accepted drafts and the model's token after them. For drafts
        proposed with certainty (prompt lookup, a greedy draft model) this is rejection
        sampling: a draft is accepted with probability p(draft), and a rejected one is replaced
        by a draw from p without it. And the output is token for token the one without
        speculation, greedy or seeded."""
        tokens = []
        for j, row in enumerate(logits):
            row = self._penalise(row)  # the penalties see the tokens accepted before it
            token = int(row.argmax()) if self.params.greedy else self._draw(self._probs(row))
            self._took(token)
            tokens.append(token)
            if j == len(drafts) or token != drafts[j]:
                break
        return tokens

    def _took(self, token: int) -> None:
        if self.grammar is not None:
            self.grammar.accept(token)
        if self.params.presence_penalty or self.params.frequency_penalty:
            self.generated[token] += 1

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        penalised = False
        if p.repetition_penalty != 1.0 and self.seen:
            ids = torch.tensor(list(self.seen), device=logits.device)
            scores = logits[ids]
            logits = logits.clone()
            logits[ids] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
            penalised = True
        if self.generated:
            ids = torch.tensor(list(self.generated), device=logits.device)
            counts = torch.tensor(list(self.generated.values()), dtype=logits.dtype, device=logits.device)
            logits = logits.clone()
            logits[ids] -= p.presence_penalty + p.frequency_penalty * counts
            penalised = True
        if p.logit_bias:
            logits = logits.clone()
            ids = torch.tensor([t for t in p.logit_bias if t < len(logits)], dtype=torch.long, device=logits.device)
            logits[ids] += torch.tensor([p.logit_bias[t] for t in ids.tolist()], dtype=logits.dtype,
                                        device=logits.device)
            penalised = True
        if penalised:  # an extreme penalty overflows: keep every logit finite
            limit = torch.finfo(logits.dtype).max
            logits = logits.nan_to_num(nan=-limit, posinf=limit, neginf=-limit)
        return logits

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a draw follows: temperature, top-k, min-p and top-p applied."""
        p = self.params
        # shifted to a maximum of 0 first: a tiny temperature then sends the others to -inf, never
        # the best token to inf (which softmax would turn into NaN)
        logits = (logits - logits.max()) / p.temperature
        if p.top_k > 0 and p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p, and always the most likely token
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop[0] = False
            probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
        return probs.cpu()

    def _draw(self, probs: torch.Tensor) -> int:
        """One draw from probs, seeded by the draw's index."""
        self.generator.manual_seed((self.seed + self.draws * 0x9E3779B97F4A7C15) % 2**63)
        self.draws += 1
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TokenLogprobs(NamedTuple):
    """The model's log-probability of the sampled token and of the most likely ones (raw logits,
    before temperature and penalties, as vLLM reports them)."""

    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprobs:
    logp = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logp.topk(k) if k else (logp[:0], logp[:0].long())
    return TokenLogprobs(float(logp[token]), list(zip(ids.tolist(), values.tolist(), strict=True)))


def sample_batch(logits: torch.Tensor, samplers: list[SequenceSampler]) -> list[int | Exception]:
    """One token per row of logits [sequences, vocab], or that row's error: a sampler that fails
    fails its own sequence only."""
    if all(s.params.greedy and not s.params.penalised and s.grammar is None for s in samplers):
        return logits.argmax(dim=-1).tolist()
    return [_sample(sampler, row) for sampler, row in zip(samplers, logits, strict=True)]


def _sample(sampler: SequenceSampler, logits: torch.Tensor) -> int | Exception:
    try:
        return sampler(logits)
    except Exception as e:
        return e
