"""The model split across Ray stage actors: same outputs, clean errors, no leaks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from shardwise import LLM, SamplingParams, ShardwiseError
from shardwise.model.product import quantised_tile_rows
from shardwise.planner.plan import Plan
from tests.conftest import TEXT_PROMPTS, free_port
from tests.test_loading import cli
from tests.test_prefix_cache import conversation, without_prefix_cache

GREEDY = SamplingParams(max_tokens=20, temperature=0.0)


def stage_actors_alive(ray) -> int:
    return sum(a["State"] == "ALIVE" and a["ActorClassName"] == "StageActor"
               for a in ray._private.state.actors().values())


@pytest.fixture(scope="module")
def reference(llm):
    return [o.token_ids for o in llm.generate(TEXT_PROMPTS, GREEDY)]


def test_even_plans_split_all_layers(weights):
    for n in (1, 2, 3, 5, 30):
        plan = Plan.even(weights.spec, n)
        plan.check_layers(weights.spec)
        sizes = [b - a for a, b in (s.layers for s in plan.stages)]
        assert len(sizes) == n and sum(sizes) == 30 and max(sizes) - min(sizes) <= 1
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_pipeline_outputs_equal_one_process_and_close_kills_the_actors(ray_session, reference, weights,
                                                                       model_path, tmp_path):
    """An uneven 3-stage plan (a one-layer stage), every stage busy at once (3 micro-batches).
    It also speculates (every stage runs the drafts as decode rows, the last verifies, and all
    rewind the rejected ones), and its stages fetch their layers as on machines without the
    model file (--fetch-weights; a copy of the model that no node's cache has seen): from the
    driver's node, checked, into their node's cache, where the copy is the model byte for byte
    once the 3 stages hold all its layers, and where a next start would find every piece. (The
    module's pipeline is an even split whose local stages read the driver's file.)"""
    import filecmp

    from shardwise.cache import cache_dir
    from shardwise.model.pieces import Layout, PartialCopy

    plan = Plan.from_dict({"stages": [{"layers": r} for r in ([0, 1], [1, 19], [19, 30])]})
    model = tmp_path / model_path.name
    shutil.copy(model_path, model)
    llm = LLM(str(model), plan=plan, dtype="float32", micro_batches=3, speculative="ngram", fetch_weights=True)
    pids = list(llm.executor.pids)
    try:
        assert llm.executor.parallelism == 3
        assert all(psutil.pid_exists(p) for p in pids)
        outputs = llm.generate(TEXT_PROMPTS, GREEDY)
        sent = ray_session.get(llm.executor._source.progress.remote())
    finally:
        llm.close()
    assert [o.token_ids for o in outputs] == reference
    assert llm.scheduler.accepted_tokens > 0
    layout = Layout(model)
    fetched = cache_dir() / "fetched" / layout.identity
    try:
        [(done, needed)] = sent.values()  # (one node)
        assert done == needed > 0.99 * model.stat().st_size
        assert filecmp.cmp(fetched / model.name, model, shallow=False)
        again = PartialCopy(layout.identity, model.name, layout.sizes)
        assert all(again.missing(layout.pieces_for(weights.spec, s.layers)) == [] for s in plan.stages)
    finally:
        shutil.rmtree(fetched, ignore_errors=True)
    deadline = time.time() + 10
    while time.time() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.2)
    assert not any(psutil.pid_exists(p) for p in pids)


@pytest.fixture(scope="module")
def pipeline(ray_session):
    # two micro-batches in flight, as stages on separate machines would run (local stages default to one)
    llm = LLM(stages=2, dtype="float32", micro_batches=2)
    yield llm
    llm.close()


def test_concurrent_sequences_equal_one_at_a_time(pipeline):
    prompts = [p * (i % 3 + 1) for i, p in enumerate(TEXT_PROMPTS * 2)]  # 8 prompts, different lengths
    together = pipeline.generate(prompts, GREEDY)
    alone = [pipeline.generate(p, GREEDY)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    assert len({len(o.prompt_token_ids) for o in together}) > 4


def test_stream_and_chat_through_the_pipeline(pipeline, llm):
    params = SamplingParams(max_tokens=24, temperature=0.0)
    pieces = list(pipeline.stream(TEXT_PROMPTS[1], params))
    assert "".join(pieces) == llm.generate(TEXT_PROMPTS[1], params)[0].text
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    assert pipeline.chat(messages, params)[0].text == llm.chat(messages, params)[0].text


def test_seeded_sampling_matches_one_process(pipeline, llm):
    params = SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=11)
    assert pipeline.generate(TEXT_PROMPTS[2], params)[0].token_ids == llm.generate(TEXT_PROMPTS[2], params)[0].token_ids


def test_kv_is_freed_over_25_requests(pipeline):
    params = SamplingParams(max_tokens=8, temperature=0.0)
    pipeline.generate(TEXT_PROMPTS[0], params)
    before = pipeline.executor.stats()
    rss = [psutil.Process(pid).memory_info().rss for pid in pipeline.executor.pids]
    for i in range(24):
        pipeline.generate(TEXT_PROMPTS[i % 4] + " " * (i % 5), params)
    after = pipeline.executor.stats()
    assert all(s["sequences"] == 0 and s["kv_blocks_in_use"] == 0 for s in after)
    assert [s["kv_pool_bytes"] for s in after] == [s["kv_pool_bytes"] for s in before]
    grown = [psutil.Process(pid).memory_info().rss - r for pid, r in zip(pipeline.executor.pids, rss, strict=True)]
    assert max(grown) < 64 * 2**20, grown


@pytest.mark.slow
def test_every_stage_caches_the_same_prefixes_and_a_lost_stage_empties_the_cache(pipeline, llm):
    """Each stage keeps its layers of the same blocks; a replacement stage starts empty, and so
    does the cache (the survivors drop theirs): the chat goes on as without any cache."""
    import ray

    with without_prefix_cache(llm):
        expected = conversation(llm, GREEDY)
    cache, scheduler = pipeline.scheduler.prefix_cache, pipeline.scheduler
    hit = cache.hit_tokens
    assert conversation(pipeline, GREEDY) == expected
    assert cache.hit_tokens > hit
    assert [s["kv_blocks_kept"] for s in pipeline.executor.stats()] == [cache.blocks] * 2
    recoveries = scheduler.recoveries
    ray.kill(pipeline.executor.stages[1])
    assert conversation(pipeline, GREEDY) == expected
    assert scheduler.recoveries == recoveries + 1
    assert [s["kv_blocks_kept"] for s in pipeline.executor.stats()] == [cache.blocks] * 2


def test_a_plan_whose_stages_fail_to_load_is_given_up_and_the_old_stages_serve_on(pipeline):
    pids = list(pipeline.executor.pids)
    pipeline.move_to({"stages": [{"layers": [0, 30], "device": "cuda:7"}]})  # no such device here
    assert not pipeline.executor.ready_to_move(timeout=120)
    assert pipeline.executor.moving is None and pipeline.executor.pids == pids
    event = pipeline.events()[-1]
    assert event["kind"] == "re-plan failed" and "cuda" in event["message"], event
    assert pipeline.generate(TEXT_PROMPTS[0], GREEDY)[0].token_ids


def test_bfloat16_stages_move_with_their_kv(ray_session):
    """bfloat16 KV (a GPU's default), which numpy lacks, travels as its bits: a move mid-reply
    carries it over, nothing replayed, the reply as undisturbed (a replay would sum its prompt
    in another order, and bfloat16 rounds that into other tokens)."""
    params = SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)  # (the move's stages load meanwhile)
    bf16 = LLM(stages=2, dtype="bfloat16")
    try:
        expected = bf16.generate(TEXT_PROMPTS[0], params)[0].token_ids
        for _, output in bf16.stream_outputs(TEXT_PROMPTS[0], params):
            if len(output.token_ids) == 4:
                bf16.move_to({"stages": [{"layers": [0, 10]}, {"layers": [10, 30]}]})
        assert output.token_ids == expected
        assert bf16.scheduler.replans == 1 and bf16.scheduler.replayed_tokens == 0
    finally:
        bf16.close()


@pytest.mark.parametrize("stages, message", [
    ([[0, 10], [12, 30]], "gap"),
    ([[0, 15], [10, 30]], "overlap"),
    ([[0, 10], [10, 10], [10, 30]], "empty"),
    ([[0, 10], [10, 25]], "must end at 30"),
])
def test_malformed_plans_fail_before_any_actor(ray_session, stages, message):
    alive = stage_actors_alive(ray_session)
    with pytest.raises(ShardwiseError, match=message):
        LLM(plan=Plan.from_dict({"stages": [{"layers": r} for r in stages]}))
    assert stage_actors_alive(ray_session) == alive


def test_unknown_node_and_plan_that_cannot_fit(ray_session, model_path, weights):
    from shardwise.cluster.pipeline import Pipeline

    alive = stage_actors_alive(ray_session)
    plan = Plan.from_dict({"stages": [{"layers": [0, 15]}, {"layers": [15, 30], "placement": "10.9.9.9"}]})
    with pytest.raises(ShardwiseError, match="unknown node '10.9.9.9'"):
        Pipeline(model_path, weights.spec, plan)
    with pytest.raises(ShardwiseError, match=r"need .* GiB .* but it has"):
        Pipeline(model_path, weights.spec, Plan.even(weights.spec, 2), kv_tokens=10**9)
    assert stage_actors_alive(ray_session) == alive


def test_a_stage_that_raises_fails_the_step_not_the_stage(ray_session, model_path, weights, llm):
    """A stage raising inside a step (here: a sequence it never saw) is a StepError: every stage
    lives on, and once its KV is rewound the batch's good sequence steps again as if nothing
    happened."""
    from shardwise.cluster.pipeline import Pipeline
    from shardwise.errors import StepError

    prompt = llm.prompt_ids(TEXT_PROMPTS[0])
    pipeline = Pipeline(model_path, weights.spec, Plan.even(weights.spec, 2))
    try:
        pids = list(pipeline.pids)
        pipeline.add(1, SamplingParams(temperature=0))
        with pytest.raises(StepError):
            pipeline.result(pipeline.submit([1, 99], [prompt, [5]], [True, True]))
        pipeline.rewind(1, 0)
        handle = pipeline.submit([1], [prompt], [True])
        pipeline.wait([handle])
        tokens = pipeline.result(handle).tokens
        assert pipeline.pids == pids  # no stage was replaced
        assert tokens == [llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]]
    finally:
        pipeline.close()


def test_bad_plan_files(tmp_path):
    with pytest.raises(ShardwiseError, match="does not exist"):
        Plan.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ShardwiseError, match="not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    for data, message in [({}, "stages"), ({"stages": [{"layer": [0, 1]}]}, "layers"),
                          ({"stages": [{"layers": [0, "x"]}]}, "two integers"),
                          ({"stages": [{"layers": [0, 30], "gpu": 1}]}, "unknown fields"),
                          ({"stages": [{"layers": [0, 30], "threads": 0}]}, "threads")]:
        with pytest.raises(ShardwiseError, match=message):
            Plan.from_dict(data)


def test_a_share_of_steps_to_check_outside_0_to_1_is_refused():
    result = cli("generate", "Hello", "--stages", "2", "--verify-stages", "1.5")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "the share of steps to check (verify_share, --verify-stages) is from 0 to 1, got 1.5" in result.stderr


def test_cli_generate_with_stages_and_plan(tmp_path, weights):
    """Also: a killed `ray start` leaves its address file behind; without --address shardwise
    starts a Ray of its own all the same."""
    temp = tempfile.mkdtemp(prefix="sw", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        (Path(temp) / "ray").mkdir()
        (Path(temp) / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}")
        # int4: the stages load the file's own blocks in a fraction of fp32's time
        # (the reply follows a JSON schema: the last stage masks the tokens)
        schema = tmp_path / "capital.json"
        schema.write_text(json.dumps({"type": "object", "required": ["capital"], "additionalProperties": False,
                                      "properties": {"capital": {"type": "string", "maxLength": 20}}}))
        result = subprocess.run([sys.executable, "-m", "shardwise.cli", "-v", "generate",
                                 "What is the capital of France?", "--stages", "2", "--max-tokens", "16", "--dtype",
                                 "int4", "--json-schema", str(schema)], capture_output=True, text=True, timeout=300,
                                env={**os.environ, "RAY_TMPDIR": temp})
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout) == {"capital": "Paris"}
    # --verbose: each stage says, as it loads, which kernels it loaded and each range's product
    loaded = [line for line in result.stderr.splitlines() if "products by rows" in line]
    qkv = f"qkv 1-8 q4 direct, 9-{quantised_tile_rows()} q4 tile"
    assert len(loaded) == 2 and all(qkv in line for line in loaded), result.stderr
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"stages": [{"layers": [0, 10]}, {"layers": [12, 30]}]}))
    result = cli("generate", "hi", "--plan", str(plan))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "gap" in result.stderr and len(result.stderr.strip().splitlines()) == 1

