"""Every supported architecture against transformers' own implementation, on small random
models built from transformers' config and model classes and saved with save_pretrained:
logits, greedy continuations, the model as 3 shards, batched decode, sequences moving to
another split of the layers, and the same model written to GGUF."""

from __future__ import annotations

import itertools

import pytest
import torch

from shardwise import LLM, SamplingParams, ShardModel, ShardwiseError
from shardwise.engine.speculative import ModelDrafter
from shardwise.engine.worker import Worker
from shardwise.model.spec import SUPPORTED_ARCHITECTURES, ModelSpec
from shardwise.model.weights import open_weights
from tests.gguf_writer import write_gguf
from tests.test_parity import run_prompts

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2, initializer_range=0.1, tie_word_embeddings=False)
WINDOW = 12  # shorter than the longer prompts plus their continuations, so the window matters
# name: (transformers config class, model class, settings over SMALL)
ARCHITECTURES = {
    "llama-3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32))),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                                                          partial_rotary_factor=0.5))),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(sliding_window=WINDOW, query_pre_attn_scalar=24,
                                                         tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=WINDOW, query_pre_attn_scalar=24, tie_word_embeddings=True, rope_parameters=dict(
            full_attention=dict(rope_type="linear", factor=8.0, rope_theta=1000000.0),
            sliding_attention=dict(rope_type="default", rope_theta=10000.0)))),
}
PROMPT_LENGTHS = (3, 9, 20)
NEW_TOKENS = 32


def build(name: str, path):
    """(the HF model of architecture `name` in fp32, random weights, saved to path)."""
    import transformers
    from transformers.utils import logging

    logging.set_verbosity_error()
    config_class, model_class, settings = ARCHITECTURES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**SMALL, **settings}, attn_implementation="eager")
    hf = getattr(transformers, model_class)(config).eval()
    hf.generation_config.eos_token_id = None  # continue for all NEW_TOKENS
    hf.save_pretrained(path)
    return hf, path


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def model(request, tmp_path_factory):
    """(the HF model in fp32, its save_pretrained directory) for one architecture."""
    return build(request.param, tmp_path_factory.mktemp(request.param))


def prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, SMALL["vocab_size"], (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def hf_logits(hf, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0]


def shards(path, cuts=(0, 6)) -> list[ShardModel]:
    weights = open_weights(path)
    return [ShardModel(weights.spec, (a, b), weights=weights, dtype="float32") for a, b in itertools.pairwise(cuts)]


def greedy(chain: list[ShardModel], batch: list[list[int]], new: int) -> list[list[int]]:
    """Greedy continuations of all prompts, decoded together one token per step."""
    ids = list(range(len(batch)))
    for shard in chain:
        for i in ids:
            shard.allocate(i)
    x, lengths, out = torch.tensor([t for p in batch for t in p]), [len(p) for p in batch], [[] for _ in batch]
    for _ in range(new):
        for shard in chain:
            x = shard.forward(ids, lengths, x)
        x, lengths = x.argmax(-1), [1] * len(batch)
        for row, token in zip(out, x.tolist(), strict=True):
            row.append(token)
    for shard in chain:
        for i in ids:
            shard.free(i)
    return out


def test_spec_reads_the_architecture(model):
    hf, path = model
    spec = open_weights(path).spec
    assert spec.architecture in SUPPORTED_ARCHITECTURES and spec.num_layers == 6 and spec.head_dim == 16
    if spec.num_experts:
        assert spec.parameters(active=True) < spec.parameters()
    assert spec.parameters() == sum(p.numel() for p in hf.parameters())


def test_logits_equal_transformers(model):
    hf, path = model
    batch = prompts()
    ours = run_prompts(shards(path), batch)
    offset = 0
    for prompt in batch:
        diff = (ours[offset : offset + len(prompt)] - hf_logits(hf, prompt)).abs().max().item()
        assert diff <= 1e-4, f"max |logit diff| {diff} for a prompt of {len(prompt)} tokens"
        offset += len(prompt)


def test_greedy_continuations_equal_transformers_whole_and_as_3_shards(model):
    hf, path = model
    batch = prompts()
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(p):].tolist()
                    for p in batch]
    for chain in (shards(path), shards(path, (0, 2, 4, 6))):
        one_at_a_time = [greedy(chain, [p], NEW_TOKENS)[0] for p in batch]
        assert one_at_a_time == expected
        assert greedy(chain, batch, NEW_TOKENS) == expected  # batched decode, different lengths


