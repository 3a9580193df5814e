"""Tensor parallelism: a stage's layers split among several devices (processes summing their
parts each layer) in any shares, against the same layers on one device."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from shardwise import LLM, SamplingParams, ShardwiseError
from shardwise.model.tensor_split import split
from shardwise.model.weights import open_weights
from shardwise.planner.plan import Plan
from tests.conftest import TEXT_PROMPTS
from tests.test_architectures import ARCHITECTURES, build, prompts, run_prompts, shards

LAYOUTS = [(1, 1), (1, 1, 1), (3, 1)]  # shares: TP 2, TP 3, and one device 3x the other
LOGPROBS = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5)


@pytest.mark.parametrize("shares", [(1, 1), (3, 1), (1, 1, 1), (1, 1, 1, 1, 1), (2, 1, 1, 3), (1,) * 9])
def test_every_head_and_column_goes_to_one_device_in_proportion_to_its_share(weights, shares):
    spec = weights.spec  # 9 query heads reading 3 key/value heads, 1536 MLP columns
    group = spec.num_heads // spec.num_kv_heads
    slices = split(spec, shares)
    assert [s.q_heads for s in slices] == list(zip([0, *[s.q_heads[1] for s in slices[:-1]]],
                                                   [s.q_heads[1] for s in slices], strict=True))
    assert slices[-1].q_heads[1] == spec.num_heads and slices[-1].columns[1] == spec.intermediate_size
    for s, nxt in zip(slices, slices[1:], strict=False):
        assert s.columns[1] == nxt.columns[0] and s.columns[1] % 32 == 0  # whole quantisation blocks
    for s in slices:
        read = [h // group for h in range(*s.q_heads)]
        # the key/value heads its query heads read: each once where it reads them evenly, else one per query head
        assert list(s.kv_heads) in (sorted(set(read)), read)
        local = s.local_spec(spec)
        assert local.num_heads % local.num_kv_heads == 0
        want = spec.intermediate_size * shares[s.rank] / sum(shares)
        assert abs((s.columns[1] - s.columns[0]) - want) <= 32
    if spec.num_kv_heads >= len(shares):  # whole groups: no key/value head is held twice
        assert sum(len(s.kv_heads) for s in slices) == spec.num_kv_heads


def test_a_split_that_cannot_be_made_is_refused_with_the_reason(weights):
    with pytest.raises(ShardwiseError, match="10 devices cannot share 9 attention heads"):
        split(weights.spec, (1,) * 10)
    with pytest.raises(ShardwiseError, match="positive"):
        split(weights.spec, (1, 0))
    plan = {"stages": [{"layers": [0, 30], "devices": [{"share": 1}] * 10}]}
    with pytest.raises(ShardwiseError, match="plan stage 0: 10 devices cannot share 9 attention heads"):
        LLM(plan=plan)
    for devices, message in [([{"share": -1}, {}], "positive number"), ([{"shares": 1}, {}], "unknown fields"),
                             ("local", "a list")]:
        with pytest.raises(ShardwiseError, match=message):
            Plan.from_dict({"stages": [{"layers": [0, 30], "devices": devices}]})
    with pytest.raises(ShardwiseError, match="give tensor_parallel with stages only"):
        LLM(plan={"stages": [{"layers": [0, 30]}]}, tensor_parallel=2)


def test_a_device_reads_only_its_slice_of_a_tensor(weights, hf_dir):
    """Rows (in any order and repeated) and columns cut from the file equal those of the whole
    tensor: GGUF blocks as they are, columns inside a block from the blocks around them, q/k rows
    unpermuted per head, and safetensors ranges."""
    q, down = "layers.3.q.weight", "layers.3.down.weight"
    rows = [(128, 192), (0, 64), (0, 64)]
    assert torch.equal(weights.get(q, rows), torch.cat([weights.get(q)[a:b] for a, b in rows]))
    assert torch.equal(weights.get(down, None, (64, 384)), weights.get(down)[:, 64:384])
    assert torch.equal(weights.get(down, None, (70, 390)), weights.get(down)[:, 70:390])
    cut = weights.get_quantized(q, 4, rows)
    assert torch.equal(cut.dequantize(), torch.cat([weights.get_quantized(q, 4).dequantize()[a:b] for a, b in rows]))
    assert torch.equal(weights.get_quantized(down, 4, None, (64, 384)).dequantize(),
                       weights.get_quantized(down, 4).dequantize()[:, 64:384])
    hf = open_weights(hf_dir)
    assert torch.equal(hf.get(q, rows, (32, 96)), torch.cat([hf.get(q)[a:b, 32:96] for a, b in rows]))


@pytest.fixture(scope="module")
def devices(ray_session):
    """Three processes that each run their slice of a model's layers as one device of a group."""

    @ray_session.remote(num_cpus=0)
    class Device:
        def logits(self, path: str, shares: tuple, rank: int, port: int, batch: list[list[int]]) -> np.ndarray:
            from shardwise.engine.collective import TensorGroup
            from shardwise.engine.shard import ShardModel, TensorPart

            torch.set_num_threads(1)
            weights = open_weights(Path(path))
            group = TensorGroup(rank, len(shares), ("127.0.0.1", port), "127.0.0.1", torch.device("cpu"))
            part = TensorPart(split(weights.spec, shares)[rank], group)
            shard = ShardModel(weights.spec, weights=weights, dtype="float32", tensor=part)
            out = run_prompts([shard], batch)
            return out.numpy() if shard.is_last else None

        def sums(self, rank: int, port: int, floats: int) -> tuple[list[float], object, list[float]]:
            """Each device's part (rank + 1 everywhere) summed, the first device's message heard,
            and every device's number (rank + 0.5) gathered."""
            from shardwise.engine.collective import TensorGroup

            group = TensorGroup(rank, 3, ("127.0.0.1", port), "127.0.0.1", torch.device("cpu"))
            x = group.all_reduce(torch.full((floats,), rank + 1.0))
            heard = group.tell(("step", [rank] * 1000)) if rank == 0 else group.hear()
            gathered = group.gather(rank + 0.5)
            reported = group.reports() if rank == 0 else group.report(("kv", [rank] * 1000))
            group.close()
            return x.unique().tolist(), heard, (gathered, reported)

    actors = [Device.remote() for _ in range(3)]
    yield actors
    for actor in actors:
        ray_session.kill(actor)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_every_architecture_split_2_3_and_3_to_1_gives_one_device_logits(name, devices, ray_session, tmp_path):
    """Every position's logits of a prefilled batch, the first device's (the others sum into them)."""
    from shardwise.engine.collective import open_store

    _, path = build(name, tmp_path / name)
    batch = prompts()
    expected = run_prompts(shards(path), batch)
    for shares in LAYOUTS:
        store, port = open_store("127.0.0.1")  # (kept open while the group meets)
        got = ray_session.get([d.logits.remote(str(path), shares, rank, port, batch)
                               for rank, d in enumerate(devices[:len(shares)])])[0]
        del store
        got = torch.from_numpy(got.copy())
        diff = (got - expected).abs().max().item()
        assert diff <= 1e-4, f"{name} split {shares}: max |logit diff| {diff}"
        top = expected.topk(2).values
        clear = top[:, 0] - top[:, 1] > 1e-3  # (a near tie may go either way within fp32's rounding)
        assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_parts_larger_than_the_connections_buffers_sum_and_calls_arrive_whole(devices, ray_session):
    """32 MB parts each way between three devices (a device that sent all before it received
    would wait forever for the others); the first device's call reaches every other whole, and
    it gathers every device's number and message in rank order."""
    from shardwise.engine.collective import open_store

    store, port = open_store("127.0.0.1")
    got = ray_session.get([d.sums.remote(rank, port, 8 << 20) for rank, d in enumerate(devices)], timeout=120)
    del store
    assert [sums for sums, _, _ in got] == [[6.0]] * 3
    assert [heard for _, heard, _ in got] == [None, ("step", [0] * 1000), ("step", [0] * 1000)]
    assert [gathered for _, _, gathered in got] == [([0.5, 1.5, 2.5], [("kv", [1] * 1000), ("kv", [2] * 1000)]),
                                                    ([1.5], None), ([2.5], None)]


