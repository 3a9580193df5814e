"""The OpenAI request bodies this server accepts, and how they become SamplingParams.

Fields are strictly typed and unknown fields are refused: a field that would change
the output but that the engine cannot honour (tools, logit_bias, response_format,
...) must fail loudly, never be dropped. vLLM's extensions (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids) are accepted as vLLM accepts them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from shardwise.engine.sampling import SamplingParams

MAX_N = 16  # choices per request


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class GenerationRequest(Strict):
    """Fields common to chat and text completions."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    user: str | None = None  # an end-user id; it does not change the output
    # vLLM's extensions
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = 0  # lower runs first (vLLM's); ties go by the server's --policy

    def sampling(self, max_tokens: int, choice: int, logprobs: int | None) -> SamplingParams:
        """The SamplingParams of one choice: choice j of a seeded request uses seed + j, so the
        n choices differ from each other and each is reproducible."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + choice, logprobs=logprobs, stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def requested_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    max_tokens: int | None = Field(16, ge=1)  # the completions API's documented default

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def requested_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class CollabClient(Strict):
    """What a collaborative client says of itself: its per-layer decode seconds (the last
    layer with the LM head), the memory it offers for layers, and its round trip to us."""

    layer_seconds: list[float] = Field(min_length=1)
    memory_bytes: float = Field(ge=0)
    rtt_s: float = Field(ge=0)


class CollabSessionRequest(Strict):
    model: str
    sla_s: float = Field(gt=0)  # seconds per decode token the client needs
    client: CollabClient
    policy: Literal["dp", "greedy", "server"] = "dp"
    insist: bool = False  # refuse, rather than run all on the server, when the SLA cannot be met
