"""Tool calling on the chat API: tools into the prompt, the grammar of the calls, and the calls
back out of the text.

Calls are written in the Hermes format that Qwen 2.5/3, Hermes and SmolLM3 use:
    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>
A model whose chat template renders tools gets them through its template; for one whose
template does not (SmolLM2, most base models) shardwise writes the tools and this format into
the system message, and tool results go back as user messages in <tool_response> tags. The
calls are constrained by an xgrammar structural tag, so every call names a given function
and its arguments parse against that function's schema; with tool_choice "auto" the model
may also just answer.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from shardwise.engine.structured import Constraint
from shardwise.model.tokenizer import partial_marker
from shardwise.serve.protocol import ChatCompletionRequest, ChatMessage

START, END = "<tool_call>", "</tool_call>"

GENERIC_PROMPT = """You may call functions to answer. They are described by these JSON schemas:
<tools>
{tools}
</tools>
To call a function, reply with one block per call:
<tool_call>
{{"name": "<the function's name>", "arguments": <the arguments as a JSON object>}}
</tool_call>
Each result comes back inside <tool_response></tool_response>."""


def tool_constraint(body: ChatCompletionRequest) -> Constraint | None:
    """The grammar of a reply to a request with tools (None where the reply is free): with
    tool_choice "required" or a named function, calls only (the named one once); with "auto",
    free text that may end in calls. Once calls begin the reply is calls until it ends, so a
    model cannot go on to invent the tools' results."""
    if not body.calling_tools:
        return None
    from xgrammar import structural_tag as st

    tools, choice = body.tools, body.tool_choice or "auto"
    if not isinstance(choice, str):
        tools = [t for t in tools if t.function.name == choice.function.name]
        if not tools:
            raise ValueError(f"tool_choice names '{choice.function.name}', which is not among the tools")
    tags = [st.TagFormat(begin=f'{START}\n{{"name": {json.dumps(t.function.name)}, "arguments": ',
                         content=st.JSONSchemaFormat(json_schema=t.function.parameters or {"type": "object"},
                                                     max_whitespace_cnt=1),
                         end=f"}}\n{END}") for t in tools]
    single = not body.parallel_tool_calls or choice not in ("auto", "required")  # a named function: once
    calls = st.TagsWithSeparatorFormat(tags=tags, separator="\n", at_least_one=True, stop_after_first=single)
    if choice == "auto":
        calls = st.SequenceFormat(elements=[st.AnyTextFormat(excludes=[START]), st.OptionalFormat(content=calls)])
    return Constraint("structural_tag", st.StructuralTag(format=calls).model_dump_json(by_alias=True))


def chat_messages(body: ChatCompletionRequest, native_tools: bool) -> tuple[list[dict], list[dict] | None]:
    """The conversation for the chat template, and the tools for a template that renders them
    itself (native_tools); otherwise tools, calls and results are written into the messages."""
    tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.calling_tools else None
    if native_tools:
        return [_native(m) for m in body.messages], tools
    messages = [_generic(m) for m in body.messages]
    if tools:
        described = GENERIC_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if messages[0]["role"] in ("system", "developer"):
            messages[0] = {"role": messages[0]["role"], "content": f"{messages[0]['content']}\n\n{described}"}
        else:
            messages.insert(0, {"role": "system", "content": described})
    return messages, None


def _arguments(call) -> Any:
    try:
        return json.loads(call.function.arguments)
    except ValueError:
        return call.function.arguments


def _native(m: ChatMessage) -> dict:
    message: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c)}}
                                 for c in m.tool_calls]
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    return message


def _generic(m: ChatMessage) -> dict:
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{m.text()}\n</tool_response>"}
    text = m.text()
    for c in m.tool_calls or ():
        call = json.dumps({"name": c.function.name, "arguments": _arguments(c)}, ensure_ascii=False)
        text += f"{START}\n{call}\n{END}"
    return {"role": m.role, "content": text}


class ToolCallParser:
    """Splits a reply's text, as it grows, into content and tool calls (OpenAI's shape). Text
    that might begin a call is held back until it does or does not; a call that does not parse
    (cut short by max_tokens) is returned as content, so no text is lost."""

    def __init__(self) -> None:
        self.pending = ""
        self.inside = False
        self.calls = 0

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.pending += text
        content, calls = "", []
        while True:
            if self.inside:
                end = self.pending.find(END)
                if end < 0:
                    break
                body, self.pending, self.inside = self.pending[:end], self.pending[end + len(END):], False
                call = self._call(body)
                if call is None:
                    content += f"{START}{body}{END}"
                else:
                    calls.append(call)
            else:
                start = self.pending.find(START)
                if start < 0:
                    keep = partial_marker(self.pending, [START])
                    content += self.pending[:len(self.pending) - keep]
                    self.pending = self.pending[len(self.pending) - keep:]
                    break
                content += self.pending[:start]
                self.pending, self.inside = self.pending[start + len(START):], True
        return content, calls

    def finish(self) -> str:
        """The text still held back, once the reply ended."""
        rest = (START if self.inside else "") + self.pending
        self.pending, self.inside = "", False
        return rest

    def _call(self, body: str) -> dict | None:
        try:
            call = json.loads(body)
            name, arguments = call["name"], call.get("arguments", {})
        except (ValueError, TypeError, KeyError):
            return None
        if not isinstance(name, str):
            return None
        self.calls += 1
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def split_reply(text: str) -> tuple[str | None, list[dict]]:
    """A whole reply's content (None when it is only calls) and tool calls."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    content = (content + parser.finish()).strip()
    return (content or None) if calls else content, calls
