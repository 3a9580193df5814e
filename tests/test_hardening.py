"""One client never hurts another: sampling safe for every accepted value, failures isolated to
the request that causes them, bounded work per request, a bounded queue, graceful shutdown, and a
fuzzed API. Real model, real `shardwise serve` processes on 127.0.0.1."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwise.engine.executor import LocalExecutor
from shardwise.engine.sampling import SamplingParams, SequenceSampler
from shardwise.engine.scheduler import Scheduler
from tests.conftest import TEXT_PROMPTS, free_port, running_server

KEY = "sk-hardening"
MODEL = "smollm2-135m"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXTREMES = [{"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-300}, {"repetition_penalty": 1e-308},
            {"repetition_penalty": 1e308}, {"min_p": 1.0, "temperature": 2.0}, {"top_k": 1, "temperature": 1e-6}]


# --- sampling ---------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(temperature=st.floats(0, 2), top_p=st.floats(0, 1, exclude_min=True), top_k=st.integers(-1, 100),
       min_p=st.floats(0, 1), repetition_penalty=st.floats(0, 1e308, exclude_min=True),
       presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2),
       scale=st.sampled_from([1.0, 1e-30, 1e30, 3e38]))
def test_sampling_is_numerically_safe_for_every_accepted_value(scale, **values):
    params = SamplingParams(seed=1, **values)
    sampler = SequenceSampler(params, generated=[3, 3, 5])
    sampler.observe([1, 2, 3, 4, 5])
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0)) * scale
    for _ in range(3):
        assert 0 <= sampler(logits) < 64


@pytest.mark.parametrize("value", [{"temperature": float("nan")}, {"top_p": float("inf")}, {"top_p": 0.0},
                                   {"repetition_penalty": 0.0}, {"temperature": -1e-9}])
def test_values_outside_the_accepted_ranges_are_refused(value):
    with pytest.raises(Exception, match=next(iter(value))):
        SamplingParams(**value)


# --- failures stay with the request that causes them ---------------------------------------------
class FaultyExecutor(LocalExecutor):
    """The real model, but a step holding `poisoned` fails after its forward pass wrote (and
    advanced) every sequence's KV: the worst case a rewind must undo."""

    def __init__(self, worker, poisoned: int):
        super().__init__(worker)
        self.poisoned, self.failures = poisoned, 0

    def submit(self, seq_ids, chunks, sample):
        if self.poisoned not in seq_ids:
            return super().submit(seq_ids, chunks, sample)
        self.failures += 1
        self.shard.forward(seq_ids, [len(c) for c in chunks], torch.tensor([t for c in chunks for t in c]))
        return RuntimeError("a kernel failed on this batch")


