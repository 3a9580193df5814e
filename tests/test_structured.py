"""Structured output and tool calling: grammars enforced by token masks in the engine (constrained
and free sequences in one batch), logit_bias, and the OpenAI API's response_format, tools and
tool_choice through the official client against the real server on 2 Ray stages."""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import openai
import pytest
import torch

from shardwise.engine.sampling import SamplingParams
from shardwise.engine.structured import Constraint, allocate_masks
from tests.conftest import API_KEY, CHAT_PROMPTS, TEXT_PROMPTS, cli

MODEL = "smollm2-135m"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "languages"],
          "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer", "minimum": 0},
                         "languages": {"type": "array", "items": {"enum": ["French", "English", "German"]},
                                       "minItems": 1, "maxItems": 3}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_constrained_and_free_sequences_share_a_step_and_each_follows_its_own_rules(llm):
    free = SamplingParams(max_tokens=24, temperature=0)
    alone = llm.generate(TEXT_PROMPTS[0], free)[0].text
    rules = [Constraint.json(PERSON), Constraint.regex(r"[0-9]{3}-[0-9]{4}"), Constraint.choice(["yes", "no"]),
             Constraint.grammar('root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'), Constraint.json()]
    prompts = [TEXT_PROMPTS[0], "Describe a person as JSON:", "My phone number is", "Is Paris in France?",
               "A sum:", "Some JSON:"]
    outs = llm.generate(prompts, [free] + [SamplingParams(max_tokens=48, temperature=0, constraint=c)
                                           for c in rules])
    assert outs[0].text == alone  # a free neighbour is untouched by the masks
    jsonschema.validate(json.loads(outs[1].text), PERSON)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", outs[2].text) and outs[2].finish_reason == "stop"
    assert outs[3].text in ("yes", "no")
    assert re.fullmatch(r"\([0-9](\+[0-9])*\)", outs[4].text) or outs[4].finish_reason == "length"
    assert outs[5].text.startswith("{")
    assert outs[5].finish_reason == "length" or isinstance(json.loads(outs[5].text), dict)


def test_seeded_constrained_samples_repeat_and_a_moved_grammar_carries_on(llm):
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=11, constraint=Constraint.json(PERSON))
    first, again = (llm.chat(ask("Describe someone as JSON."), params)[0] for _ in range(2))
    assert first.text == again.text
    jsonschema.validate(json.loads(first.text), PERSON)

    # a sampler moving to another process pickles its grammar's tokens, not its matcher
    grammar = llm.grammars.follow(Constraint.json(PERSON))
    for token in first.token_ids[:10]:
        grammar.accept(token)
    moved = pickle.loads(pickle.dumps(grammar))
    masks = allocate_masks(2, llm.spec.vocab_size)
    grammar.fill(masks, 0)
    moved.fill(masks, 1)
    assert torch.equal(masks[0], masks[1]) and moved.tokens == first.token_ids[:10]


def test_logit_bias_steers_and_bans_tokens_and_logprobs_stay_the_models(llm):
    greedy = SamplingParams(max_tokens=1, temperature=0)
    top = llm.generate(TEXT_PROMPTS[0], greedy)[0].token_ids[0]
    banned = llm.generate(TEXT_PROMPTS[0], SamplingParams(max_tokens=1, temperature=0, logit_bias={top: -100}))[0]
    assert banned.token_ids[0] != top
    forced = llm.generate(TEXT_PROMPTS[0], SamplingParams(max_tokens=3, temperature=0.7, seed=1,
                                                          logit_bias={42: 100}))[0]
    assert forced.token_ids == [42, 42, 42]

    yes, no = (llm.tokenizer.encode(w)[0] for w in ("yes", "no"))
    constrained = SamplingParams(max_tokens=4, temperature=0, logprobs=2, constraint=Constraint.choice(["yes", "no"]))
    for bias, expected in (({yes: 50}, "yes"), ({no: 50}, "no")):
        out = llm.generate("Is the sky green?", SamplingParams(**{**vars(constrained), "logit_bias": bias}))[0]
        assert out.text == expected
        # the log-probability of the drawn token is the model's own, before the mask and the bias
        assert -30 < out.logprobs[0].logprob < 0 and len(out.logprobs[0].top) == 2


def test_invalid_constraints_are_refused_naming_the_problem(llm):
    from shardwise.errors import ShardwiseError

    for bad, words in ((Constraint("json_schema", '{"type": "objectx"}'), "objectx"),
                       (Constraint.regex("([a-z"), "regex"), (Constraint.grammar("root ::= nothing"), "nothing"),
                       (Constraint.regex("x" * 40000), "more than the 32768 allowed")):
        with pytest.raises(ShardwiseError, match=words):
            llm.generate("hi", SamplingParams(max_tokens=2, constraint=bad))