@pytest.mark.parametrize("shares", [(1, 1), (3, 1), (1, 1, 1, 1), (1,) * 9])
def test_a_split_stages_kv_heads_come_apart_and_back_together(weights, shares):
    """Each device's key/value heads taken from the KV of all of them (copies where a device's
    query heads read a shared head), and put back together from the devices' parts: the same
    KV, bit for bit."""
    from shardwise.model.tensor_split import heads_of, put_heads

    kv = np.random.default_rng(0).standard_normal((4, 2, weights.spec.num_kv_heads, 21, 8)).astype(np.float32)
    together = np.full_like(kv, np.nan)
    for s in split(weights.spec, shares):
        part = heads_of(kv, s.kv_heads)
        assert part.shape[2] == len(s.kv_heads)
        put_heads(together, s.kv_heads, part)
    assert np.array_equal(together, kv)


def test_sequences_move_out_of_and_into_a_split_stage_with_their_kv(ray_session, llm):
    """Mid-reply, a stage split 2 ways moves to a pipeline of two plain stages and then to a
    stage split 3:1: each time the split stage's devices give up or take in their own key/value
    heads of every sequence, nothing is replayed, and the greedy reply is one device's."""
    params = SamplingParams(max_tokens=160, temperature=0.0, ignore_eos=True)
    expected = llm.generate(TEXT_PROMPTS[1], params)[0].token_ids
    moves = [{"stages": [{"layers": [0, 12]}, {"layers": [12, 30]}]},
             {"stages": [{"layers": [0, 30], "devices": [{"share": 3}, {"share": 1}]}]}]
    split_llm = LLM(plan={"stages": [{"layers": [0, 30], "devices": [{}, {}]}]}, dtype="float32")
    try:
        scheduler, posted, moved_at = split_llm.scheduler, 0, []  # (the tokens out when each move landed)
        for _, output in split_llm.stream_outputs(TEXT_PROMPTS[1], params):
            if scheduler.replans > len(moved_at):
                moved_at.append(len(output.token_ids))
            landed = len(moved_at) == posted
            if moves and landed and len(output.token_ids) >= (moved_at[-1] if moved_at else 0) + 4:
                split_llm.move_to(moves.pop(0))
                posted += 1
        assert output.token_ids == expected
        assert len(moved_at) == 2 and moved_at[-1] < len(expected), moved_at
        assert scheduler.replayed_tokens == 0 and scheduler.stage_failures == 0
        assert [len(s.get("devices", [s])) for s in split_llm.executor.stats()] == [2]
    finally:
        split_llm.close()


