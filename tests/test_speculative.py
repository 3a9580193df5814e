"""Speculative decoding: prompt-lookup drafts verified in one step (as decode rows, bit for bit the
logits of one-token steps), greedy output unchanged, sampled output distributed as without
speculation, KV of rejected drafts dropped."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from shardwise import LLM, SamplingParams
from shardwise.config import SpeculativeConfig
from shardwise.engine.sampling import SequenceSampler
from shardwise.engine.speculative import NgramDrafter, next_gamma
from shardwise.errors import ShardwiseError
from tests.conftest import TEXT_PROMPTS

CODE = '''def fibonacci(n):
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


def factorial(n):
    if n < 2:
        return 1
    return n * factorial(n - 1)
'''
EDIT = [{"role": "user", "content": f"Rename the function fibonacci to fib and repeat the whole code:\n\n{CODE}"}]


def test_prompt_lookup_proposes_what_followed_the_latest_match():
    drafter = NgramDrafter(SpeculativeConfig(max_ngram=3, min_ngram=1))
    assert drafter.lookup([1, 2, 3, 4, 9, 7, 2, 3], 3) == [4, 9, 7]  # "2 3" matched, latest first
    assert drafter.lookup([5, 1, 2, 6, 1, 2, 8, 1, 2], 2) == [8, 1]
    assert drafter.lookup([1, 2, 3], 4) == []
    assert next_gamma(4, 4, 4, 6) == 5 and next_gamma(5, 5, 1, 6) == 2 and next_gamma(2, 2, 0, 6) == 1
    with pytest.raises(ShardwiseError, match="medusa"):
        LLM(speculative="medusa")  # neither a drafter nor a model


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_verification_rows_give_the_logits_of_one_token_steps(weights, dtype):
    from shardwise.engine.shard import ShardModel

    shard = ShardModel(weights.spec, weights=weights, dtype=dtype)
    shard.allocate(0, ())
    shard.forward([0], [40], torch.arange(40))
    drafts = [5, 17, 99, 3]
    together = shard.forward([0], [4], torch.tensor(drafts), verify=[True])
    shard.kv.rewind(0, 40)
    one_by_one = torch.cat([shard.forward([0], [1], torch.tensor([t])) for t in drafts])
    assert torch.equal(together, one_by_one)


@pytest.fixture(scope="module")
def engines():
    """int4 engines without and with speculation."""
    plain, speculating = LLM(dtype="int4"), LLM(dtype="int4", speculative="ngram")
    yield plain, speculating
    plain.close()
    speculating.close()


def test_greedy_speculation_changes_no_token_and_drops_rejected_kv(engines):
    plain, llm = engines
    prompts = [EDIT, [{"role": "user", "content": TEXT_PROMPTS[0]}], [{"role": "user", "content": "Count to 30."}]]
    params = SamplingParams(max_tokens=60, temperature=0)
    got = llm.chat(prompts, params)  # speculating and plain decodes share each step
    assert [o.token_ids for o in got] == [o.token_ids for o in plain.chat(prompts, params)]
    s = llm.scheduler
    assert s.drafted_tokens > s.accepted_tokens > 0  # some drafts accepted, some rejected and rewound
    assert llm.executor.shard.kv.blocks_in_use == 0


@pytest.fixture(scope="module")
def self_drafting(llm):
    """The fp32 engine, and one drafting with its own weights as int4."""
    drafting = LLM(dtype="float32", speculative="int4")
    yield llm, drafting
    drafting.close()


def test_int4_self_draft_changes_no_token_greedy_or_seeded(self_drafting):
    plain, llm = self_drafting
    prompts = [[{"role": "user", "content": TEXT_PROMPTS[1]}], [{"role": "user", "content": "Count to 20."}]]
    params = [SamplingParams(max_tokens=40, temperature=0), SamplingParams(max_tokens=40, temperature=0.8, seed=3)]
    outs = llm.chat(prompts, params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain.chat(prompts, params)]
    s = llm.scheduler
    assert s.accepted_tokens > 0.6 * s.drafted_tokens  # int4 drafts mostly agree with fp32
    assert s.accepted_tokens <= sum(len(o.token_ids) - 1 for o in outs)  # none counted past a reply's end
    assert s.drafter.shard.kv.sequences() == []  # the draft KV went with the sequences
    # beside the model in one process, the draft copies the model's KV of the prompt, not prefills it
    ids = llm.chat_ids(prompts[0])
    seq = llm.new_sequence(ids, params[0])
    llm.add(seq)
    while len(seq.output.token_ids) < 2:
        llm.step()
    copied, model = (kv.extract(seq.id)[:, :, :, :len(ids)] for kv in (s.drafter.shard.kv, llm.local_shard().kv))
    assert torch.equal(copied, model)
    llm.abort(seq)
    s.drafter.shard, shard = None, s.drafter.shard  # a drafter that fails: the steps go on without drafts
    assert llm.chat(prompts[0], params[0])[0].token_ids == plain.chat(prompts[0], params[0])[0].token_ids
    s.drafter.shard = shard
    with pytest.raises(ShardwiseError, match="cheaper format"):
        LLM(dtype="int4", speculative="int4")


def test_a_smaller_draft_model_must_share_the_vocabulary(llm, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=64)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, **small)).save_pretrained(tmp_path / "other")
    with pytest.raises(ShardwiseError, match="vocabulary of 256"):
        LLM(dtype="int4", speculative=str(tmp_path / "other"))
    torch.manual_seed(0)  # a random draft: mostly rejected, and a context shorter than the model's
    LlamaForCausalLM(LlamaConfig(vocab_size=llm.spec.vocab_size, **small)).save_pretrained(tmp_path / "draft")
    drafting = LLM(dtype="float32", speculative=str(tmp_path / "draft"))
    params = SamplingParams(max_tokens=40, temperature=0)
    prompt = [{"role": "user", "content": "Count to 20."}]
    assert drafting.chat(prompt, params)[0].token_ids == llm.chat(prompt, params)[0].token_ids
    assert drafting.scheduler.drafted_tokens > 0
    drafting.close()


def test_sampled_verification_draws_each_token_from_the_models_distribution():
    """A draft proposed with certainty is accepted as often as the model would draw it, and
    the first token is distributed as a plain draw whichever token was drafted (chi-square
    over 4000 seeded draws)."""
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 1.5], [0.0, 0.3, 2.0, 0.1, 0.0, 0.0]])
    params = SamplingParams(temperature=0.9, top_k=5)
    expected = SequenceSampler(params)._probs(logits[0]).numpy()
    for draft in (0, 4):  # a likely draft, and one top-k removes
        counts = torch.zeros(6)
        for seed in range(4000):
            sampler = SequenceSampler(SamplingParams(temperature=0.9, top_k=5, seed=seed))
            counts[sampler.verify(logits, [draft])[0]] += 1
        kept = expected > 0
        assert counts[~torch.tensor(kept)].sum() == 0
        assert chisquare(counts.numpy()[kept], expected[kept] * 4000).pvalue > 1e-3, counts
        accepted = sum(SequenceSampler(SamplingParams(temperature=0.9, top_k=5, seed=seed)).verify(
            logits, [draft])[0] == draft for seed in range(4000))
        assert abs(accepted / 4000 - expected[draft]) < 0.03


def test_seeded_sampling_with_speculation_gives_the_tokens_without_it(engines):
    plain, llm = engines
    params = [SamplingParams(max_tokens=48, temperature=0.8, top_p=0.95, seed=seed) for seed in range(3)]
    accepted = llm.scheduler.accepted_tokens
    assert [o.token_ids for o in llm.chat([EDIT] * 3, params)] == [o.token_ids for o in plain.chat([EDIT] * 3, params)]
    assert llm.scheduler.accepted_tokens > accepted
