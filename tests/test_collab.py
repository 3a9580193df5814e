"""Collaborative inference: a real `shardwise serve` (one process) and collaborative clients in
this process running some of the layers, with hidden states crossing real HTTPS and WSS (the
server's certificate from a test authority that the clients trust)."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
import trustme
import websocket
from safetensors.torch import save

from shardwise import LLM
from shardwise.collab.client import collaborative
from shardwise.collab.wire import MEDIA_TYPE, decode, encode
from shardwise.engine.sampling import SamplingParams
from shardwise.engine.structured import Constraint
from shardwise.errors import ShardwiseError
from tests.conftest import TEXT_PROMPTS, cli, free_port, running_server

KEY = "sk-collab-test"
MODEL = "smollm2-135m"
TTL_S = 6
KV_TOKENS = 4096
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
AUTHORITY = trustme.CA()
TLS = ssl.create_default_context()  # what the clients here trust: the authority above
AUTHORITY.configure_trust(TLS)


@pytest.fixture(scope="module")
def authority_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tls") / "authority.pem"
    AUTHORITY.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def server(authority_file):
    certificate = AUTHORITY.issue_cert("127.0.0.1")
    cert, key = authority_file.parent / "server.pem", authority_file.parent / "server.key"
    certificate.cert_chain_pems[0].write_to_path(str(cert))
    certificate.private_key_pem.write_to_path(str(key))
    with running_server(authority_file.parent / "log", "--api-key", KEY, "--collab-ttl", str(TTL_S),
                        "--kv-tokens", str(KV_TOKENS), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key),
                        tls=TLS) as url:
        yield url


def client(url: str, **kwargs) -> LLM:
    """The facade with a collaborative executor: some layers here, the rest on the server."""
    return LLM(MODEL, executor=collaborative(url, api_key=KEY, verify=TLS, **kwargs), threads=1, max_num_seqs=8)


def client_layers(c: LLM) -> int:
    return sum(b - a for s in c.executor.session["segments"] if s["side"] == "client" for a, b in [s["layers"]])


def layer_tokens(url: str) -> dict[tuple[str, int], float]:
    found = re.findall(r'shardwise:collab_layer_tokens_total\{layer="(\d+)",model_name="[^"]*",side="(\w+)"\} (\S+)',
                       httpx.get(f"{url}/metrics", verify=TLS).text)
    return {(side, int(layer)): float(value) for layer, side, value in found}


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {KEY}"}, verify=TLS).json()["collab"]


def test_output_equals_server_only_and_the_offloaded_work_is_counted(server, llm):
    before = layer_tokens(server)
    # the last one's grammar and biases cross the session's wire to whichever side samples
    params = [GREEDY] * 3 + [SamplingParams(max_tokens=12, temperature=0, logit_bias={16: -100},
                                            constraint=Constraint.regex("[0-9]{4}-[0-9]{2}"))]
    with client(server, sla=0.5, memory_gb=0.5) as c:
        session = c.executor.session
        sides = {s["side"] for s in session["segments"]}
        assert sides == {"client", "server"}, session  # the memory cap leaves some layers to the server
        got = c.generate(TEXT_PROMPTS[:4], params)
        for seq in c.executor.workers.values():  # only the client's own layers were loaded here
            assert len(seq.shard.blocks) < llm.spec.num_layers
    expected = llm.generate(TEXT_PROMPTS[:4], params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]
    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}", got[3].text)
    after = layer_tokens(server)
    tokens = sum(len(o.prompt_token_ids) + len(o.token_ids) - 1 for o in got)  # the last token is never fed
    for s in session["segments"]:
        for layer in range(*s["layers"]):
            assert after.get((s["side"], layer), 0) - before.get((s["side"], layer), 0) == tokens
            other = "server" if s["side"] == "client" else "client"
            assert after.get((other, layer), 0) == before.get((other, layer), 0)


def test_clients_of_different_speed_and_sla_get_different_splits(server):
    with client(server, sla=0.3, memory_gb=2) as fast, client(server, sla=0.15, memory_gb=2, slowdown=25) as slow:
        assert client_layers(fast) > client_layers(slow)
        assert fast.executor.session["predicted"]["server_work_s"] < slow.executor.session["predicted"]["server_work_s"]
        assert fast.executor.session["note"] is None and fast.executor.session["predicted"]["latency_s"] <= 0.3
        # the slow one meets its SLA, or (on a loaded machine) runs all on the server, saying so
        assert slow.executor.session["predicted"]["latency_s"] <= 0.15 or "SLA" in slow.executor.session["note"]


def test_an_sla_that_cannot_be_met_falls_back_or_is_refused(server):
    with client(server, sla=1e-6) as c:
        assert [s["side"] for s in c.executor.session["segments"]] == ["server"]
        assert "SLA" in c.executor.session["note"]
        assert c.generate("Hi", SamplingParams(max_tokens=4, temperature=0.0))[0].token_ids
    with pytest.raises(ShardwiseError, match="422.*SLA"):
        client(server, sla=1e-6, insist=True)


def test_idle_sessions_expire_and_free_their_kv_and_the_client_carries_on(server, llm):
    c = client(server, sla=0.5, memory_gb=0.5)
    c.generate("Once upon a time", SamplingParams(max_tokens=8, temperature=0.0))
    first = c.executor.session["session"]
    assert health(server)["kv_blocks"] > 0  # the finished sequence is freed with the next step, or on expiry
    deadline = time.time() + TTL_S + 10
    while time.time() < deadline and (health(server)["sessions"] or health(server)["kv_blocks"]):
        time.sleep(0.5)
    assert health(server)["sessions"] == 0 and health(server)["kv_blocks"] == 0
    # the expired session is replaced by a new one and the request replayed into it: same output
    again = c.generate(TEXT_PROMPTS[1], GREEDY)[0]
    assert again.token_ids == llm.generate(TEXT_PROMPTS[1], GREEDY)[0].token_ids
    assert c.scheduler.recoveries == 1 and c.executor.session["session"] != first
    c.close()


def test_bad_messages_get_a_clear_4xx_and_the_session_carries_on(server):
    http = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, verify=TLS)
    opened = http.post("/v1/collab/sessions", json={
        "model": MODEL, "sla_s": 10.0, "policy": "greedy",
        "client": {"layer_seconds": [1e-4] * 30, "memory_bytes": 0.3e9, "rtt_s": 0.001}}).json()
    segments = opened["segments"]
    assert [s["side"] for s in segments] == ["client", "server"] and segments[1]["layers"][0] > 0, opened
    url = f"/v1/collab/sessions/{opened['session']}/segments/1"
    step = {"seq_ids": [0], "chunks": [[1, 2, 3]], "sample": [True],
            "add": [{"seq_id": 0, "params": {"temperature": 0.0}}]}
    good = torch.randn(3, 576)

    def post(body: bytes, path: str = url) -> httpx.Response:
        return http.post(path, content=body, headers={"content-type": MEDIA_TYPE})

    def raw(tensor: torch.Tensor, **meta) -> bytes:  # as sent, dtype and all
        return save({"hidden": tensor}, metadata={k: json.dumps(v) for k, v in meta.items()})

    cases = [
        (encode(torch.randn(3, 575), **step), 400, "shape"),
        (encode(torch.randn(2, 576), **step), 400, "shape"),
        (raw(good.half(), **step), 400, "float32"),
        (encode(torch.full((3, 576), float("nan")), **step), 400, "NaN"),
        (encode(good, **step)[:-100], 400, "safetensors"),
        (b"hidden states", 400, "safetensors"),
        (struct.pack("<Q", 10**9) + b"{}", 400, "safetensors"),
        (encode(good, seq_ids=[0]), 400, "chunks"),
        (encode(None, **step), 400, "hidden"),
        (encode(good, **{**step, "chunks": [[1, 2, 10**9]]}), 400, "token ids"),
        (encode(good, **{**step, "add": []}), 400, "never added"),
        (encode(good, **{**step, "free": 5}), 400, "free"),  # malformed metadata: a 400 naming it, never a 500
        (encode(good, **{**step, "free": [[1]]}), 400, "free"),
        (encode(good, **{**step, "add": [{"seq_id": 0, "generated": 5}]}), 400, "generated"),
        (encode(good, **{**step, "add": [{"seq_id": 0, "params": {"temperature": -1}}]}), 400, "temperature"),
        (encode(torch.randn(2000, 576), seq_ids=list(range(2000)), chunks=[[1]] * 2000, sample=[True] * 2000,
                add=[{"seq_id": i} for i in range(2000)]), 400, "at most 64 sequences"),  # bounded per message
        (encode(torch.randn(3000, 576), seq_ids=[0], chunks=[[1] * 3000], sample=[True]), 400, "at most 2048 tokens"),
    ]
    for body, status, words in cases:
        reply = post(body)
        assert reply.status_code == status and words in reply.json()["error"]["message"], reply.text
    assert post(encode(good, **step), url.replace("/segments/1", "/segments/0")).status_code == 400  # the client's
    assert post(encode(good, **step), "/v1/collab/sessions/nope/segments/1").status_code == 404
    assert http.post(url, content=encode(good, **step)).status_code == 200  # the session still works
    assert http.delete(f"/v1/collab/sessions/{opened['session']}").status_code == 200
    assert httpx.post(f"{server}/v1/collab/echo", content=b"x", verify=TLS).status_code == 401  # the key applies


@contextlib.contextmanager
def recording_relay(port: int) -> Iterator[tuple[int, bytearray]]:
    """A TCP relay on 127.0.0.1 to `port` that keeps every byte it passes either way: what
    someone on the path between the machines would see."""
    seen, listener = bytearray(), socket.create_server(("127.0.0.1", 0))

    def pipe(source: socket.socket, sink: socket.socket) -> None:
        with source, sink, contextlib.suppress(OSError):  # (the other direction closed them first)
            while data := source.recv(1 << 16):
                seen.extend(data)
                sink.sendall(data)

    def accept() -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:  # closed
                return
            far = socket.create_connection(("127.0.0.1", port))
            for a, b in ((near, far), (far, near)):
                threading.Thread(target=pipe, args=(a, b), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    with listener:
        yield listener.getsockname()[1], seen


def test_over_tls_no_prompt_reply_key_or_hidden_state_crosses_in_the_clear(server, llm):
    """An OpenAI client and a collaborative client (hidden states over WSS) through a relay
    that records the traffic: both get the one-process engine's output, and the recording holds
    neither the prompt, the reply, the API key nor a hidden-state message; a client that
    does not trust the server's authority is refused."""
    secret = "Tell me about the pomegranate orchards of Ballyconneely."
    messages = [{"role": "user", "content": secret}]
    expected = llm.chat(messages, GREEDY)[0]
    with recording_relay(int(server.rsplit(":", 1)[1])) as (port, seen):
        relayed = f"https://127.0.0.1:{port}"
        api = openai.OpenAI(base_url=f"{relayed}/v1", api_key=KEY, http_client=httpx.Client(verify=TLS))
        reply = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=24, temperature=0)
        with client(relayed, sla=0.5, memory_gb=0.5) as c:
            assert {s["side"] for s in c.executor.session["segments"]} == {"client", "server"}
            shared = c.chat(messages, GREEDY)[0]
    assert reply.choices[0].message.content == expected.text == shared.text
    traffic = bytes(seen)
    expected_message_bytes = len(expected.prompt_token_ids) * llm.spec.hidden_size * 4
    assert len(traffic) > expected_message_bytes  # the relay did carry the hidden states
    # (every hidden-state message is a safetensors body: its header names the tensor's dtype and
    # the step's sequence ids in the clear, were it not encrypted)
    for clear in (secret.encode(), expected.text.encode(), KEY.encode(), b'"F32"', b"seq_ids"):
        assert clear not in traffic, clear
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server}/health")  # the system's authorities never signed it


