"""Automatic prefix caching on the real model: a prompt that starts like an earlier one reuses
its cached KV blocks, and every output is token for token what it is without the cache."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from shardwise import LLM, SamplingParams
from shardwise.engine.kv_cache import BLOCK_SIZE
from shardwise.engine.prefix_cache import PrefixCache, block_keys

SYSTEM = ("You are a patient assistant for a museum. Visitors ask about paintings, opening hours and tickets; "
          "answer in one or two short sentences, politely, and never invent facts you do not know.")
TURNS = ["When does the museum open?", "Is there a discount for students?", "Can I take photos inside?"]
GREEDY = SamplingParams(max_tokens=20, temperature=0.0)
SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=4)


@contextmanager
def without_prefix_cache(llm: LLM):
    """Run `llm` with its prefix cache off (and empty), then on again, empty."""
    scheduler = llm.scheduler
    cache, scheduler.prefix_cache = scheduler.prefix_cache, None
    llm.executor.evict(cache.evict(cache.blocks))  # nothing runs: every cached block is unused
    try:
        yield
    finally:
        scheduler.prefix_cache = cache


def conversation(llm: LLM, params: SamplingParams) -> list[list[int]]:
    """A chat of several turns, each resending the system prompt and every earlier turn."""
    messages, replies = [{"role": "system", "content": SYSTEM}], []
    for turn in TURNS:
        messages.append({"role": "user", "content": turn})
        out = llm.chat(messages, params)[0]
        messages.append({"role": "assistant", "content": out.text})
        replies.append(out.token_ids)
    return replies


def test_a_multi_turn_chat_reuses_its_history_and_answers_as_without_the_cache(llm):
    with without_prefix_cache(llm):
        expected = [conversation(llm, GREEDY), conversation(llm, SEEDED)]
    cache = llm.scheduler.prefix_cache
    queried, hit = cache.query_tokens, cache.hit_tokens
    assert [conversation(llm, GREEDY), conversation(llm, SEEDED)] == expected
    system_blocks = len(llm.chat_ids([{"role": "system", "content": SYSTEM}])) // BLOCK_SIZE
    # every turn but the very first finds at least the system prompt; later turns their history too
    assert cache.hit_tokens - hit > (2 * len(TURNS) - 1) * system_blocks * BLOCK_SIZE
    assert (cache.hit_tokens - hit) / (cache.query_tokens - queried) > 0.6
    assert llm.scheduler.kv_reserved == 0 and cache.unused == cache.blocks > 0  # kept, yet not reserved


def test_prompts_sharing_part_of_a_block_reuse_only_the_full_blocks(llm):
    base = llm.prompt_ids("In a quiet village by the sea there lived an old fisherman who every morning walked "
                          "down to the harbour, greeted the gulls, checked his nets and his small blue boat, and")
    assert len(base) > 2 * BLOCK_SIZE
    cousin = base[:BLOCK_SIZE + 5] + llm.prompt_ids(" a red fox that ran across the snowy hills at night")
    exact = base[:2 * BLOCK_SIZE]  # two full blocks, both cached: the last token must still run
    with without_prefix_cache(llm):
        expected = [o.token_ids for o in llm.generate([base, cousin, exact], GREEDY)]
    cache = llm.scheduler.prefix_cache
    hits = []
    for prompt in (base, cousin, exact):
        before = cache.hit_tokens
        hits.append((llm.generate(prompt, GREEDY)[0].token_ids, cache.hit_tokens - before))
    assert [tokens for tokens, _ in hits] == expected
    assert [found for _, found in hits] == [0, BLOCK_SIZE, BLOCK_SIZE]


def test_block_keys_name_a_block_and_everything_before_it():
    a, b = list(range(40)), list(range(1, 41))
    assert len(block_keys(a)) == 2 and block_keys(a) == block_keys(a + [7])
    assert block_keys(a)[0] != block_keys(b)[0]
    same_block_other_past = block_keys(b[:16] + a[16:32])
    assert same_block_other_past[1] != block_keys(a)[1]  # a block's key depends on its past
    assert block_keys(a, start=1, parent=block_keys(a)[0]) == block_keys(a)[1:]


@pytest.mark.slow
def test_eviction_under_pressure_frees_only_unused_blocks_and_loses_nothing(llm):
    """A KV budget of 24 blocks, four sequences at a time reserving most of it, and prompts of
    more blocks than that: the cache keeps evicting, never a block in use, and every output is
    the uncached one."""
    small = LLM(dtype="float32", kv_tokens=24 * BLOCK_SIZE, max_num_seqs=4)
    try:
        stems = [llm.prompt_ids(f"Chapter {i}. " + "The river bends slowly past the mill, " * 5) for i in range(3)]
        prompts = [stem + llm.prompt_ids(f" and then number {j}") for stem in stems for j in range(3)] * 2
        params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
        with without_prefix_cache(llm):
            expected = [o.token_ids for o in llm.generate(prompts, params)]
        outputs = small.generate(prompts, params)
        assert [o.token_ids for o in outputs] == expected
        assert all(o.finish_reason in ("stop", "length") for o in outputs)
        cache, kv = small.scheduler.prefix_cache, small.local_shard().kv
        assert cache.hit_tokens > 0 and cache.blocks <= 24 and kv.blocks_kept == cache.blocks
        cached_once = {key for p, o in zip(prompts, outputs, strict=True) for key in block_keys((p + o.token_ids)[:-1])}
        assert len(cached_once) > 24  # more blocks filled than fit: it evicted
        assert len(kv.sequences()) == 0 and kv.blocks_in_use == 0
    finally:
        small.close()


def test_the_cache_can_be_turned_off(llm):
    off = LLM(dtype="float32", prefix_cache=False)
    try:
        assert off.scheduler.prefix_cache is None
        prompt = llm.prompt_ids(SYSTEM)
        assert [o.token_ids for o in off.generate([prompt, prompt], GREEDY)] == \
            [o.token_ids for o in llm.generate([prompt, prompt], GREEDY)]
        assert off.local_shard().kv.blocks_kept == 0
    finally:
        off.close()


@pytest.mark.parametrize("holders", [0, 1])
def test_only_unused_blocks_are_evicted_oldest_first(holders):
    cache = PrefixCache()
    old, new = block_keys(list(range(48))), block_keys(list(range(100, 132)))
    assert cache.insert(old) == old and cache.insert(old[:1]) == []  # a key cached twice: once
    cache.insert(new)
    cache.release(old)
    cache.release(new)
    cache.hold(old[:holders])
    assert cache.unused == 5 - holders and cache.match(old) == 3 and cache.match(block_keys(list(range(1, 33)))) == 0
    assert cache.evict(2) == [old[2], old[1]]  # the oldest unused first, a prefix's last block before its first
    assert cache.evict(10) == ([old[0]] if not holders else []) + [new[1], new[0]]
    assert cache.blocks == holders and cache.unused == 0
