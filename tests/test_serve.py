"""The OpenAI-compatible server: a real `shardwise serve` process on 127.0.0.1 running the real
model on 2 local Ray stages (and a prefill pool of one: prompts of 16 tokens or more prefill
there), driven by the official openai client and by raw HTTP."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.conftest import (
    API_KEY,
    API_KV_TOKENS,
    CHAT_PROMPTS,
    TEXT_PROMPTS,
    cli,
    free_port,
)

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def server(api_server):
    return api_server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            name = re.sub(r',?model_name="[^"]*"', "", name).replace("{,", "{").replace("{}", "")
            values[name] = float(value)
    return values


def test_chat_and_completions_through_the_openai_client(client, llm):
    from shardwise import SamplingParams

    assert [m.id for m in client.models.list()] == [MODEL]
    messages = [{"role": "user", "content": CHAT_PROMPTS[0]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
    expected = llm.chat(messages, SamplingParams(max_tokens=24, temperature=0))[0]
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert reply.usage.completion_tokens == len(expected.token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == len(expected.token_ids) and not chunks[-1].choices

    prompt = TEXT_PROMPTS[0]
    expected = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0))[0].text
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stream=True)
    assert plain.choices[0].text == expected == "".join(c.choices[0].text for c in streamed)
    batch = client.completions.create(model=MODEL, prompt=TEXT_PROMPTS[:2], max_tokens=8, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1]
    assert expected.startswith(batch.choices[0].text)


def test_16_concurrent_streams_equal_each_run_alone(client):
    prompts = [f"{p} {i}" for i in range(4) for p in TEXT_PROMPTS]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0).choices[0].text
             for p in prompts]

    def streamed(prompt: str) -> str:
        stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, prompts))
    assert together == alone


def test_n_seeds_logprobs_and_penalties(client):
    ask = dict(model=MODEL, messages=[{"role": "user", "content": CHAT_PROMPTS[1]}], max_tokens=12)
    first = client.chat.completions.create(**ask, n=3, temperature=1.0, seed=7)
    again = client.chat.completions.create(**ask, n=3, temperature=1.0, seed=7)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices]  # seeded: reproducible
    assert len(set(texts)) > 1  # choice j samples with seed + j

    greedy = client.chat.completions.create(**ask, temperature=0, logprobs=True, top_logprobs=3)
    content = greedy.choices[0].logprobs.content
    assert len(content) == greedy.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy picks the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
    legacy = client.completions.create(model=MODEL, prompt=TEXT_PROMPTS[0], max_tokens=4, temperature=0, logprobs=2)
    assert len(legacy.choices[0].logprobs.token_logprobs) == 4
    assert all(len(top) == 2 for top in legacy.choices[0].logprobs.top_logprobs)

    plain = client.chat.completions.create(**ask, temperature=0).choices[0].message.content
    penalised = [client.chat.completions.create(**ask, temperature=0, frequency_penalty=2.0,
                                                presence_penalty=1.0).choices[0].message.content for _ in range(2)]
    assert penalised[0] == penalised[1] != plain  # honoured (the reply's repeated comma is penalised), reproducibly


def test_a_disconnect_mid_stream_frees_its_sequence(server):
    aborted = metrics(server).get('shardwise:request_success_total{finished_reason="abort"}', 0)
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(6), strict=False) if line.startswith("data:")) >= 3
        assert metrics(server)["shardwise:num_requests_running"] == 1
    deadline = time.time() + 20
    while time.time() < deadline:
        now = metrics(server)
        if now["shardwise:num_requests_running"] == 0 and now["shardwise:kv_cache_usage_perc"] == 0:
            break
        time.sleep(0.2)
    assert now["shardwise:num_requests_running"] == 0 and now["shardwise:kv_cache_usage_perc"] == 0
    assert now['shardwise:request_success_total{finished_reason="abort"}'] == aborted + 1


LONG_PROMPT = [100] * 9000  # longer than the model's 8192-token context

BAD_REQUESTS = [
    ("/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [', 400, "invalid_json"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "invalid_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400,
     "invalid_parameter"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404,
     "model_not_found"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -3},
     400, "invalid_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10**9}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": API_KV_TOKENS + 10}, 400, None),  # KV budget
    ("/v1/completions", {"model": MODEL, "prompt": LONG_PROMPT}, 400, "context_length_exceeded"),
    ("/v1/completions", b'{"model": "smollm2-135m", "prompt": "hi", "temperature": NaN}', 400, "invalid_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "invalid_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "functions": []}, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"50": 500}}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"4000000": 5}}, 400, None),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, 400, "invalid_response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_regex": "([a-z"}, 400, "invalid_response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function", "function": {
            "name": "g"}}}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "response_format": {"type": "json_object"}}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "guided_json": "{not json"}, 400, None),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "tool", "content": "18 C"}]}, 400,
     "invalid_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "missing_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "priority": "high"}, 400, "invalid_parameter"),
    ("/v1/completions", b"x" * (5 << 20), 413, "request_too_large"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, path, body, status, code):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    assert httpx.get(f"{server}/health").status_code == 200


def test_api_key_is_required_on_v1(server):
    assert httpx.get(f"{server}/v1/models").status_code == 401
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    # without the key: only whether it is healthy (and that it wants a key)
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "api_key_required": True}
    health = httpx.get(f"{server}/health", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    decoding = [s["layers"] for s in health["stages"] if s.get("pool") != "prefill"]
    assert health["status"] == "ok" and decoding == [[0, 15], [15, 30]]


def test_metrics_are_exported_like_vllms(server, client):
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0,
                              extra_body={"priority": -2})  # vLLM's request priority (lower first)
    m = metrics(server)
    assert m["shardwise:time_to_first_token_seconds_count"] >= 1
    assert m["shardwise:time_per_output_token_seconds_count"] >= 3
    assert m["shardwise:prompt_tokens_total"] >= 1 and m["shardwise:generation_tokens_total"] >= 4
    assert m["shardwise:num_requests_waiting"] == 0 and 0 <= m["shardwise:kv_cache_usage_perc"] <= 1
    # the server speculates: its int4 drafts are accepted, and /metrics counts them
    before, accepted = m, "shardwise:spec_decode_num_accepted_tokens_total"
    counting = "one two three four five. one two three four five. one two three four"  # (16 tokens)
    client.completions.create(model=MODEL, prompt=counting, max_tokens=12, temperature=0)
    m = metrics(server)
    assert m["shardwise:spec_decode_num_draft_tokens_total"] >= m[accepted] > before[accepted]
    assert 0 < m["shardwise:spec_decode_num_drafts_total"] <= m["shardwise:spec_decode_num_draft_tokens_total"]
    assert m["shardwise:spec_decode_draft_seconds_total"] > 0 and m["shardwise:spec_decode_verify_seconds_total"] > 0
    # alone, that prompt (16 tokens: long enough for the prefill pool) prefilled where it decodes
    handoffs = "shardwise:prefill_handoffs_total"
    assert m[handoffs] == before[handoffs]
    # beside two streams decoding, a prompt as long (not cached) runs on the prefill pool, then moves
    # with its KV to the decode pool
    streams = [client.completions.create(model=MODEL, prompt=p, max_tokens=200, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}) for p in ("Once upon", "The sea")]
    for stream in streams:
        next(iter(stream))  # (decoding)
    reply = client.completions.create(model=MODEL, prompt="Count on: " + counting, max_tokens=2, temperature=0)
    for stream in streams:
        stream.close()
    assert reply.choices[0].text
    assert metrics(server)[handoffs] == m[handoffs] + 1


def test_a_resent_prompt_hits_the_prefix_cache_and_metrics_count_it(server, client):
    """Every stage of the server keeps the prompt's full blocks; resent, only its last partial
    block is prefilled, and /metrics counts the hit (in tokens, as vLLM's counters do)."""
    prompt = "A shared system prompt for a chat assistant, long enough to fill a few blocks. " * 4
    before = metrics(server)
    first, again = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
                    for _ in range(2))
    assert first.choices[0].text == again.choices[0].text
    m = metrics(server)
    prompt_tokens = first.usage.prompt_tokens
    assert m["shardwise:prefix_cache_queries_total"] - before["shardwise:prefix_cache_queries_total"] \
        == 2 * prompt_tokens
    assert m["shardwise:prefix_cache_hits_total"] - before["shardwise:prefix_cache_hits_total"] \
        >= prompt_tokens - 2 * 16
    assert m["shardwise:prefix_cache_blocks"] >= prompt_tokens // 16 and 0 < m["shardwise:prefix_cache_hit_rate"] < 1