def test_gguf_written_by_the_gguf_library_gives_the_same_logits(model, tmp_path):
    hf, path = model
    file = write_gguf(path, tmp_path / "model.gguf")
    weights = open_weights(file)
    assert weights.spec.num_experts == open_weights(path).spec.num_experts
    batch = prompts()
    ours = run_prompts([ShardModel(weights.spec, weights=weights, dtype="float32")], batch)
    reference = torch.cat([hf_logits(hf, p) for p in batch])
    assert (ours - reference).abs().max().item() <= 1e-4


def test_a_model_directory_without_a_tokenizer_says_so(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**SMALL)).save_pretrained(tmp_path)
    with pytest.raises(ShardwiseError, match="has no tokenizer files"):
        LLM(str(tmp_path))


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    message = "architecture 'gpt2' is not supported yet; supported: llama, mistral, mixtral, qwen2, qwen3, phi3, "
    with pytest.raises(ShardwiseError, match=message):
        LLM(str(tmp_path))
    spec = ModelSpec("falcon", num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=4, intermediate_size=96,
                     vocab_size=256)
    with pytest.raises(ShardwiseError, match="architecture 'falcon' is not supported yet"):
        ShardModel(spec, weights=None)


def test_moe_runs_only_the_experts_each_token_chose():
    """An expert filled with NaN poisons exactly the tokens routed to it: the others never touch it
    (computing all experts times a mask would spread the NaN to every token)."""
    from shardwise.model.layers import SparseMoE

    spec = ModelSpec("mixtral", num_layers=1, hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=48,
                     vocab_size=64, num_experts=4, experts_per_token=2)
    torch.manual_seed(0)
    tensors = {"router.weight": torch.randn(4, 32), "experts_gate.weight": torch.randn(4, 48, 32),
               "experts_up.weight": torch.randn(4, 48, 32), "experts_down.weight": torch.randn(4, 32, 48)}
    tensors["experts_down.weight"][3] = float("nan")
    x = torch.randn(64, 32)
    chose = (x @ tensors["router.weight"].t()).topk(2, dim=-1).indices
    poisoned = (chose == 3).any(-1)
    out = SparseMoE(spec, tensors)(x)
    assert 0 < poisoned.sum() < len(x)
    assert out[poisoned].isnan().all(-1).all() and out[~poisoned].isfinite().all()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_experts_equal_their_dequantised_weights(bits):
    """An MoE layer whose expert stacks stay in blocks (each expert's product by the kernels, on
    a slice of the stack) gives what the same layer over the dequantised stacks gives."""
    from shardwise.model.layers import SparseMoE
    from shardwise.quant import QuantizedWeight, quantize

    spec = ModelSpec("mixtral", num_layers=1, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=96,
                     vocab_size=64, num_experts=4, experts_per_token=2)
    torch.manual_seed(bits)
    floats = {"router.weight": torch.randn(4, 64), "experts_gate.weight": torch.randn(4, 96, 64),
              "experts_up.weight": torch.randn(4, 96, 64), "experts_down.weight": torch.randn(4, 64, 96)}
    blocks = {name: t if name == "router.weight" else quantize(t, bits) for name, t in floats.items()}
    dequantised = {name: t.dequantize() if isinstance(t, QuantizedWeight) else t for name, t in blocks.items()}
    for tokens in (1, 5, 200):  # every product path: blocks read directly, tile-dequantised, dequantised
        x = torch.randn(tokens, 64)
        expected = SparseMoE(spec, dequantised)(x)
        # (1, 5 tokens: activations rounded to int16 per row; the MoE's inner activations are heavy-tailed)
        assert (SparseMoE(spec, blocks)(x) - expected).abs().max() <= 5e-4 * expected.abs().max()


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_a_quantised_mixtral_computes_with_its_blocks(dtype, tmp_path):
    """The random Mixtral loaded with every matrix, expert stacks included, in int8 / int4 blocks
    gives the logits and greedy tokens of the same model holding those blocks dequantised to fp32
    (random weights are too sensitive to rounding for a quality check: test_quantization measures
    quality on the real model)."""
    from shardwise.model.product import Product, product
    from shardwise.quant import QuantizedWeight

    _, path = build("mixtral", tmp_path)
    weights = open_weights(path)
    quantised = ShardModel(weights.spec, weights=weights, dtype=dtype)
    gate_up, down = quantised.blocks[0].mlp.experts[0]
    assert isinstance(gate_up.weight, QuantizedWeight) and gate_up.weight.shape == (2 * 96, 64)
    assert isinstance(down.weight, QuantizedWeight) and down.weight.bits == int(dtype[3:])

    def dequantised(value):
        if isinstance(value, QuantizedWeight):
            return value.dequantize()
        if isinstance(value, Product) and isinstance(value.weight, QuantizedWeight):
            return product(value.weight.dequantize(), value.bias)
        if isinstance(value, tuple):  # an expert's products
            return tuple(map(dequantised, value))
        if isinstance(value, list) and value and isinstance(value[0], tuple):
            return list(map(dequantised, value))
        return value

    floats = ShardModel(weights.spec, weights=weights, dtype=dtype)
    for owner in (floats, *floats.blocks, *(block.mlp for block in floats.blocks)):
        for name, value in vars(owner).items():
            setattr(owner, name, dequantised(value))
    batch = prompts()
    expected = run_prompts([floats], batch)
    assert (run_prompts([quantised], batch) - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert greedy([quantised], batch, NEW_TOKENS) == greedy([floats], batch, NEW_TOKENS)


# the architectures whose decode steps run all layers in one kernel call (shardwise.model.fused_decode):
# every dense one (Mixtral's experts are not in it)
FUSED = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM", "Phi3ForCausalLM",
         "Gemma2ForCausalLM", "Gemma3ForCausalLM"}