def scheduled(llm, executor, prompts: list[list[int]], params: SamplingParams) -> list:
    scheduler = Scheduler(executor, llm.spec, llm.tokenizer, max_num_seqs=8, max_batch_tokens=64, kv_capacity=8192)
    seqs = [scheduler.make_sequence(1000 + i, ids, params) for i, ids in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_work:
        scheduler.step()
    assert executor.shard.kv.blocks_in_use == 0  # the failed sequence's KV is freed too
    return [s.output for s in seqs]


def test_a_failing_step_fails_only_the_sequence_that_causes_it(llm):
    prompts = [llm.prompt_ids(p) for p in TEXT_PROMPTS] + [llm.prompt_ids("Tell me a story about a dragon")] * 2
    greedy = SamplingParams(max_tokens=12, temperature=0)
    clean = scheduled(llm, LocalExecutor(llm.executor.worker), prompts, greedy)
    faulty = FaultyExecutor(llm.executor.worker, poisoned=1003)
    outputs = scheduled(llm, faulty, prompts, greedy)
    assert outputs[3].finish_reason == "error" and "kernel failed" in outputs[3].error
    for i in (0, 1, 2, 4, 5):  # the others were retried without it, from rewound KV: unchanged
        assert outputs[i].token_ids == clean[i].token_ids and outputs[i].error is None
    assert faulty.failures <= 4  # found by halving, not by failing everyone


def test_a_failing_sampler_fails_only_its_own_sequence(llm):
    class Broken(SequenceSampler):
        def __call__(self, logits):
            raise FloatingPointError("no distribution")

    worker = llm.executor.worker
    executor = LocalExecutor(worker)
    add = executor.add

    def add_breaking_one(seq_id, params, generated=()):
        add(seq_id, params, generated)
        if seq_id == 1001:
            worker.samplers[seq_id] = Broken(params)

    executor.add = add_breaking_one
    prompts = [llm.prompt_ids(p) for p in TEXT_PROMPTS]
    seeded = SamplingParams(max_tokens=10, temperature=0.8, seed=7)
    clean = scheduled(llm, LocalExecutor(worker), prompts, seeded)
    outputs = scheduled(llm, executor, prompts, seeded)
    assert outputs[1].finish_reason == "error" and "no distribution" in outputs[1].error
    assert [outputs[i].token_ids for i in (0, 2, 3)] == [clean[i].token_ids for i in (0, 2, 3)]


# --- a server with small limits -----------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("hardening") / "log", "--api-key", KEY, "--dtype", "int4",
                        "--max-num-seqs", "4", "--max-waiting", "4", "--max-queue-time", "3",
                        "--max-request-sequences", "8", "--max-request-tokens", "1200") as url:
        yield url


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    """Tiny requests only (so hundreds of generated cases stay quick); default queue limits."""
    with running_server(tmp_path_factory.mktemp("fuzz") / "log", "--api-key", KEY, "--dtype", "int4",
                        "--max-request-tokens", "48") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def gauge(url: str, name: str) -> float:
    found = re.findall(rf"^shardwise:{name}\{{[^}}]*\}} (\S+)$", httpx.get(f"{url}/metrics").text, re.M)
    return sum(map(float, found))


def stream_text(client, **kwargs) -> str:
    chunks = client.completions.create(model=MODEL, stream=True, **kwargs)
    return "".join(c.choices[0].text for c in chunks if c.choices)


def test_extreme_sampling_values_never_fail_the_requests_beside_them(client):
    long = dict(prompt=TEXT_PROMPTS[2], max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(4) as pool:  # within the server's --max-num-seqs: none waits
        running = pool.submit(stream_text, client, **long)
        time.sleep(0.5)  # the long one is decoding when the others arrive
        replies = [pool.submit(client.completions.create, model=MODEL, prompt=TEXT_PROMPTS[i % 2], max_tokens=8,
                               extra_body=extreme) for i, extreme in enumerate(EXTREMES)]
        for reply in replies:  # each is answered, none fails
            assert reply.result().choices[0].finish_reason in ("stop", "length")
        text = running.result()
    assert text == stream_text(client, **long)  # unchanged by its neighbours: the same as alone


def test_the_work_one_request_may_ask_for_is_bounded(server):
    http = httpx.Client(base_url=server, headers=AUTH, timeout=60)
    cases = [
        ({"prompt": ["hi"] * 10_000}, "/v1/completions", "too_many_sequences"),
        ({"prompt": "hi", "n": 9}, "/v1/completions", "too_many_sequences"),
        ({"prompt": "hi", "n": 4, "max_tokens": 400}, "/v1/completions", "request_too_large"),
        ({"messages": [{"role": "user", "content": ""}] * 50_000}, "/v1/chat/completions", "too_many_messages"),
    ]
    for body, path, code in cases:
        started = time.perf_counter()
        reply = http.post(path, json={"model": MODEL, **body})
        assert reply.status_code == 400 and reply.json()["error"]["code"] == code, reply.text
        assert time.perf_counter() - started < 5  # refused before any work
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "api_key_required": True}


