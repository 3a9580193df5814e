"""The OpenAI request bodies this server accepts, and how they become SamplingParams.

Fields are strictly typed and unknown fields are refused: a field that would change
the output but that the engine cannot honour must fail loudly, never be dropped.
vLLM's extensions (top_k, min_p, repetition_penalty, ignore_eos, stop_token_ids,
structured_outputs and the older guided_* fields) are accepted as vLLM accepts them.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shardwise.engine.sampling import SamplingParams
from shardwise.engine.structured import Constraint

MAX_N = 16  # choices per request


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result: the call it answers

    @model_validator(mode="after")
    def _complete(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id', the id of the call it answers")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class ToolDefinition(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    """OpenAI's: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's: exactly one of a JSON schema, a regex, a list of choices, an EBNF grammar, or
    any JSON object."""

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> Constraint | None:
        given = {k: v for k, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                   ("grammar", self.grammar), ("json_object", self.json_object or None))
                 if v is not None}
        if len(given) > 1:
            raise ValueError(f"structured_outputs takes one of json, regex, choice, grammar or json_object, "
                             f"got {', '.join(given)}")
        if "json" in given:
            schema = given["json"]
            return Constraint.json(json.loads(schema) if isinstance(schema, str) else schema)
        if "regex" in given:
            return Constraint.regex(self.regex)
        if "choice" in given:
            return Constraint.choice(self.choice)
        if "grammar" in given:
            return Constraint.grammar(self.grammar)
        return Constraint.json() if given else None


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
    logit_bias: dict[str, float] | None = None  # token id (as text) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM's older names for structured_outputs' fields
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None

    def constraint(self) -> Constraint | None:
        """The grammar the output must follow, from response_format or structured_outputs (one of
        them); a ValueError names a contradiction or a schema that is not JSON."""
        guided = StructuredOutputs.model_validate(
            {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
             "grammar": self.guided_grammar})
        asked = [c for c in (self.structured_outputs and self.structured_outputs.constraint(), guided.constraint(),
                             self.response_format and _response_constraint(self.response_format)) if c]
        if len(asked) > 1:
            raise ValueError("give one of response_format, structured_outputs or guided_*, not several")
        return asked[0] if asked else None

    def bias(self) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        try:
            return {int(token): bias for token, bias in self.logit_bias.items()}
        except ValueError:
            raise ValueError("logit_bias keys are token ids, e.g. {\"50256\": -100}") from None

    def sampling(self, max_tokens: int, choice: int, logprobs: int | None, constraint: Constraint | None = None,
                 bias: dict[int, float] | None = None) -> SamplingParams:
        """The SamplingParams of one choice: choice j of a seeded request uses seed + j, so the
        n choices differ from each other and each is reproducible."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + choice, logprobs=logprobs, stop=self.stop,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logit_bias=bias,
            constraint=constraint,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _response_constraint(fmt: ResponseFormat) -> Constraint | None:
    if fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Constraint.json()
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ValueError("response_format of type 'json_schema' needs json_schema.schema")
    return Constraint.json(fmt.json_schema.schema_, strict=bool(fmt.json_schema.strict))


class ChatCompletionRequest(GenerationRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @property
    def calling_tools(self) -> bool:
        """Whether the reply may hold tool calls (tools given, and tool_choice not 'none')."""
        return bool(self.tools) and self.tool_choice != "none"

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
