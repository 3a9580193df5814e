"""The scheduler on the real model: admission by KV, chunked prefill beside running decodes,
joining at the next step, aborts; and the OpenAI penalties in the sampler."""

from __future__ import annotations

import pytest
import torch

from shardwise import SamplingParams, ShardwiseError
from shardwise.engine.sampling import SequenceSampler
from shardwise.engine.scheduler import Scheduler
from tests.conftest import TEXT_PROMPTS

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def scheduler_for(llm, **limits) -> Scheduler:
    settings = dict(max_num_seqs=32, max_batch_tokens=512, kv_capacity=4096) | limits
    return Scheduler(llm.executor, llm.spec, llm.tokenizer, **settings)


def test_requests_queue_when_the_kv_cache_is_full(llm):
    prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    need = max(len(p) for p in prompts) + GREEDY.max_tokens
    scheduler = scheduler_for(llm, kv_capacity=need)  # room for one sequence at a time
    seqs = [scheduler.make_sequence(100 + i, p, GREEDY) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    peak = 0
    while not all(s.output.finished for s in seqs):
        scheduler.step()
        peak = max(peak, scheduler.num_running)
        assert scheduler.kv_reserved <= scheduler.kv_capacity
    assert peak == 1 and scheduler.kv_reserved == 0
    alone = llm.generate(prompts, GREEDY)
    assert [s.output.token_ids for s in seqs] == [o.token_ids for o in alone]
    with pytest.raises(ShardwiseError, match="KV cache"):
        scheduler.make_sequence(200, prompts[0], SamplingParams(max_tokens=need))


def test_a_long_prompt_is_chunked_beside_running_decodes(llm):
    scheduler = scheduler_for(llm, max_batch_tokens=32)
    running = scheduler.make_sequence(300, llm.tokenizer.encode(TEXT_PROMPTS[0]),
                                      SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    scheduler.add(running)
    while not running.output.token_ids:
        scheduler.step()
    long_prompt = llm.tokenizer.encode(" ".join(TEXT_PROMPTS) * 8)[:300]
    late = scheduler.make_sequence(301, long_prompt, GREEDY)
    scheduler.add(late)  # joins at the next step
    steps = 0
    while not late.output.token_ids:
        before = len(running.output.token_ids)
        scheduler.step()
        steps += 1
        assert len(running.output.token_ids) == before + 1  # a decode every step: never stalled
    assert steps >= len(long_prompt) // 32  # the prompt went in pieces under the budget
    while not (running.output.finished and late.output.finished):
        scheduler.step()
    assert late.output.token_ids == llm.generate(long_prompt, GREEDY)[0].token_ids


def test_abort_frees_the_sequence_and_the_rest_go_on(llm):
    scheduler = scheduler_for(llm)
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    keep, drop = (scheduler.make_sequence(400 + i, llm.tokenizer.encode(p), params)
                  for i, p in enumerate(TEXT_PROMPTS[:2]))
    scheduler.add(keep)
    scheduler.add(drop)
    for _ in range(3):
        scheduler.step()
    scheduler.abort(drop)
    assert drop.output.finish_reason == "abort" and scheduler.num_running == 1
    assert scheduler.kv_reserved == keep.kv_tokens
    while not keep.output.finished:
        scheduler.step()
    assert keep.output.token_ids == llm.generate(TEXT_PROMPTS[0], params)[0].token_ids
    assert not scheduler.has_work and scheduler.kv_reserved == 0


def test_presence_and_frequency_penalties_follow_openai():
    params = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = SequenceSampler(params)
    logits = torch.tensor([3.0, 2.9, 1.0, 0.0])
    assert sampler(logits) == 0  # nothing generated yet: plain argmax
    assert sampler(logits) == 1  # token 0 now costs 0.5 + 0.25: 2.25 < 2.9
    assert sampler.generated == {0: 1, 1: 1}
    penalised = sampler._penalise(logits)
    assert torch.allclose(penalised, torch.tensor([2.25, 2.15, 1.0, 0.0]))
    with pytest.raises(ShardwiseError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)