def test_generate_cli_with_collab(server, llm, authority_file):
    result = cli("generate", "The capital of France is", "--no-chat", "--collab", server, "--api-key", KEY,
                 "--max-tokens", "8", "--sla", "500ms", "--ca-cert", str(authority_file))
    assert result.returncode == 0, result.stderr
    assert "split: " in result.stderr
    assert llm.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0.0))[0].text \
        in result.stdout
    with pytest.raises(ShardwiseError, match="is it running"):
        client(f"http://127.0.0.1:{free_port()}")


def stream(url: str, **headers: str) -> websocket.WebSocket:
    return websocket.create_connection(url, header=headers, sslopt={"context": TLS}, timeout=60)


def test_the_session_stream_answers_errors_in_band_and_needs_the_key(server):
    opened = httpx.post(f"{server}/v1/collab/sessions", headers={"Authorization": f"Bearer {KEY}"}, verify=TLS,
                        json={
        "model": MODEL, "sla_s": 10.0, "policy": "server",
        "client": {"layer_seconds": [1.0] * 30, "memory_bytes": 1e9, "rtt_s": 0.001}}).json()
    url = f"{server.replace('https', 'wss')}/v1/collab/sessions/{opened['session']}/stream"
    with pytest.raises(websocket.WebSocketBadStatusException, match="403"):
        stream(url)
    step = {"seq_ids": [0], "chunks": [[1, 2, 3]], "sample": [True],
            "add": [{"seq_id": 0, "params": {"temperature": 0.0}}]}
    with contextlib.closing(stream(url, Authorization=f"Bearer {KEY}")) as ws:
        ws.send_binary(encode(None, **step))  # no segment index
        assert "'segment'" in json.loads(ws.recv())["error"]["message"]
        ws.send_binary(encode(None, segment=0, **step))
        reply = ws.recv()
        assert isinstance(reply, bytes) and len(decode(reply)[1]["tokens"]) == 1