# --- the OpenAI API ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=f"{api_server}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def test_json_schema_replies_validate_over_many_seeded_samples(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    reply = client.chat.completions.create(model=MODEL, messages=ask("Describe a famous scientist as JSON."),
                                           response_format=fmt, temperature=1.0, seed=5, n=10, max_tokens=80)
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({c.message.content for c in reply.choices}) > 1  # sampled, not one answer repeated

    text = client.completions.create(model=MODEL, prompt=TEXT_PROMPTS[1], max_tokens=40, temperature=1.0, seed=2,
                                     extra_body={"response_format": {"type": "json_object"}}).choices[0]
    assert text.finish_reason == "length" or isinstance(json.loads(text.text), dict)
    choice = client.chat.completions.create(model=MODEL, messages=ask(CHAT_PROMPTS[0]), max_tokens=8,
                                            extra_body={"structured_outputs": {"choice": ["Paris", "Lyon"]}})
    assert choice.choices[0].message.content in ("Paris", "Lyon")


def valid_calls(message) -> list[str]:
    """The names of a reply's tool calls, each checked against its function's schema."""
    for call in message.tool_calls:
        schema = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
        assert call.id.startswith("call_") and call.type == "function"
    return [call.function.name for call in message.tool_calls]


def test_a_tool_call_round_trip_on_the_real_model(client):
    messages = ask("What is the weather in Paris, in celsius?")
    call = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                         tool_choice="required", parallel_tool_calls=False, temperature=0,
                                         max_tokens=80)
    message = call.choices[0].message
    assert call.choices[0].finish_reason == "tool_calls" and message.content is None
    assert valid_calls(message) == ["get_weather"]

    messages += [message, {"role": "tool", "tool_call_id": message.tool_calls[0].id,
                           "content": json.dumps({"celsius": 18, "sky": "cloudy"})}]
    answer = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, TIME],
                                           tool_choice="none", temperature=0, max_tokens=30)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls

    both = client.chat.completions.create(model=MODEL, tools=[WEATHER, TIME], tool_choice="required",
                                         messages=ask("What time is it in Tokyo, and what is the weather there?"),
                                         temperature=0, max_tokens=110)  # parallel calls
    assert set(valid_calls(both.choices[0].message)) == {"get_time", "get_weather"}


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(client):
    ask_weather = {"model": MODEL, "messages": ask("Weather in Berlin?"), "tools": [WEATHER, TIME],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                   "temperature": 0, "max_tokens": 60}
    whole = client.chat.completions.create(**ask_weather).choices[0]
    [expected] = whole.message.tool_calls
    assert expected.function.name == "get_weather" and whole.finish_reason == "tool_calls"

    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(**ask_weather, stream=True):
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or ():
            call = calls.setdefault(part.index, {"name": "", "arguments": ""})
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert list(calls.values()) == [{"name": "get_weather", "arguments": expected.function.arguments}]
    assert finish == "tool_calls"


QWEN_STYLE = """{%- if tools %}<|im_start|>system
# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools><|im_end|>
{% endif %}{%- for m in messages %}{%- if m.role == "tool" %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def test_a_template_that_renders_tools_gets_them_and_the_history_natively(llm):
    """A Qwen-style template (tools, calls with arguments as objects, results) renders the
    conversation itself; a template without tools gets them in the system message."""
    import copy

    from shardwise.serve.protocol import ChatCompletionRequest
    from shardwise.serve.tools import chat_messages

    body = ChatCompletionRequest.model_validate({"model": MODEL, "tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 3}'}]})
    tokenizer = copy.deepcopy(llm.tokenizer)
    tokenizer.hf.chat_template = QWEN_STYLE
    assert tokenizer.renders_tools and not llm.tokenizer.renders_tools
    native = tokenizer.hf.decode(tokenizer.apply_chat_template(*chat_messages(body, native_tools=True)))
    assert '"name": "get_weather"' in native and '{"city": "Oslo", "unit": "celsius"}' in native
    assert "<tool_response>\n{\"celsius\": 3}\n</tool_response>" in native

    messages, tools = chat_messages(body, native_tools=False)
    assert tools is None and messages[0]["role"] == "system" and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"].startswith("<tool_call>") and messages[3]["role"] == "user"
    generic = llm.tokenizer.hf.decode(llm.chat_ids(messages))
    assert "<tool_response>" in generic and "get_weather" in generic


def test_generate_cli_refuses_two_constraints_at_once():
    both = cli("generate", "hi", "--regex", "a", "--choice", "b")  # (a schema file through the CLI: test_pipeline)
    assert both.returncode != 0 and "give one of --json-schema, --regex or --choice" in both.stderr
