"""Generation behaviour: batching, sampling, stops, streaming, KV lifecycle."""

from __future__ import annotations

import pytest

from shardwise import SamplingParams, ShardwiseError
from tests.conftest import TEXT_PROMPTS

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def test_batched_prompts_equal_each_alone(llm):
    batched = llm.generate(TEXT_PROMPTS, GREEDY)
    alone = [llm.generate(p, GREEDY)[0] for p in TEXT_PROMPTS]
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert len({len(o.prompt_token_ids) for o in batched}) == len(TEXT_PROMPTS)  # different lengths


def test_chunked_prefill_in_the_step_loop(llm):
    """A small token budget splits prompts over steps beside running decodes; same tokens."""
    reference = llm.generate(TEXT_PROMPTS, GREEDY)
    budget, llm.scheduler.max_batch_tokens = llm.scheduler.max_batch_tokens, 6
    try:
        chunked = llm.generate(TEXT_PROMPTS, GREEDY)
    finally:
        llm.scheduler.max_batch_tokens = budget
    assert [o.token_ids for o in chunked] == [o.token_ids for o in reference]


def test_seeded_sampling_is_reproducible_and_seeds_differ(llm):
    def run(seed):
        params = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.95, seed=seed)
        return llm.generate(TEXT_PROMPTS[2], params)[0].token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_seed_is_independent_of_batch_neighbours(llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, seed=3)
    alone = llm.generate(TEXT_PROMPTS[0], params)[0].token_ids
    together = llm.generate(TEXT_PROMPTS, params)[0].token_ids
    assert alone == together


def test_sampling_filters_restrict_choices(llm):
    # top_k=1 and a tiny top_p both reduce sampling to the greedy token
    greedy = llm.generate(TEXT_PROMPTS[1], GREEDY)[0].token_ids
    for params in (SamplingParams(max_tokens=24, temperature=1.5, top_k=1, seed=1),
                   SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, seed=2),
                   SamplingParams(max_tokens=24, temperature=1.0, min_p=1.0, seed=3)):
        assert llm.generate(TEXT_PROMPTS[1], params)[0].token_ids == greedy


def test_repetition_penalty_changes_output(llm):
    prompt = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
    plain = llm.generate(prompt, GREEDY)[0]
    penalised = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=0.0, repetition_penalty=2.0))[0]
    assert plain.token_ids != penalised.token_ids


def test_max_tokens_and_length_finish(llm):
    out = llm.generate(TEXT_PROMPTS[3], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_ends_and_is_excluded(llm):
    full = llm.generate(TEXT_PROMPTS[3], GREEDY)[0].text
    stop = full.strip()[2:5]
    assert stop and stop in full
    out = llm.generate(TEXT_PROMPTS[3], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[: full.index(stop)]


def test_stream_pieces_add_up_to_the_text(llm):
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=["\n\n"])
    pieces = list(llm.stream(TEXT_PROMPTS[1], params))
    assert len(pieces) > 3
    assert "".join(pieces) == llm.generate(TEXT_PROMPTS[1], params)[0].text


def test_eos_stops_a_chat_reply(llm):
    out = llm.chat([{"role": "user", "content": "Say hello."}], SamplingParams(max_tokens=200, temperature=0.0))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.tokenizer.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_kv_is_freed_after_every_request(llm):
    kv = llm.executor.shard.kv
    llm.generate(TEXT_PROMPTS, GREEDY)
    assert len(kv) == 0 and kv.blocks_in_use == 0
    stream = llm.stream(TEXT_PROMPTS[0], SamplingParams(max_tokens=50, temperature=0.0))
    next(stream)
    assert len(kv) == 1
    stream.close()  # a client that walks away
    assert len(kv) == 0 and kv.blocks_in_use == 0


def test_timings_are_recorded(llm):
    out = llm.generate(TEXT_PROMPTS[0], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert out.ttft is not None and out.ttft > 0 and out.decode_tokens_per_s > 0


@pytest.mark.parametrize("kwargs, word", [
    ({"temperature": -1}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"min_p": 2}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_bad_sampling_params_are_named(kwargs, word):
    with pytest.raises(ShardwiseError, match=word):
        SamplingParams(**kwargs)


def test_bad_prompts_are_named(llm):
    with pytest.raises(ShardwiseError, match="empty"):
        llm.generate("")
    with pytest.raises(ShardwiseError, match="context"):
        llm.generate([1] * (llm.spec.context_length + 5))
    with pytest.raises(ShardwiseError, match="token ids"):
        llm.generate([[10**9]])
    with pytest.raises(ShardwiseError, match="role"):
        llm.chat([{"content": "no role"}])