def test_the_stream_survives_malformed_metadata_and_text_frames(server):
    opened = httpx.post(f"{server}/v1/collab/sessions", headers={"Authorization": f"Bearer {KEY}"}, verify=TLS,
                        json={
        "model": MODEL, "sla_s": 10.0, "policy": "server",
        "client": {"layer_seconds": [1.0] * 30, "memory_bytes": 1e9, "rtt_s": 0.001}}).json()
    url = f"{server.replace('https', 'wss')}/v1/collab/sessions/{opened['session']}/stream"
    step = {"segment": 0, "seq_ids": [0], "chunks": [[1, 2, 3]], "sample": [True],
            "add": [{"seq_id": 0, "params": {"temperature": 0.0}}]}
    with contextlib.closing(stream(url, Authorization=f"Bearer {KEY}")) as ws:
        for bad in (encode(None, **{**step, "free": 5}), encode(None, **{**step, "generated": 5}), "a text frame"):
            ws.send_binary(bad) if isinstance(bad, bytes) else ws.send(bad)
            error = json.loads(ws.recv())["error"]
            assert error["type"] == "invalid_request_error" and error["code"] == "invalid_tensor", error
        ws.send_binary(encode(None, **step))  # the same socket still serves
        assert len(decode(ws.recv())[1]["tokens"]) == 1


