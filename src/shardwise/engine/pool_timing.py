"""A pool's step time as a line in the tokens a step runs: what a step costs anyway, and what
each token adds. A disaggregated scheduler weighs a prompt's prefill on either pool with it.

Seconds per token of a pool's steps alone carry the fixed cost of each step: a decode pool's
steps that run a prompt's chunk beside 16 decode rows then look dearer per token than the chunk
makes them, and a prompt went apart where it would have cost less at home. Two kinds of steps
give two points on the line: those that ran a prompt's chunk, and those that ran none (a decode
pool's decode-only steps), each a decaying mean of the recent ones.
"""

from __future__ import annotations

from dataclasses import dataclass

DECAY = 0.7  # the weight an older step keeps against the newest one


@dataclass
class PoolTiming:
    prompts: tuple[float, float] | None = None  # (tokens, seconds) of steps that ran a prompt's chunk
    others: tuple[float, float] | None = None  # and of those that ran none

    def observe(self, tokens: int, seconds: float, prompt: bool) -> None:
        last = self.prompts if prompt else self.others
        now = (float(tokens), seconds) if last is None else tuple(
            DECAY * old + (1 - DECAY) * new for old, new in zip(last, (tokens, seconds), strict=True))
        if prompt:
            self.prompts = now
        else:
            self.others = now

    @property
    def timed(self) -> bool:
        """Whether a step that ran a prompt has been timed."""
        return self.prompts is not None

    @property
    def per_token(self) -> float | None:
        """Seconds a prompt's token adds to a step: the line's slope where both kinds of steps were
        timed (and the prompts' steps ran more tokens), else the prompts' steps' seconds per token."""
        if self.prompts is None:
            return None
        tokens, seconds = self.prompts
        if self.others is not None and tokens > self.others[0] and seconds > self.others[1]:
            return (seconds - self.others[1]) / (tokens - self.others[0])
        return seconds / tokens

    @property
    def fixed(self) -> float:
        """Seconds a step costs whatever it runs (0 where the line has one point)."""
        if self.prompts is None:
            return 0.0
        tokens, seconds = self.prompts
        return max(seconds - self.per_token * tokens, 0.0)
