"""Our logits and greedy continuations equal transformers' on the same GGUF."""

from __future__ import annotations

import itertools

import torch

from shardwise import SamplingParams, ShardModel
from tests.conftest import CHAT_PROMPTS, TEXT_PROMPTS


def run_prompts(shards: list[ShardModel], prompts: list[list[int]]) -> torch.Tensor:
    """Prefill every prompt as one packed batch through consecutive shards; all logits."""
    ids = list(range(len(prompts)))
    for shard in shards:
        for i in ids:
            shard.allocate(i)
    x = torch.tensor([t for p in prompts for t in p])
    lengths = [len(p) for p in prompts]
    for shard in shards:
        x = shard.forward(ids, lengths, x, logits="all")
    for shard in shards:
        for i in ids:
            shard.free(i)
    return x


def test_logits_match_transformers(llm, weights, hf_model):
    prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    ours = run_prompts([llm.executor.shard], prompts)
    offset = 0
    for prompt in prompts:
        with torch.no_grad():
            ref = hf_model(torch.tensor([prompt])).logits[0]
        diff = (ours[offset : offset + len(prompt)] - ref).abs().max().item()
        assert diff <= 1e-3, f"max |logit diff| {diff} for prompt of {len(prompt)} tokens"
        offset += len(prompt)


def test_greedy_chat_matches_transformers_generate(llm, hf_model):
    params = SamplingParams(max_tokens=64, temperature=0.0)
    for prompt in CHAT_PROMPTS:
        ids = llm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        ours = llm.generate(ids, params)[0]
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    eos_token_id=sorted(llm.tokenizer.eos_token_ids))
        assert ours.token_ids == ref[0, len(ids):].tolist(), prompt
        assert ours.text and ours.finish_reason in ("stop", "length")


def test_shards_chained_equal_one_model(llm, weights):
    prompts = [llm.tokenizer.encode(p) for p in TEXT_PROMPTS]
    whole = run_prompts([llm.executor.shard], prompts)
    spec = weights.spec
    for cuts in ([0, 15, 30], [0, 7, 20, 30], list(range(31))):
        shards = [ShardModel(spec, (a, b), weights=weights, dtype="float32") for a, b in itertools.pairwise(cuts)]
        chained = run_prompts(shards, prompts)
        diff = (chained - whole).abs().max().item()
        assert diff <= 1e-5, f"{len(shards)} shards differ from one by {diff}"


def test_chunked_prefill_equals_whole_prefill(llm):
    shard = llm.executor.shard
    prompt = llm.tokenizer.encode(TEXT_PROMPTS[2] * 3)
    whole = run_prompts([shard], [prompt])[-1]
    shard.allocate(99)
    for start in range(0, len(prompt), 5):
        chunk = prompt[start : start + 5]
        last = shard.forward([99], [len(chunk)], torch.tensor(chunk))[0]
    assert shard.cached_tokens(99) == len(prompt)
    shard.free(99)
    assert (last - whole).abs().max().item() <= 1e-4
