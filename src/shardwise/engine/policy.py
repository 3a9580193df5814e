"""Scheduling policies: in which order sequences get the running batch's slots.

fcfs: arrival order (a request's priority first, as vLLM's priority field: lower runs
first); a running sequence keeps its slot until it ends.

mlfq: FastServe's skip-join multi-level feedback queue, preemptive at token granularity.
A sequence enters the level its prompt length implies (a long prefill skips the top levels),
is demoted one level each time it generates its level's quantum of tokens (quanta double
level by level), and the lowest (priority, level, arrival) run first: a short request
overtakes long ones at its first step instead of waiting for them to end. A sequence that
has not run for AGING_S is promoted to the top level, so none starves.
"""

from __future__ import annotations

import math
from typing import Any

POLICIES = ("fcfs", "mlfq")
LEVELS = 8
QUANTUM_TOKENS = 32  # tokens a sequence generates at the top level before it is demoted
# prompt tokens the top level admits (each level below twice as many): about what a step prefills
# in the time the top level's quantum decodes (a step prefills ~128 prompt tokens in a decode's time)
PROMPT_QUANTUM = 128 * QUANTUM_TOKENS
AGING_S = 20.0  # seconds without running after which a sequence goes back to the top level


class FirstComeFirstServed:
    preemptive = False

    def enter(self, seq: Any, now: float) -> None:
        pass

    def served(self, seq: Any, now: float) -> None:
        pass

    def rank(self, seq: Any, now: float) -> tuple:
        return seq.priority, seq.output.arrival_time


class SkipJoinMLFQ:
    preemptive = True

    def __init__(self, levels: int = LEVELS, quantum: int = QUANTUM_TOKENS, prompt_quantum: int = PROMPT_QUANTUM,
                 aging_s: float = AGING_S):
        self.levels, self.quantum, self.prompt_quantum, self.aging_s = levels, quantum, prompt_quantum, aging_s

    def enter(self, seq: Any, now: float) -> None:
        """Skip-join: the first level whose prompt quantum holds the whole prompt."""
        self._set_level(seq, math.ceil(math.log2(max(len(seq.prompt) / self.prompt_quantum, 1))), now)

    def served(self, seq: Any, now: float) -> None:
        """A token generated: demoted once its level's quantum is used up."""
        seq.last_served = now
        seq.level_tokens += 1
        if seq.level_tokens >= self.quantum << seq.level:
            self._set_level(seq, seq.level + 1, now)

    def rank(self, seq: Any, now: float) -> tuple:
        if now - seq.last_served > self.aging_s:  # starving: back to the top
            self._set_level(seq, 0, now)
        return seq.priority, seq.level, seq.output.arrival_time

    def _set_level(self, seq: Any, level: int, now: float) -> None:
        seq.level, seq.level_tokens, seq.last_served = min(level, self.levels - 1), 0, now


def make_policy(name: str) -> FirstComeFirstServed | SkipJoinMLFQ:
    return SkipJoinMLFQ() if name == "mlfq" else FirstComeFirstServed()