@pytest.mark.parametrize("dtype", ["float32", "int4"])
def test_decode_in_one_kernel_call_equals_layer_by_layer(model, dtype):
    """Logits of 12 sequences decoding together (past the direct kernels' 8 rows), fused and op by op."""
    hf, path = model
    weights = open_weights(path)
    fused, by_layer = (ShardModel(weights.spec, weights=weights, dtype=dtype) for _ in range(2))
    assert (fused.fused is not None) == (type(hf).__name__ in FUSED)
    if fused.fused is None:
        return
    by_layer.fused = None
    generator = torch.Generator().manual_seed(2)
    batch = [torch.randint(3, SMALL["vocab_size"], (n,), generator=generator) for n in range(2, 26, 2)]
    ids = list(range(len(batch)))
    for shard in (fused, by_layer):
        for i, prompt in zip(ids, batch, strict=True):
            shard.allocate(i)
            shard.forward([i], [len(prompt)], prompt)
    tokens = torch.arange(3, 3 + len(batch))
    for _ in range(4):
        logits = fused.forward(ids, [1] * len(ids), tokens)
        assert torch.equal(logits, by_layer.forward(ids, [1] * len(ids), tokens))
        tokens = logits.argmax(-1)


def test_a_draft_model_drafts_the_greedy_continuation_and_one_step_verifies_it(model):
    """The model drafting for itself (speculative decoding's draft-model path) proposes its own
    greedy continuation, keeping its KV in step as the history grows or rewinds; and the drafts
    checked in one step get the logits of one-token steps (bit for bit where decode steps run
    in one kernel call)."""
    _, path = model
    target, draft = shards(path)[0], shards(path)[0]
    prompt = prompts()[2]
    expected = greedy([target], [prompt], 12)[0]
    drafter = ModelDrafter(draft)
    assert drafter.propose([(0, prompt, 6)]) == [expected[:6]]
    assert drafter.propose([(0, prompt + expected[:8], 4)]) == [expected[8:12]]  # past its drafts
    assert drafter.propose([(0, prompt + expected[:2], 3)]) == [expected[2:5]]  # back before them
    target.allocate(0)
    target.forward([0], [len(prompt) - 1], torch.tensor(prompt[:-1]))
    together = target.forward([0], [7], torch.tensor([prompt[-1], *expected[:6]]), verify=[True])
    assert together.argmax(-1).tolist() == expected[:7]
    target.kv.rewind(0, len(prompt) - 1)
    one_by_one = torch.cat([target.forward([0], [1], torch.tensor([t])) for t in [prompt[-1], *expected[:6]]])
    if target.fused is not None:
        assert torch.equal(together, one_by_one)
    else:  # the layer-by-layer path's products and attention round as any batch of rows does
        torch.testing.assert_close(together, one_by_one, rtol=1e-5, atol=1e-5)


