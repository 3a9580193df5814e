// The Chat view: a conversation streamed from /v1/chat/completions (server-sent events), with
// the sampling controls, and each reply's time to first token and tokens per second.

import { request } from "./api.js";
import { el, ms, rate } from "./format.js";

const history = [];
let model = null;

export function setupChat(servedModel) {
  model = servedModel;
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (text) send(text);
    input.value = "";
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("clear").addEventListener("click", () => {
    history.length = 0;
    document.getElementById("messages").replaceChildren();
  });
}

function bubble(role, text) {
  const box = el("div", "", { class: `message ${role}` });
  const body = el("div", text, { class: "text" });
  box.append(body);
  document.getElementById("messages").append(box);
  return { box, body };
}

async function send(text) {
  const button = document.getElementById("send");
  button.disabled = true;
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.box.classList.add("streaming");
  const params = {
    model,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number(document.getElementById("temperature").value),
    top_p: Number(document.getElementById("top-p").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
  };
  const started = performance.now();
  let first = null, chunks = 0, usage = null, content = "";
  try {
    const response = await request("/v1/chat/completions", params);
    for await (const data of events(response)) {
      if (data.error) throw new Error(data.error.message);
      if (data.usage) usage = data.usage;
      const piece = data.choices && data.choices[0] && data.choices[0].delta.content;
      if (!piece) continue;
      first = first ?? performance.now();
      chunks++;
      content += piece;
      reply.body.textContent = content;
      reply.box.dataset.chunks = String(chunks);
    }
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : chunks;
    const perSecond = first && ended > first && tokens > 1 ? ((tokens - 1) * 1e3) / (ended - first) : null;
    const stats = el("div", `TTFT ${ms(first ? (first - started) / 1e3 : null)} · ${rate(perSecond)} · ${tokens} tokens`,
      { class: "stats" });
    reply.box.append(stats);
    history.push({ role: "assistant", content });
  } catch (e) {
    reply.box.classList.add("failed");
    reply.body.textContent = `error: ${e.message}`;
    history.pop(); // the question was not answered: leave it out of the conversation
  } finally {
    reply.box.classList.remove("streaming");
    button.disabled = false;
  }
}

// Each `data:` payload of a server-sent event stream, parsed, until [DONE].
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        yield JSON.parse(payload);
      }
    }
  }
}