@pytest.mark.slow
def test_collaborative_kv_comes_out_of_the_servers_one_budget(server):
    """A session's KV counts in kv_cache_usage_perc like the server's own requests, and a step that
    does not fit is refused (503, Retry-After) before it changes anything."""
    http = httpx.Client(base_url=server, headers={"Authorization": f"Bearer {KEY}"}, timeout=120, verify=TLS)
    opened = http.post("/v1/collab/sessions", json={
        "model": MODEL, "sla_s": 10.0, "policy": "server",
        "client": {"layer_seconds": [1.0] * 30, "memory_bytes": 1e9, "rtt_s": 0.001}}).json()
    url = f"/v1/collab/sessions/{opened['session']}/segments/0"

    def prefill(seq_id: int, tokens: int) -> httpx.Response:
        return http.post(url, content=encode(None, seq_ids=[seq_id], chunks=[[7] * tokens], sample=[False],
                                             add=[{"seq_id": seq_id}]), headers={"content-type": MEDIA_TYPE})

    def kv_usage() -> float:
        return float(re.search(r"shardwise:kv_cache_usage_perc\{[^}]*\} (\S+)", http.get("/metrics").text)[1])

    before = kv_usage()  # other tests' sessions may hold a few tokens until they expire
    assert prefill(0, 2000).status_code == 200
    assert kv_usage() - before == pytest.approx(2000 / KV_TOKENS, abs=16 / KV_TOKENS)
    assert prefill(1, 2000).status_code == 200
    full = prefill(2, 200 + int(before * KV_TOKENS))
    assert full.status_code == 503 and full.headers["retry-after"] and "KV cache is full" in full.text
    assert health(server)["sessions"] >= 1
    assert http.delete(f"/v1/collab/sessions/{opened['session']}").status_code == 200
    assert kv_usage() <= before


def test_tls_files_a_server_or_client_cannot_use_are_named_before_anything_starts(tmp_path):
    from shardwise.collab.client import tls_context
    from shardwise.serve.server import check_tls_files

    one, other = AUTHORITY.issue_cert("127.0.0.1"), AUTHORITY.issue_cert("127.0.0.1")
    cert, key, wrong_key = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "other.pem"
    one.cert_chain_pems[0].write_to_path(str(cert))
    one.private_key_pem.write_to_path(str(key))
    other.private_key_pem.write_to_path(str(wrong_key))
    check_tls_files(str(cert), str(key))  # a usable pair
    check_tls_files(None, None)  # plain HTTP
    with pytest.raises(ShardwiseError, match="needs both --ssl-certfile and --ssl-keyfile"):
        check_tls_files(str(cert), None)
    with pytest.raises(ShardwiseError, match="cannot use .*cert.pem and .*other.pem"):
        check_tls_files(str(cert), str(wrong_key))
    with pytest.raises(ShardwiseError, match="certificate authority file .*missing.pem"):
        tls_context(str(tmp_path / "missing.pem"))