def test_a_plan_posted_to_a_one_process_server_says_what_to_run_instead(server):
    http = httpx.Client(base_url=server, headers=AUTH, timeout=60)
    reply = http.post("/v1/plan", json={"stages": [{"layers": [0, 30]}]})
    assert reply.status_code == 400 and "runs in one process" in reply.json()["error"]["message"], reply.text
    reply = http.post("/v1/plan", content=b"{stages: oops")
    assert reply.status_code == 400 and "not JSON" in reply.json()["error"]["message"], reply.text


@pytest.mark.slow
def test_an_overloaded_server_refuses_with_retry_after_and_its_queue_drains(server, client):
    long = dict(model=MODEL, prompt=TEXT_PROMPTS[3], max_tokens=600, temperature=0, extra_body={"ignore_eos": True})
    with ThreadPoolExecutor(10) as pool:
        running = [pool.submit(client.completions.create, **long) for _ in range(4)]
        time.sleep(1.0)
        queued = [pool.submit(client.completions.create, **{**long, "max_tokens": 4}) for _ in range(4)]
        time.sleep(0.5)
        assert gauge(server, "num_requests_waiting") == 4 and gauge(server, "queue_oldest_wait_seconds") > 0
        with pytest.raises(openai.APIStatusError) as refused:  # the queue is full
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert refused.value.status_code == 503 and int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["code"] == "server_overloaded"
        for q in queued:  # they waited longer than --max-queue-time for a slot: refused, nothing ran
            with pytest.raises(openai.APIStatusError) as timed_out:
                q.result()
            assert timed_out.value.status_code == 503 and "waited" in timed_out.value.message
        assert all(len(r.result().choices[0].text) > 0 for r in running)
    assert gauge(server, "num_requests_waiting") == 0 and gauge(server, "queue_oldest_wait_seconds") == 0
    assert gauge(server, "kv_cache_usage_perc") == 0 and gauge(server, "requests_rejected_total") >= 5


def test_the_api_schema_declares_the_bodies_and_survives_fuzzing(fuzz_server, tmp_path):
    server = fuzz_server
    schema = httpx.get(f"{server}/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/collab/sessions", "/v1/dashboard/plan"):
        assert "$ref" in schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{server}/openapi.json", "--checks",
         "not_a_server_error", "--max-examples", "40", "--phases", "examples,coverage,fuzzing", "--workers", "1",
         "-H", f"Authorization: Bearer {KEY}", "--request-timeout", "60", "--max-time", "10"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    summary = result.stdout[-3000:]
    assert result.returncode == 0, summary
    # (--max-time bounds the run: a slower machine sends fewer cases, but always many per operation)
    assert int(re.search(r"(\d+) generated", summary)[1]) >= 100, summary
    assert httpx.get(f"{server}/health").json() == {"status": "ok", "api_key_required": True}


# --- shutdown ------------------------------------------------------------------------------------
def test_sigterm_drains_streams_and_exits_cleanly(tmp_path):
    """SIGTERM during 8 streams: new requests are refused, short ones finish, the ones still running
    at the drain timeout end with an error event (never cut), and the server exits 0."""
    port = free_port()
    log = tmp_path / "log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shardwise.cli", "serve", "--port", str(port), "--dtype",
                                 "int4", "--drain-timeout", "4"], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)

        def stream(max_tokens: int) -> list[dict]:
            body = {"model": MODEL, "prompt": TEXT_PROMPTS[2], "max_tokens": max_tokens, "stream": True,
                    "ignore_eos": True}
            events = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as reply:
                for line in reply.iter_lines():
                    if line.startswith("data: "):
                        events.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
            return events

        with ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream, n) for n in [24] * 4 + [5000] * 4]
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            refused = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert refused.status_code == 503 and refused.headers["retry-after"]
            results = [s.result() for s in streams]
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()
    for events in results[:4]:  # finished within the drain
        assert events[-1] == {"done": True} and events[-2]["choices"][0]["finish_reason"] == "length"
    for events in results[4:]:  # cut by the drain timeout: told so in band
        assert "shut down" in events[-1]["error"]["message"]