def pids_of(llm: LLM) -> list[int]:
    return [d["pid"] for stage in llm.executor.stats() for d in stage.get("devices", [stage])]


@pytest.mark.slow
def test_the_default_model_split_3_to_1_and_within_a_pipeline_equals_one_device(ray_session, llm, caplog):
    """Alone (one device doing three times the other's work), and as the second stage of a
    pipeline split among 5 devices (9 query heads on 3 key/value heads: devices whose heads
    read two key/value heads hold copies; more devices than a small machine's cores, which the
    pipeline warns of). Greedy tokens identical, top log-probabilities within fp32 rounding;
    closing the pipeline ends every device's process."""
    expected = llm.generate(TEXT_PROMPTS, LOGPROBS)
    plans = [{"stages": [{"layers": [0, 30], "devices": [{"share": 3}, {"share": 1}]}]},
             {"stages": [{"layers": [0, 10]}, {"layers": [10, 30], "devices": [{}] * 5}]}]
    for plan in plans:
        caplog.clear()
        split_llm = LLM(plan=plan, dtype="float32")
        crowded = len(plan["stages"][-1]["devices"]) > ray_session.cluster_resources()["CPU"]
        assert ("give that node at most" in caplog.text) == crowded, caplog.text
        try:
            outputs = split_llm.generate(TEXT_PROMPTS, LOGPROBS)
            stats = split_llm.executor.stats()
            pids = pids_of(split_llm)
        finally:
            split_llm.close()
        assert len(pids) == sum(len(s.get("devices", [s])) for s in stats) == len(plan["stages"][-1]["devices"]) + \
            len(plan["stages"]) - 1
        assert all(d["collective_s"] > 0 for s in stats for d in s.get("devices", [])), stats
        for ours, theirs in zip(outputs, expected, strict=True):
            assert ours.token_ids == theirs.token_ids
            for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
                assert [t for t, _ in a.top] == [t for t, _ in b.top] or max(
                    abs(x - y) for (_, x), (_, y) in zip(a.top, b.top, strict=True)) < 1e-4
                assert abs(a.logprob - b.logprob) < 1e-4
        deadline = time.time() + 10
        while time.time() < deadline and any(psutil.pid_exists(p) for p in pids):
            time.sleep(0.2)
        assert not any(psutil.pid_exists(p) for p in pids)