def test_dashboard_state_is_the_metrics_and_the_live_stages(api_server):
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "prompt": "Hello " * 20, "max_tokens": 4, "temperature": 0}  # (through both pools)
    assert httpx.post(f"{api_server}/v1/completions", json=body, headers=auth, timeout=60).status_code == 200
    state = httpx.get(f"{api_server}/v1/dashboard/state", headers=auth).json()
    m = metrics(api_server)
    assert state["metrics"]["generation_tokens_total"] == m["shardwise:generation_tokens_total"]
    ttft = state["metrics"]["time_to_first_token_seconds"]  # percentiles of the last minute's requests
    assert ttft["count"] >= 1 and 0 < ttft["p50"] <= ttft["p99"]
    health = httpx.get(f"{api_server}/health", headers=auth).json()
    assert [(s["layers"], s["pid"]) for s in state["stages"]] == [(s["layers"], s["pid"]) for s in health["stages"]]
    for stage in state["stages"]:
        assert stage["weight_bytes"] > 0 and stage["kv_pool_bytes"] > 0 and stage["steps"] > 0
        assert 0 < stage["busy_s"] and 0 < stage["memory_available_bytes"] < stage["memory_total_bytes"]


@pytest.mark.parametrize("path, body, message", [
    ("/v1/dashboard/estimate", {"model": "no-such-model", "device": "h100"}, "unknown model 'no-such-model'"),
    ("/v1/dashboard/estimate", {"model": "llama-3.1-70b", "device": "l4"}, "does not fit"),
    ("/v1/dashboard/estimate", {"model": "llama-3.1-8b", "gpu": "h100"}, "'gpu' is not supported"),
    ("/v1/dashboard/estimate", {"model": "/etc/hostname", "device": "h100"}, "catalog models"),  # no files
    ("/v1/dashboard/estimate", {"model": "llama-3.1-8b", "device": "/etc/hostname"}, "unknown device"),
    ("/v1/dashboard/estimate", {"model": "llama-3.1-8b", "pp_devices": ["h100", "/etc/passwd"]}, "unknown device"),
    ("/v1/dashboard/plan", {"model": "llama-3.1-8b", "cluster": {"devices": [{"name": "a", "type": "/etc/passwd"}]}},
     "unknown device '/etc/passwd'"),
    ("/v1/dashboard/plan", {"model": "llama-3.1-8b", "cluster": {"devices": [{"name": "a", "profile": "/etc/passwd"}]}},
     "only catalog devices"),
    ("/v1/dashboard/plan", {"model": "llama-3.1-8b", "cluster": "devices: [oops"}, "not valid YAML"),
    ("/v1/dashboard/plan", {"model": "llama-3.1-8b", "cluster": {"devices": []}}, "non-empty \"devices\" list"),
    ("/v1/plan", [[0, 15], [15, 30]], "non-empty \"stages\" list"),
    ("/v1/plan", {"stages": [{"layers": [0, 15]}, {"layers": [15, 40]}]}, "must end at 30"),
    ("/v1/plan", {"stages": [{"layers": [0, 30], "placement": "/etc/passwd"}]}, "unknown node '/etc/passwd'"),
])
def test_dashboard_forms_and_posted_plans_refuse_bad_input_clearly(api_server, path, body, message):
    response = httpx.post(f"{api_server}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and message in response.json()["error"]["message"], response.text


def test_bench_cli_against_the_server(api_server):
    result = cli("bench", "--url", api_server, "--requests", "4", "--concurrency", "2", "--scale", "0.05",
                 "--api-key", API_KEY, "--json", "--compare-estimate")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["requests"] == 4 and report["generated_tokens"] > 0 and report["throughput_tok_s"] > 0
    assert 0 < report["ttft_s"]["p50"] <= report["ttft_s"]["p99"]
    assert report["estimate"]["tpot_s"] > 0


@pytest.mark.parametrize("workload", [("chat", "--turns", "3", "--system-tokens", "64"), ("mixed", "--longs-first")])
def test_bench_chat_and_mixed_workloads(api_server, workload):
    """chat: 2 conversations of 3 turns, each turn resending the last (so the server's prefix
    cache hits); mixed: short answers and a long one, the long sent first."""
    hits = metrics(api_server)["shardwise:prefix_cache_hits_total"]
    result = cli("bench", "--url", api_server, "--workload", *workload, "--requests", "6", "--concurrency", "2",
                 "--scale", "0.1", "--max-output", "24", "--api-key", API_KEY, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["workload"] == workload[0] and report["requests"] == 6 and report["latency_s"]["p99"] > 0
    assert (metrics(api_server)["shardwise:prefix_cache_hits_total"] - hits >= 4 * 64) == (workload[0] == "chat")
    unknown = cli("bench", "--url", api_server, "--workload", "poisson", "--requests", "1")
    assert unknown.returncode == 1 and "unknown workload 'poisson'" in unknown.stderr


def test_serve_and_bench_cli_errors(api_server):
    port = api_server.rsplit(":", 1)[1]
    taken = cli("serve", "--port", port)
    assert taken.returncode == 1 and "cannot listen" in taken.stderr and "Traceback" not in taken.stderr
    unknown = cli("serve", "--model", "no-such-model")
    assert unknown.returncode == 1 and "no-such-model" in unknown.stderr and "Traceback" not in unknown.stderr
    nobody = cli("bench", "--url", f"http://127.0.0.1:{free_port()}", "--requests", "1")
    assert nobody.returncode == 1 and "cannot reach" in nobody.stderr


def test_a_collaborative_client_of_a_pipeline_server(api_server, llm):
    """Behind Ray stages the server runs collaborative segments on a model copy of its own."""
    from shardwise import LLM, SamplingParams
    from shardwise.collab.client import collaborative

    params = SamplingParams(max_tokens=12, temperature=0.0)
    segments = collaborative(api_server, api_key=API_KEY, sla=0.5, memory_gb=0.5)
    with LLM(executor=segments, threads=1, max_num_seqs=8) as c:
        assert {s["side"] for s in c.executor.session["segments"]} == {"client", "server"}
        assert c.generate(TEXT_PROMPTS[2], params)[0].token_ids == llm.generate(TEXT_PROMPTS[2], params)[0].token_ids
