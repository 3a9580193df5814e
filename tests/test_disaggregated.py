"""Disaggregated prefill: long prompts run on a prefill pool of Ray stages, then move with their KV
to the decode pool's stages (another split of the layers), with the one-process engine's output."""

from __future__ import annotations

import pytest

from shardwise import LLM, SamplingParams, ShardwiseError
from tests.conftest import TEXT_PROMPTS

LONG = ["Here is a long story about the sea and a boat. " * 12 + "The end of the story is",
        "def add(a, b):\n    return a + b\n\n" * 10 + "def multiply(a, b):\n"]
PARAMS = [SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=20, temperature=0.8, seed=3, ignore_eos=True)]


@pytest.fixture(scope="module")
def disaggregated(ray_session):
    """Prompts of 32 tokens or more prefill on one stage, and decode on another (the API tests'
    server hands over between different splits); each stage's KV pool holds the 4096-token
    budget from the start."""
    llm = LLM(stages=1, prefill=1, dtype="float32", prefill_pool_min_tokens=32, max_batch_tokens=64,
              kv_tokens=4096, preallocate_kv=True)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def expected(llm):
    return {(p, i): o.token_ids for i, params in enumerate(PARAMS)
            for p, o in zip(TEXT_PROMPTS + LONG, llm.generate(TEXT_PROMPTS + LONG, [params] * 6), strict=True)}


def test_long_prompts_prefill_apart_and_every_output_equals_one_process(disaggregated, expected):
    """Greedy, then seeded: the second time the long prompts are mostly cached (on the decode
    pool, from the first time), so they prefill their rest there."""
    scheduler, cache = disaggregated.scheduler, disaggregated.scheduler.prefix_cache
    assert [(s["pool"], s["layers"]) for s in disaggregated.stages()] == [("prefill", [0, 30]), ("decode", [0, 30])]
    for i, params in enumerate(PARAMS):
        handoffs, hits = scheduler.handoffs, cache.hit_tokens
        outputs = disaggregated.generate(TEXT_PROMPTS + LONG, [params] * 6)  # short ones prefill beside the decodes
        assert [o.token_ids for o in outputs] == [expected[p, i] for p in TEXT_PROMPTS + LONG]
        assert scheduler.handoffs == handoffs + (0 if i else len(LONG))
        assert (cache.hit_tokens - hits > 100) == bool(i)
    stats, spec = disaggregated.stage_stats(), disaggregated.spec
    assert all(s["sequences"] == 0 and s["kv_blocks_in_use"] == 0 for s in stats)  # nothing left on either pool
    per_token_and_layer = 2 * spec.num_kv_heads * spec.head_dim * 4  # (fp32)
    assert [s["kv_pool_bytes"] for s in stats] == [4096 * per_token_and_layer * (b - a) for a, b in
                                                   (s["layers"] for s in stats)]  # (sized once, never grown)
    assert all(s["steps"] > 0 for s in stats)


@pytest.mark.slow
def test_a_lost_prefill_stage_is_replaced_and_every_sequence_replayed(disaggregated, llm):
    import ray

    scheduler = disaggregated.scheduler
    recoveries, handoffs = scheduler.recoveries, scheduler.handoffs
    prompts = TEXT_PROMPTS + [p.replace("a", "o") for p in LONG]  # (not cached)
    expected = [o.token_ids for o in llm.generate(prompts, PARAMS[1])]
    seqs = [disaggregated.new_sequence(disaggregated.prompt_ids(p), PARAMS[1]) for p in prompts]
    for seq in seqs:
        disaggregated.add(seq)
    disaggregated.step()  # (every sequence admitted: the long ones' first chunks on the prefill pool)
    ray.kill(disaggregated.executor.prefill.stages[0])
    while not all(seq.output.finished for seq in seqs):
        disaggregated.step()
    assert [s.output.token_ids for s in seqs] == expected
    assert scheduler.recoveries == recoveries + 1 and scheduler.handoffs == handoffs  # (replayed on the decode pool)
    again = TEXT_PROMPTS + ["Another one. " + p for p in LONG]  # (not cached either)
    assert [o.token_ids for o in disaggregated.generate(again, PARAMS[0])] == \
        [o.token_ids for o in llm.generate(again, PARAMS[0])]
    assert scheduler.handoffs == handoffs + 2  # the new prefill stage serves


def test_a_long_prompt_alone_prefills_where_it_will_decode(disaggregated, llm):
    """With nothing running on the decode pool, a prefill there holds no one up: no hand-over.
    Beside it, the second long prompt goes apart (the first is running on the decode pool). The
    pools are alike (one machine, one split), so each is taken at the speed of the faster: what
    the steps before measured of them differs by noise and by the decodes the steps ran."""
    scheduler, handoffs = disaggregated.scheduler, disaggregated.scheduler.handoffs
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for prompts, handed_over in ([LONG[0].upper()], 0), (["Twice. " + p.upper() for p in LONG], 1):  # (not cached)
        scheduler.pool_seconds_per_token[:] = [min(filter(None, scheduler.pool_seconds_per_token), default=None)] * 2
        assert [o.token_ids for o in disaggregated.generate(prompts, params)] == \
            [o.token_ids for o in llm.generate(prompts, params)]
        assert scheduler.handoffs == handoffs + handed_over
    assert all(scheduler.pool_seconds_per_token)  # both pools timed


def test_pools_of_split_stages_hand_over_each_devices_own_heads(ray_session, expected):
    """Both pools a stage split 2 ways (9 query heads on 3 key/value heads: one device holds
    two, the other one): the prefill pool's devices give up their heads of each long prompt's
    KV, the decode pool's take in theirs, and the outputs are one process's."""
    split = {"stages": [{"layers": [0, 30], "devices": [{}, {}]}]}
    llm = LLM(plan=split, prefill=split, dtype="float32", prefill_pool_min_tokens=32, max_batch_tokens=64)
    try:
        outputs = llm.generate(LONG + TEXT_PROMPTS[:1], [PARAMS[0]] * 3)
        assert [o.token_ids for o in outputs] == [expected[p, 0] for p in LONG + TEXT_PROMPTS[:1]]
        assert llm.scheduler.handoffs >= 1 and llm.scheduler.replayed_tokens == 0  # (one may prefill at home)
    finally:
        llm.close()


def test_a_disaggregated_engine_refuses_a_move_and_bad_pools_clearly(disaggregated, tmp_path):
    with pytest.raises(ShardwiseError, match="restart it with the new plan"):
        disaggregated.move_to({"stages": [{"layers": [0, 30]}]})
    with pytest.raises(ShardwiseError, match="positive integer"):
        LLM(stages=1, prefill=0)
    short = tmp_path / "short.json"
    short.write_text('{"stages": [{"layers": [0, 12]}]}')
    with pytest.raises(ShardwiseError, match="must end at 30"):
        LLM(stages=1, prefill=str(short))
    with pytest.raises(ShardwiseError, match="must end at 30"):
        LLM(stages=1, prefill={"stages": [{"layers": [0, 12]}]})