def test_each_device_of_a_split_stage_reports_its_own_seconds_to_the_drift_watch(ray_session, tmp_path,
                                                                              monkeypatch):
    """With a cluster file, each device brings back its own seconds of compute for a step,
    without the sums (where it waits for the other), and the watch predicts each: one predicted
    and one measured figure per device, the stage shown as its slowest device."""
    from shardwise.cluster import drift

    monkeypatch.setattr(drift, "WARMUP_S", 0.0)
    monkeypatch.setattr(drift, "CHECK_EVERY_S", 0.05)
    cluster = tmp_path / "here.yaml"
    cluster.write_text("devices:\n  - {name: here, type: x86-cpu, count: 2}\n")
    plan = {"stages": [{"layers": [0, 30], "devices": [{"share": 1}, {"share": 1}]}]}
    split_llm = LLM(plan=plan, cluster=str(cluster), dtype="int4")
    try:
        split_llm.generate(TEXT_PROMPTS[0], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
        watch, stats, timing = split_llm.executor.watch, split_llm.executor.stats(), split_llm.executor.timing()
    finally:
        split_llm.close()
    assert watch is not None and len(watch.samples) > 10
    assert all(len(p) == len(m) == 2 and min(p + m) > 0 for _, p, m in watch.samples)
    assert len(timing) == 1 and timing[0] == max(watch.medians, key=lambda m: m[1])
    for k, device in enumerate(stats[0]["devices"]):  # (the samples are decode steps: fewer than every step)
        assert sum(m[k] for _, _, m in watch.samples) < device["busy_s"] - device["collective_s"]


@pytest.mark.slow
def test_a_lost_device_is_replaced_with_its_stage_and_the_reply_is_unchanged(ray_session):
    """int4, 2 stages of 2 devices each: killing the second stage's second device mid-reply
    restarts that stage (every device of it) and replays the sequences: the same greedy reply."""
    params = SamplingParams(max_tokens=48, temperature=0.0)
    split_llm = LLM(stages=2, tensor_parallel=2, dtype="int4")
    try:
        expected = split_llm.generate(TEXT_PROMPTS[2], params)[0].text
        victim = split_llm.executor.stats()[1]["devices"][1]["pid"]
        recoveries = split_llm.scheduler.recoveries
        stream = split_llm.stream(TEXT_PROMPTS[2], params)
        pieces = [next(stream) for _ in range(4)]
        os.kill(victim, signal.SIGKILL)
        text = "".join(pieces + list(stream))
        assert split_llm.scheduler.recoveries == recoveries + 1
        assert text == expected
        assert victim not in pids_of(split_llm) and len(pids_of(split_llm)) == 4
    finally:
        split_llm.close()


def test_the_estimator_times_a_split_stage_by_its_slowest_device_and_its_all_reduces():
    """Two devices at 3:1 of speed 3:1 take a quarter of one device's layer time each, plus two
    all-reduces a layer (and a broadcast of the embeddings), each the device's collective launch
    and its ring's hops on the link; a split that ignores the speeds waits for the slow device."""
    from shardwise.model.catalog import load_spec
    from shardwise.perf.estimate import Stage, stage_time
    from shardwise.perf.hardware import DeviceSpec, LinkSpec
    from shardwise.perf.operators import Precision, Work

    spec = load_spec("llama-3.1-8b")
    p, work = Precision("bf16", "bf16", "bf16"), Work.decode(1, 512)
    fast = DeviceSpec("fast", 1e12, 3e12, {"bf16": 1e15, "fp32": 1e15}, collective_s=1e-4)
    slow = DeviceSpec("slow", 1e12, 1e12, {"bf16": 1e15, "fp32": 1e15}, collective_s=1e-4)
    link = LinkSpec("l", 1e12, 1e-5)
    layers = spec.num_layers
    alone = stage_time(spec, Stage(fast, 1, layers - 1), work, p)
    message = spec.hidden_size * 2
    ring = 1e-4 + 2 * 1e-5 + message / 1e12  # 2 devices: 2 hops of half the message
    even = stage_time(spec, Stage(fast, 1, layers - 1, link=link, group=((fast, 0.5), (slow, 0.5))), work, p)
    by_speed = stage_time(spec, Stage(fast, 1, layers - 1, link=link, group=((fast, 0.75), (slow, 0.25))), work, p)
    collectives = 2 * (layers - 2) * ring
    assert by_speed == pytest.approx(alone * 0.75 + collectives, rel=0.05)
    assert even > by_speed * 1.3  # the slow device's half paces the stage
    first = stage_time(spec, Stage(fast, 0, 1, link=link, group=((fast, 0.75), (slow, 0.25))), work, p)
    assert first > stage_time(spec, Stage(fast, 1, 2, link=link, group=((fast, 0.75), (slow, 0.25))), work, p)
    # the first device's embedding and LM head do not overlap the others' layers (each layer's
    # sums hold them together): giving it less of each layer to make up for the head only lets
    # the slow device pace the layers (8B's head: ~2.4 layers' reads; at 73 % the two would
    # finish together if the head overlapped)
    def whole(first_share: float) -> float:
        group = ((fast, first_share), (slow, 1 - first_share))
        return stage_time(spec, Stage(fast, 0, layers, link=link, group=group), work, p)

    assert whole(0.73) > whole(0.75) < whole(0.77)
    # a link whose all-reduce was measured: its fixed time, and each device's part sent to the n-1 others
    measured = LinkSpec("l", 1e12, 1e-3, collective_s=5e-5, collective_bandwidth=1e9)
    trio = ((fast, 0.5), (slow, 0.25), (slow, 0.25))
    on_measured = stage_time(spec, Stage(fast, 1, layers - 1, link=measured, group=trio), work, p)
    on_ring = stage_time(spec, Stage(fast, 1, layers - 1, link=LinkSpec("l", 1e12, 0.0), group=trio), work, p)
    sums = 2 * (layers - 2) + 1  # (and the call that starts the step, with the hidden states)
    ring_sums = 2 * (layers - 2) * (1e-4 + 4 / 3 * message / 1e12) + 1e-4 + 2 / 3 * message / 1e12
    assert on_measured - on_ring == pytest.approx(sums * (5e-5 + 2 * message / 1e9) - ring_sums, rel=1e-6)
    # devices sharing a machine compute at once, each at the share of its speed it keeps then;
    # devices on machines of their own keep all of it
    def on(fast_machine: str, slow_machine: str) -> float:
        group = ((replace(fast, machine=fast_machine, crowded_share=0.8), 0.75),
                 (replace(slow, machine=slow_machine, crowded_share=0.8), 0.25))
        return stage_time(spec, Stage(group[0][0], 1, layers - 1, link=link, group=group), work, p)

    assert on("m", "n") == pytest.approx(by_speed)
    assert on("m", "m") - collectives == pytest.approx((by_speed - collectives) / 0.8, rel=0.01)


def test_the_planner_splits_a_stage_where_the_all_reduces_cost_less_than_they_save(tmp_path):
    """A bandwidth-bound 8B model on three equal CPU nodes: each reading a third of every layer
    beats a pipeline (which at batch 1 runs one stage at a time), and the plan says so; the
    135M model on the same nodes is step-overhead bound, and the planner keeps one device."""
    import json

    from tests.conftest import cli

    cluster = tmp_path / "cpus.yaml"
    cluster.write_text("devices:\n" + "".join(f"  - {{name: {n}, type: x86-cpu, node: 10.0.0.{i}}}\n"
                                              for i, n in enumerate("abc", 7))
                       + "default_link: {bandwidth_gbs: 1.25, latency_us: 50}\n")
    big = cli("plan", "--model", "llama-3.1-8b", "--cluster", str(cluster), "--objective", "latency",
              "--json", "--out", str(tmp_path / "plan.json"))
    assert big.returncode == 0, big.stderr
    summary = json.loads(big.stdout)
    assert summary["tensor_parallel"]["pays"]
    assert summary["tensor_parallel"]["value"] * 1.5 < summary["tensor_parallel"]["pipeline_value"]
    [stage] = json.loads((tmp_path / "plan.json").read_text())["stages"]
    assert stage["layers"] == [0, 32] and [d["placement"] for d in stage["devices"]] == ["10.0.0.7", "10.0.0.8",
                                                                                          "10.0.0.9"]
    assert [d["share"] for d in stage["devices"]] == pytest.approx([1 / 3] * 3)  # equal nodes, equal shares
    small = cli("plan", "--model", "smollm2-135m", "--cluster", str(cluster), "--objective", "latency")
    assert small.returncode == 0, small.stderr
    assert "tensor parallelism does not pay" in small.stdout.replace("\n", " ")