def test_sequences_arriving_together_grow_the_kv_pool_once():
    """A move's sequences are given room at once (each doubling copies the whole pool), and each
    comes out as it went in."""
    from shardwise.engine.kv_cache import KVCache

    cache = KVCache(2, 1, 4, torch.float32, torch.device("cpu"), initial_blocks=2)
    arriving = {i: torch.randn(2, 2, 1, 40, 4) for i in range(3)}  # 3 blocks each, 2 free
    cache.make_room([kv.shape[3] for kv in arriving.values()])
    pool = cache.data
    for i, kv in arriving.items():
        cache.insert(i, [(0, kv[:1]), (1, kv[1:])])
    assert cache.data is pool and all(torch.equal(cache.extract(i), kv) for i, kv in arriving.items())


def test_sequences_move_to_a_new_split_of_the_layers_with_their_kv_bit_for_bit(model):
    """Mid-decode, each worker of one split exports its sequences (KV of its layers, and at the
    last its samplers); the workers of another split take them in and decode on exactly as the
    first split does: the same logits, bit for bit, and the samplers with them."""
    _, path = model
    old, new = ([Worker(s) for s in shards(path, cuts)] for cuts in ((0, 3, 6), (0, 1, 5, 6)))
    batch = prompts()
    ids = list(range(len(batch)))

    def run(workers: list[Worker], lengths: list[int], x: torch.Tensor) -> torch.Tensor:
        for worker in workers:
            x = worker.shard.forward(ids, lengths, x)
        return x

    for worker in old:
        for i in ids:
            worker.add(i, SamplingParams(temperature=0.7, seed=i))
    logits = run(old, [len(p) for p in batch], torch.tensor([t for p in batch for t in p]))
    for _ in range(3):
        logits = run(old, [1] * len(ids), logits.argmax(-1))
    exports = [worker.export(ids) for worker in old]
    for worker in new:
        worker.adopt(*exports)
    assert [new[0].shard.kv.length(i) for i in ids] == [len(p) + 3 for p in batch]
    assert {i: s.seed for i, s in new[-1].samplers.items()} == {i: i for i in ids} and not new[0].samplers
    for _ in range(3):
        tokens = logits.argmax(-1)
        logits, moved = run(old, [1] * len(ids), tokens), run(new, [1] * len(ids), tokens)
        assert torch.equal(logits, moved)
