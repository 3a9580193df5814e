"""Scheduling policies on the real model: FastServe's skip-join MLFQ lets short requests overtake
long ones (pausing them, or giving their KV back), priorities go first, and no policy changes a
single token."""

from __future__ import annotations

import time
from contextlib import contextmanager

import pytest

from shardwise import LLM, SamplingParams, ShardwiseError
from shardwise.engine.policy import SkipJoinMLFQ, make_policy
from tests.conftest import cli

LONG = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
SHORT = SamplingParams(max_tokens=6, temperature=0.8, seed=3, ignore_eos=True)


@contextmanager
def scheduled(llm: LLM, policy: str | SkipJoinMLFQ, max_num_seqs: int, kv_tokens: int | None = None):
    """The shared engine with another policy, fewer slots and maybe less KV, for a while."""
    s = llm.scheduler
    saved = s.policy, s.max_num_seqs, s.kv_capacity
    s.policy = make_policy(policy) if isinstance(policy, str) else policy
    s.max_num_seqs, s.kv_capacity = max_num_seqs, kv_tokens or s.kv_capacity
    try:
        yield s
    finally:
        s.policy, s.max_num_seqs, s.kv_capacity = saved


def heavy_tailed(llm: LLM) -> tuple[list[list[int]], list[SamplingParams]]:
    """Two long jobs first, then four short ones, all at once."""
    prompts = [llm.prompt_ids(f"Chapter {i}. The old lighthouse keeper") for i in range(2)]
    prompts += [llm.prompt_ids(f"Question {i}: what is {i} plus {i}?") for i in range(4)]
    return prompts, [LONG] * 2 + [SHORT] * 4


def finish_order(outputs) -> list[int]:
    return sorted(range(len(outputs)), key=lambda i: outputs[i].finish_time)


@pytest.mark.parametrize("kv_tokens", [None, 2 * (48 + 12) + 20])
def test_mlfq_lets_short_jobs_overtake_long_ones_with_the_same_tokens(llm, kv_tokens):
    """With two slots the shorts pause the longs (which keep their KV); with KV for two long
    jobs only, the longs also give their KV back and are prefilled again later. (A 4-token top
    quantum: the longs arrived first, and yield after 4 tokens.)"""
    prompts, params = heavy_tailed(llm)
    with scheduled(llm, "fcfs", 2, kv_tokens):
        fcfs = llm.generate(prompts, params)
    with scheduled(llm, SkipJoinMLFQ(quantum=4), 2, kv_tokens) as s:
        preemptions, recomputations = s.preemptions, s.recomputations
        mlfq = llm.generate(prompts, params)
        paused, recomputed = s.preemptions - preemptions, s.recomputations - recomputations
    assert [o.token_ids for o in mlfq] == [o.token_ids for o in fcfs]
    assert set(finish_order(fcfs)[:2]) == {0, 1}  # the longs hold both slots to the end
    assert set(finish_order(mlfq)[-2:]) == {0, 1}  # every short finished first
    assert paused >= 2 and (recomputed >= 1 if kv_tokens else recomputed == 0)
    mean = [sum(o.finish_time - o.arrival_time for o in outs) / len(outs) for outs in (fcfs, mlfq)]
    assert mean[1] < mean[0]
    assert llm.scheduler.num_running == 0 and len(llm.local_shard().kv) == 0


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_priority_goes_first(llm, policy):
    prompts = [llm.prompt_ids(f"Item {i}:") for i in range(3)]
    with scheduled(llm, policy, 1):
        outputs = llm.generate(prompts, SHORT, priority=[2, 0, 1])
    assert finish_order(outputs) == [1, 2, 0]


def test_mlfq_preempts_a_running_job_for_a_higher_priority_arrival(llm):
    with scheduled(llm, "mlfq", 1):
        low = llm.new_sequence(llm.prompt_ids("A long story begins"), LONG, priority=5)
        llm.add(low)
        while len(low.output.token_ids) < 4:
            llm.step()
        urgent = llm.new_sequence(llm.prompt_ids("Urgent:"), SHORT, priority=0)
        llm.add(urgent)
        while not (low.output.finished and urgent.output.finished):
            llm.step()
    assert urgent.output.finish_time < low.output.finish_time and low.preemptions == 1
    assert low.output.token_ids == llm.generate("A long story begins", LONG)[0].token_ids


def test_skip_join_levels_demotion_and_aging(llm):
    policy = SkipJoinMLFQ(quantum=2, prompt_quantum=16, aging_s=0.2)
    short, long = (llm.scheduler.make_sequence(i, [1] * n, SHORT) for i, n in ((0, 10), (1, 100)))
    now = time.perf_counter()
    for seq in (short, long):
        policy.enter(seq, now)
    assert (short.level, long.level) == (0, 3)  # 100 tokens need the 16 * 2**3 quantum: skips three levels
    for _ in range(2):
        policy.served(short, now)
    assert short.level == 1  # its top-level quantum (2 tokens) used up
    for _ in range(4):
        policy.served(short, now)
    assert short.level == 2 and policy.rank(short, now) < policy.rank(long, now)
    assert policy.rank(long, now + 1.0)[1] == 0  # starved a second: back to the top


def test_an_unknown_policy_is_refused_clearly(tmp_path):
    with pytest.raises(ShardwiseError, match="unknown scheduling policy 'lifo': use fcfs or mlfq"):
        LLM(policy="lifo")
    result = cli("serve", "--policy", "lifo", "--port", "1")
    assert result.returncode != 0 and "unknown scheduling policy 'lifo'" in result.stderr
    assert "Traceback" not in result.stderr
